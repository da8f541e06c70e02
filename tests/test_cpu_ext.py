"""The C++ extension fastlm._C at the operator level: build and binding (schemas, Meta kernels, opcheck, the
with_cuda attribute), argument errors surfacing as RuntimeError with clear messages, the CPU FFN kernels against
the float64 reference (numerics rule), and attention / decode cases that the shared backend matrices do not cover
(fp16, strided inputs, scales of either sign, empty rows, block boundaries, clamped cache lengths)."""
import math

import pytest
import torch

from fastlm import backends, reference
from fastlm.testing import check_rule

pytestmark = pytest.mark.skipif(backends.extension() is None, reason="fastlm._C is not built")

OPS = ("attention_fwd", "attention_bwd", "decode_attention", "linear", "mlp_gelu", "mlp_swiglu")
SCHEMAS = {
    "attention_fwd": "fastlm::attention_fwd(Tensor q, Tensor k, Tensor v, bool causal, float softmax_scale, "
                     "int window_left, int window_right) -> (Tensor, Tensor)",
    "attention_bwd": "fastlm::attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
                     "bool causal, float softmax_scale, int window_left, int window_right) -> (Tensor, Tensor, Tensor)",
    "decode_attention": "fastlm::decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor cache_seqlens, "
                        "float softmax_scale) -> Tensor",
    "linear": "fastlm::linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor",
    "mlp_gelu": "fastlm::mlp_gelu(Tensor x, Tensor w_fc, Tensor? b_fc, Tensor w_proj, Tensor? b_proj, "
                "Tensor? residual) -> Tensor",
    "mlp_swiglu": "fastlm::mlp_swiglu(Tensor x, Tensor w_gate, Tensor w_up, Tensor w_down, Tensor? residual) "
                  "-> Tensor",
}
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


def _ops():
    return torch.ops.fastlm


# ---- build and binding ---------------------------------------------------------------------------------------------

def test_module_attributes():
    ext = backends.extension()
    assert isinstance(ext.with_cuda, bool)
    if torch.version.cuda is None:  # a CPU build of torch cannot have built the CUDA kernels
        assert ext.with_cuda is False


@pytest.mark.parametrize("op", OPS)
def test_schema_and_kernels(op):
    handle = getattr(_ops(), op).default
    assert str(handle._schema) == SCHEMAS[op]
    for key in ("CPU", "Meta"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(handle.name(), key), f"{op}: no {key} kernel"
    assert backends.extension_has(op, "cpu")


def test_meta_shapes():
    m = dict(device="meta")
    k = torch.empty(2, 9, 2, 40, dtype=BF16, **m)
    out, lse = _ops().attention_fwd(torch.empty(2, 5, 4, 40, dtype=BF16, **m), k, k, True, 0.1, -1, 0)
    assert (out.shape, out.dtype, lse.shape, lse.dtype) == ((2, 5, 4, 40), BF16, (2, 4, 5), F32)
    dq, dk, dv = _ops().attention_bwd(out, torch.empty(2, 5, 4, 40, dtype=BF16, **m), k, k, out, lse, True, 0.1, -1, 0)
    assert (dq.shape, dk.shape, dv.shape, dq.dtype) == ((2, 5, 4, 40), (2, 9, 2, 40), (2, 9, 2, 40), BF16)
    out = _ops().decode_attention(torch.empty(3, 2, 4, 16, **m), torch.empty(3, 50, 1, 16, **m),
                                  torch.empty(3, 50, 1, 16, **m), torch.empty(3, dtype=torch.int32, **m), 0.25)
    assert out.shape == (3, 2, 4, 16)
    x = torch.empty(2, 3, 8, dtype=F16, **m)
    y = _ops().mlp_gelu(x, torch.empty(24, 8, dtype=F16, **m), None, torch.empty(6, 24, dtype=F16, **m), None, None)
    assert (y.shape, y.dtype) == ((2, 3, 6), F16)
    y = _ops().mlp_swiglu(x, *(torch.empty(24, 8, dtype=F16, **m) for _ in range(2)),
                          torch.empty(8, 24, dtype=F16, **m), None)
    assert y.shape == (2, 3, 8)
    y = _ops().linear(x, torch.empty(5, 8, dtype=F16, **m), None)
    assert (y.shape, y.dtype) == ((2, 3, 5), F16)


def test_opcheck():
    q, k, v = torch.randn(1, 5, 4, 16), torch.randn(1, 7, 2, 16), torch.randn(1, 7, 2, 16)
    torch.library.opcheck(_ops().attention_fwd.default, (q, k, v, True, 0.25, -1, 0))
    out, lse = _ops().attention_fwd(q, k, v, True, 0.25, -1, 0)
    torch.library.opcheck(_ops().attention_bwd.default, (torch.randn_like(out), q, k, v, out, lse, True, 0.25, -1, 0))
    kc, vc = torch.randn(2, 12, 2, 16), torch.randn(2, 12, 2, 16)
    torch.library.opcheck(_ops().decode_attention.default,
                          (torch.randn(2, 1, 4, 16), kc, vc, torch.tensor([12, 5], dtype=torch.int32), 0.25))
    x = torch.randn(3, 8)
    gelu_args = (x, torch.randn(24, 8), torch.randn(24), torch.randn(8, 24), torch.randn(8), torch.randn(3, 8))
    torch.library.opcheck(_ops().mlp_gelu.default, gelu_args)
    torch.library.opcheck(_ops().mlp_swiglu.default,
                          (x, torch.randn(24, 8), torch.randn(24, 8), torch.randn(8, 24), None))
    torch.library.opcheck(_ops().linear.default, (x, torch.randn(24, 8), torch.randn(24)))


def test_compile_fullgraph():
    def f(q, k, v):
        out, _ = torch.ops.fastlm.attention_fwd(q, k, v, False, 0.25, -1, -1)
        return out * 2

    q, k, v = torch.randn(1, 9, 2, 16), torch.randn(1, 9, 2, 16), torch.randn(1, 9, 2, 16)
    torch._dynamo.reset()
    assert torch.equal(torch.compile(f, fullgraph=True, backend="eager")(q, k, v), f(q, k, v))


# ---- errors --------------------------------------------------------------------------------------------------------

def _raises(match, fn, *args):
    with pytest.raises(RuntimeError, match=match):
        fn(*args)


def test_attention_errors():
    att = _ops().attention_fwd
    q, k = torch.randn(1, 4, 4, 16), torch.randn(1, 4, 2, 16)
    _raises(r"q must be 4-D", att, q[0], k, k, False, 1.0, -1, -1)
    _raises(r"v must have k's shape", att, q, k, k[:, :3], False, 1.0, -1, -1)
    _raises(r"k must have q's dtype", att, q, k.double(), k, False, 1.0, -1, -1)
    _raises(r"dtype must be float32, bfloat16 or float16, got Double", att, q.double(), k.double(), k.double(),
            False, 1.0, -1, -1)
    _raises(r"nheads of q \(4\) must be a multiple of nheads of k/v \(3\)", att, q, torch.randn(1, 4, 3, 16),
            torch.randn(1, 4, 3, 16), False, 1.0, -1, -1)
    _raises(r"headdim of k/v \(8\) must equal headdim of q \(16\)", att, q, k[..., :8], k[..., :8], False, 1.0, -1,
            -1)
    _raises(r"batch of k/v", att, q, torch.randn(2, 4, 2, 16), torch.randn(2, 4, 2, 16), False, 1.0, -1, -1)
    _raises(r"q must have a contiguous last dim", att, q.transpose(1, 3), k, k, False, 1.0, -1, -1)
    _raises(r"window values must be >= -1", att, q, k, k, False, 1.0, -2, -1)
    _raises(r"causal means window_right = 0", att, q, k, k, True, 1.0, -1, 3)
    _raises(r"softmax_scale must be finite", att, q, k, k, False, math.inf, -1, -1)


def test_attention_bwd_errors():
    bwd = _ops().attention_bwd
    q, k = torch.randn(1, 4, 4, 16), torch.randn(1, 6, 2, 16)
    out, lse = _ops().attention_fwd(q, k, k, False, 0.25, -1, -1)
    _raises(r"attention_bwd: dout must have q's shape", bwd, out[:, :3], q, k, k, out, lse, False, 0.25, -1, -1)
    _raises(r"attention_bwd \(CPU\): out must be a CPU tensor of q's dtype", bwd, out, q, k, k, out.double(), lse,
            False, 0.25, -1, -1)
    _raises(r"lse must be a float32 CPU tensor of shape \(1, 4, 4\)", bwd, out, q, k, k, out, lse[:, :2], False,
            0.25, -1, -1)
    _raises(r"attention_bwd: nheads of q \(4\) must be a multiple of nheads of k/v \(3\)", bwd, out, q,
            torch.randn(1, 6, 3, 16), torch.randn(1, 6, 3, 16), out, lse, False, 0.25, -1, -1)


def test_attention_bwd_empty_and_fp16():
    """No keys: dq 0 (and empty dk, dv); no queries: dk, dv 0; fp16 gradients by the rule; strided dout."""
    q, k = torch.randn(1, 3, 2, 8), torch.randn(1, 0, 1, 8)
    out, lse = _ops().attention_fwd(q, k, k, False, 0.3, -1, -1)
    dq, dk, dv = _ops().attention_bwd(out, q, k, k, out, lse, False, 0.3, -1, -1)
    assert torch.equal(dq, torch.zeros_like(q)) and dk.shape == (1, 0, 1, 8)
    q0, k0 = torch.randn(1, 0, 2, 8), torch.randn(1, 5, 1, 8)
    out0, lse0 = _ops().attention_fwd(q0, k0, k0, False, 0.3, -1, -1)
    _, dk0, dv0 = _ops().attention_bwd(out0, q0, k0, k0, out0, lse0, False, 0.3, -1, -1)
    assert torch.equal(dk0, torch.zeros_like(k0)) and torch.equal(dv0, torch.zeros_like(k0))
    q, k, v = (torch.randn(2, 70, 4, 24).to(F16)[:, :, :s] for s in (4, 2, 2))      # strided, GQA 2:1
    out, lse = _ops().attention_fwd(q, k, v, True, 0.2, -1, 0)
    dout = torch.randn(2, 70, 24, 4).to(F16).transpose(2, 3)                        # head dim not contiguous
    grads = _ops().attention_bwd(dout, q, k, v, out, lse, True, 0.2, -1, 0)
    refs = []
    for dt in (torch.float64, F16):
        leaves = [t.detach().to(dt).requires_grad_() for t in (q, k, v)]
        ref = reference.attention(*leaves, causal=True, softmax_scale=0.2)
        refs.append(torch.autograd.grad(ref, leaves, dout.to(dt)))
    for name, g, g64, glow in zip(("dq", "dk", "dv"), grads, *refs):
        check_rule(name, g, g64, glow)


def test_decode_errors():
    dec = _ops().decode_attention
    q, kc = torch.randn(2, 1, 4, 16), torch.randn(2, 10, 2, 16)
    lens = torch.tensor([3, 4], dtype=torch.int32)
    _raises(r"cache_seqlens must be int32 or int64, got Float", dec, q, kc, kc, lens.float(), 1.0)
    _raises(r"cache_seqlens must have shape \(batch,\) = \(2,\)", dec, q, kc, kc, lens[:1], 1.0)
    _raises(r"v_cache must have k_cache's shape", dec, q, kc, kc[:, :5], lens, 1.0)
    _raises(r"k_cache must have q's dtype", dec, q, kc.to(BF16), kc, lens, 1.0)
    _raises(r"batch of the caches \(2\) must equal batch of q \(1\)", dec, q[:1], kc, kc, lens, 1.0)


def test_mlp_errors():
    x = torch.randn(3, 8)
    w1, w2 = torch.randn(24, 8), torch.randn(8, 24)
    _raises(r"w_fc must be \(intermediate, d\)", _ops().mlp_gelu, x, w1[:, :5], None, w2, None, None)
    _raises(r"w_proj must be \(d_out, intermediate\)", _ops().mlp_gelu, x, w1, None, w2[:, :5], None, None)
    _raises(r"b_fc must have shape \(24,\)", _ops().mlp_gelu, x, w1, torch.randn(5), w2, None, None)
    _raises(r"b_proj must have x's dtype", _ops().mlp_gelu, x, w1, None, w2, torch.randn(8).double(), None)
    _raises(r"residual must have the output's shape \[3, 8\]", _ops().mlp_gelu, x, w1, None, w2, None,
            torch.randn(3, 7))
    _raises(r"x must have at least 1 dim", _ops().mlp_gelu, torch.tensor(1.0), w1, None, w2, None, None)
    _raises(r"w_up must have w_gate's shape", _ops().mlp_swiglu, x, w1, w1[:5], w2, None)
    _raises(r"w_down must be \(d_out, intermediate\)", _ops().mlp_swiglu, x, w1, w1, w2[:, :4], None)
    _raises(r"w_gate must have x's dtype", _ops().mlp_swiglu, x, w1.to(BF16), w1, w2, None)


# ---- FFN numerics --------------------------------------------------------------------------------------------------

def _f64(t):
    return None if t is None else t.double()


def _gelu_case(lead, d, inter, d_out, dtype, bias, residual):
    x = torch.randn(*lead, d).to(dtype)
    w_fc = (torch.randn(inter, d) / math.sqrt(d)).to(dtype)
    w_proj = (torch.randn(d_out, inter) / math.sqrt(inter)).to(dtype)
    b_fc = torch.randn(inter).to(dtype) if bias else None
    b_proj = torch.randn(d_out).to(dtype) if bias else None
    res = torch.randn(*lead, d_out).to(dtype) if residual else None
    return x, w_fc, b_fc, w_proj, b_proj, res


# (leading dims, d, intermediate, d_out): odd sizes (vector tails), a single token, several token blocks
FFN_SHAPES = [((5,), 40, 72, 40), ((1,), 64, 256, 64), ((2, 33), 24, 2056, 17), ((70,), 48, 1100, 48)]


@pytest.mark.parametrize("dtype", [F32, BF16, F16], ids=str)
@pytest.mark.parametrize("shape", FFN_SHAPES, ids=lambda s: "x".join(map(str, (*s[0], *s[1:]))))
@pytest.mark.parametrize("bias,residual", [(True, True), (False, False), (True, False)])
def test_mlp_gelu_rule(dtype, shape, bias, residual):
    args = _gelu_case(*shape, dtype, bias, residual)
    out = _ops().mlp_gelu(*args)
    assert out.dtype == dtype and torch.isfinite(out).all()
    check_rule("mlp_gelu", out, reference.mlp_gelu(*map(_f64, args)), reference.mlp_gelu(*args))


@pytest.mark.parametrize("dtype", [F32, BF16, F16], ids=str)
@pytest.mark.parametrize("shape", FFN_SHAPES, ids=lambda s: "x".join(map(str, (*s[0], *s[1:]))))
@pytest.mark.parametrize("residual", [True, False])
def test_mlp_swiglu_rule(dtype, shape, residual):
    lead, d, inter, d_out = shape
    x = torch.randn(*lead, d).to(dtype)
    w_gate, w_up = ((torch.randn(inter, d) / math.sqrt(d)).to(dtype) for _ in range(2))
    w_down = (torch.randn(d_out, inter) / math.sqrt(inter)).to(dtype)
    res = torch.randn(*lead, d_out).to(dtype) if residual else None
    args = (x, w_gate, w_up, w_down, res)
    out = _ops().mlp_swiglu(*args)
    assert out.dtype == dtype and torch.isfinite(out).all()
    check_rule("mlp_swiglu", out, reference.mlp_swiglu(*map(_f64, args)), reference.mlp_swiglu(*args))


def test_mlp_strided_and_empty():
    x = torch.randn(8, 20, 2)[..., 0]  # (8, 20), row stride 40
    args = _gelu_case((8,), 20, 72, 20, F32, True, True)
    args = (x, *args[1:5], torch.randn(20, 8).t())
    check_rule("mlp_gelu strided", _ops().mlp_gelu(*args), reference.mlp_gelu(*map(_f64, args)),
               reference.mlp_gelu(*args))
    empty = torch.randn(0, 3, 20)
    assert _ops().mlp_gelu(empty, *args[1:5], None).shape == (0, 3, 20)
    assert _ops().mlp_swiglu(empty, args[1], args[1], args[3], None).shape == (0, 3, 20)


def test_mlp_zero_hidden():
    """x (..., 0): the up-projections are 0, so the output is bias / activation(0) / residual only."""
    x = torch.randn(2, 3, 0)
    args = (x, torch.randn(5, 0), torch.randn(5), torch.randn(4, 5), torch.randn(4), torch.randn(2, 3, 4))
    check_rule("mlp_gelu d=0", _ops().mlp_gelu(*args), reference.mlp_gelu(*map(_f64, args)), reference.mlp_gelu(*args))
    sw = (x, torch.randn(5, 0), torch.randn(5, 0), torch.randn(4, 5))
    assert torch.equal(_ops().mlp_swiglu(*sw, None), torch.zeros(2, 3, 4))


def test_mlp_inputs_requiring_grad_across_threads():
    """Many token blocks run on worker threads: the kernel's GEMMs must not go through autograd there, even when
    the inputs require grad (the op itself is forward-only; fastlm.ops supplies the backward)."""
    torch.manual_seed(0)
    x = torch.randn(700, 64, requires_grad=True)
    w_gate, w_up = (torch.randn(2048, 64, requires_grad=True) / 8 for _ in range(2))
    w_down = torch.randn(64, 2048, requires_grad=True) / 40
    with torch.enable_grad():
        out = _ops().mlp_swiglu(x, w_gate, w_up, w_down, None)
    args = (x, w_gate, w_up, w_down)
    check_rule("mlp_swiglu requires_grad", out, reference.mlp_swiglu(*(_f64(t.detach()) for t in args)),
               reference.mlp_swiglu(*(t.detach() for t in args)))


# ---- linear ----------------------------------------------------------------------------------------------------------

# (leading dims of x, in_features, out_features): the matrix-vector path (<= 8 rows; in_features not a whole number
# of vectors, out_features not a multiple of the 4-row groups, one output) and ATen's GEMM above it
LINEAR_SHAPES = [((1,), 40, 1000), ((2, 3), 20, 7), ((7,), 72, 1), ((1, 8), 1, 13), ((9,), 40, 33), ((3, 50), 24, 17)]


@pytest.mark.parametrize("dtype", [F32, BF16, F16], ids=str)
@pytest.mark.parametrize("shape", LINEAR_SHAPES, ids=lambda s: "x".join(map(str, (*s[0], *s[1:]))))
@pytest.mark.parametrize("bias", [True, False])
def test_linear_rule(dtype, shape, bias):
    lead, k, n = shape
    x = torch.randn(*lead, k).to(dtype)
    w = (torch.randn(n, k) / math.sqrt(k)).to(dtype)
    b = torch.randn(n).to(dtype) if bias else None
    out = _ops().linear(x, w, b)
    assert out.dtype == dtype and out.shape == (*lead, n) and torch.isfinite(out).all()
    check_rule("linear", out, torch.nn.functional.linear(x.double(), w.double(), _f64(b)),
               torch.nn.functional.linear(x, w, b))


def test_linear_strided_and_empty():
    x = torch.randn(3, 40, 2)[..., 1]                        # row stride 80
    w = torch.randn(24, 40)
    for weight in (w, torch.randn(40, 24).t(), w[::2]):     # rows contiguous; transposed (ATen path); row stride 80
        check_rule("linear strided", _ops().linear(x, weight, None),
                   torch.nn.functional.linear(x.double(), weight.double()), torch.nn.functional.linear(x, weight))
    assert _ops().linear(torch.randn(0, 4, 40), w, None).shape == (0, 4, 24)
    b = torch.randn(24)
    assert torch.equal(_ops().linear(torch.randn(2, 0), torch.randn(24, 0), b), b.expand(2, 24))
    assert torch.equal(_ops().linear(torch.randn(2, 0), torch.randn(24, 0), None), torch.zeros(2, 24))


def test_linear_errors():
    x, w = torch.randn(3, 8), torch.randn(5, 8)
    _raises(r"weight must be \(out_features, 8\) for x's last dim 8, got \[5, 7\]", _ops().linear, x, w[:, :7], None)
    _raises(r"weight must be 2-D", _ops().linear, x, w[0], None)
    _raises(r"x must have at least 1 dim", _ops().linear, torch.tensor(1.0), w, None)
    _raises(r"weight must have x's dtype", _ops().linear, x, w.to(BF16), None)
    _raises(r"dtype must be float32, bfloat16 or float16, got Double", _ops().linear, x.double(), w.double(), None)
    _raises(r"bias must be a CPU Float tensor of shape \(5,\)", _ops().linear, x, w, torch.randn(4))


# ---- attention / decode cases beyond the shared matrices ---------------------------------------------------------

def _attention_check(q, k, v, causal, scale, window):
    left, right = window
    out, lse = _ops().attention_fwd(q, k, v, causal, scale, left, 0 if causal else right)
    assert out.is_contiguous() and torch.isfinite(out).all()
    r64, l64 = reference.attention(q.double(), k.double(), v.double(), causal=causal, softmax_scale=scale,
                                   window=window, return_lse=True)
    r, lr = reference.attention(q, k, v, causal=causal, softmax_scale=scale, window=window, return_lse=True)
    check_rule("out", out, r64, r)
    check_rule("lse", lse, l64, lr)
    return out, lse


@pytest.mark.parametrize("dtype", [F32, BF16, F16], ids=str)
def test_attention_strided_gqa_blocks(dtype):
    # storage (B, H, S, D) viewed as (B, S, H, D); 130 queries/keys span three 64-row blocks; D = 72 has a tail
    q = torch.randn(2, 6, 130, 72).to(dtype).transpose(1, 2)
    k = torch.randn(2, 2, 150, 72).to(dtype).transpose(1, 2)
    v = torch.randn(2, 150, 2, 80)[..., :72].to(dtype)
    _attention_check(q, k, v, True, 1 / math.sqrt(72), (-1, -1))
    _attention_check(q, k, v, False, 0.2, (70, 3))


@pytest.mark.parametrize("scale", [-0.3, 0.0, 2.5])
def test_attention_scale_sign(scale):
    q, k, v = torch.randn(1, 20, 2, 32), torch.randn(1, 33, 2, 32), torch.randn(1, 33, 2, 32)
    _attention_check(q, k, v, False, scale, (-1, -1))
    _attention_check(q, k, v, True, scale, (5, -1))


def test_attention_empty_rows_and_sizes():
    # causal with Sk < Sq: the first Sq - Sk queries see no key -> out 0, lse -inf
    q, k, v = torch.randn(1, 70, 2, 16), torch.randn(1, 6, 2, 16), torch.randn(1, 6, 2, 16)
    out, lse = _attention_check(q, k, v, True, 0.25, (-1, -1))
    assert torch.equal(out[:, :64], torch.zeros(1, 64, 2, 16)) and torch.isneginf(lse[:, :, :64]).all()
    out, lse = _ops().attention_fwd(q, k[:, :0], v[:, :0], False, 0.25, -1, -1)
    assert torch.equal(out, torch.zeros_like(q)) and torch.isneginf(lse).all()
    out, lse = _ops().attention_fwd(q[:, :0], k, v, False, 0.25, -1, -1)
    assert out.shape == (1, 0, 2, 16) and lse.shape == (1, 2, 0)


def test_attention_threads_agree():
    q, k, v = torch.randn(2, 200, 4, 64), torch.randn(2, 200, 2, 64), torch.randn(2, 200, 2, 64)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _ops().attention_fwd(q, k, v, True, 0.125, -1, 0)
    finally:
        torch.set_num_threads(n)
    many = _ops().attention_fwd(q, k, v, True, 0.125, -1, 0)
    assert torch.equal(one[0], many[0]) and torch.equal(one[1], many[1])


@pytest.mark.parametrize("dtype", [F32, BF16, F16], ids=str)
def test_decode_lengths_and_strides(dtype):
    # lengths beyond S_max are clamped, 0 and < Sq leave queries without keys; strided caches and q; int64 lengths
    B, Sq, H, Hkv, D, S_max = 4, 3, 6, 2, 40, 700
    q = torch.randn(B, H, Sq, D).to(dtype).transpose(1, 2)
    kc = torch.randn(B, Hkv, S_max, D).to(dtype).transpose(1, 2)
    vc = torch.randn(B, S_max, Hkv, 48)[..., :D].to(dtype)
    lens = torch.tensor([1000, 0, 2, 517], dtype=torch.int64)
    out = _ops().decode_attention(q, kc, vc, lens, 0.2)
    assert out.is_contiguous() and torch.isfinite(out).all()
    clamped = lens.clamp(max=S_max)
    r64 = reference.decode_attention(q.double(), kc.double(), vc.double(), clamped, softmax_scale=0.2)
    check_rule("decode", out, r64, reference.decode_attention(q, kc, vc, clamped, softmax_scale=0.2))
    assert torch.equal(out[1], torch.zeros_like(out[1])) and torch.equal(out[2, 0], torch.zeros_like(out[2, 0]))
    assert torch.equal(out, _ops().decode_attention(q, kc, vc, clamped.int(), 0.2))
