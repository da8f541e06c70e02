"""The C++ extension fastlm._C at the operator level: build and binding (schemas, Meta kernels, opcheck, the
with_cuda attribute), argument errors surfacing as RuntimeError with clear messages, the CPU FFN kernels against
the float64 reference (numerics rule), the norm and RoPE kernels over odd sizes, dtypes and strides, and attention /
decode cases that the shared backend matrices do not cover (strided inputs, scales of either sign, empty rows, block
boundaries, clamped cache lengths)."""
import importlib
import math

import pytest
import torch

from conftest import num_threads
from fastlm import backends, ops, reference
from fastlm.testing import check_rule

pytestmark = pytest.mark.skipif(backends.extension() is None, reason="fastlm._C is not built")

OPS = ("attention_fwd", "attention_bwd", "decode_attention", "linear", "mlp_gelu", "mlp_swiglu", "norm_fwd",
       "norm_bwd", "rope_fwd", "decode_step", "gelu_bwd", "swiglu_bwd", "cross_entropy_fwd", "cross_entropy_bwd",
       "cross_entropy_fused_")
SCHEMAS = {
    "attention_fwd": "fastlm::attention_fwd(Tensor q, Tensor k, Tensor v, bool causal, float softmax_scale, "
                     "int window_left, int window_right) -> (Tensor, Tensor)",
    "attention_bwd": "fastlm::attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
                     "Tensor? dlse, bool causal, float softmax_scale, int window_left, int window_right) "
                     "-> (Tensor, Tensor, Tensor)",
    "decode_attention": "fastlm::decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor cache_seqlens, "
                        "float softmax_scale, int window_left=-1) -> Tensor",
    "linear": "fastlm::linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor",
    "mlp_gelu": "fastlm::mlp_gelu(Tensor x, Tensor w_fc, Tensor? b_fc, Tensor w_proj, Tensor? b_proj, "
                "Tensor? residual) -> Tensor",
    "mlp_swiglu": "fastlm::mlp_swiglu(Tensor x, Tensor w_gate, Tensor w_up, Tensor w_down, Tensor? residual) "
                  "-> Tensor",
    "norm_fwd": "fastlm::norm_fwd(Tensor x, Tensor? residual, Tensor weight, Tensor? bias, float eps, bool is_rms) "
                "-> (Tensor y, Tensor h)",
    "norm_bwd": "fastlm::norm_bwd(Tensor dy, Tensor h, Tensor weight, Tensor? dh, float eps, bool is_rms, "
                "bool has_bias) -> (Tensor dx, Tensor dweight, Tensor dbias)",
    "rope_fwd": "fastlm::rope_fwd(Tensor x, Tensor cos, Tensor sin, bool inverse) -> Tensor",
    "gelu_bwd": "fastlm::gelu_bwd(Tensor dh, Tensor a) -> (Tensor da, Tensor h)",
    "swiglu_bwd": "fastlm::swiglu_bwd(Tensor dh, Tensor g, Tensor u) -> (Tensor dg, Tensor du, Tensor h)",
    "cross_entropy_fwd": "fastlm::cross_entropy_fwd(Tensor logits, Tensor targets, int ignore_index) "
                         "-> (Tensor loss, Tensor lse)",
    "cross_entropy_bwd": "fastlm::cross_entropy_bwd(Tensor grad_loss, Tensor logits, Tensor targets, Tensor lse, "
                         "int ignore_index) -> Tensor",
    "cross_entropy_fused_": "fastlm::cross_entropy_fused_(Tensor(a!) logits, Tensor targets, int ignore_index, "
                            "Tensor? grad_scale) -> (Tensor loss, Tensor lse)",
    "decode_step": "fastlm::decode_step(Tensor tokens, Tensor input_pos, Tensor tok_emb, Tensor? pos_emb, "
                   "Tensor? rope_cos, Tensor? rope_sin, Tensor?[] blocks, Tensor(a!)[] k_caches, "
                   "Tensor(b!)[] v_caches, Tensor norm_w, Tensor? norm_b, Tensor head, float eps, bool is_rms, "
                   "int window_left=-1) -> Tensor",
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
    dq, dk, dv = _ops().attention_bwd(out, torch.empty(2, 5, 4, 40, dtype=BF16, **m), k, k, out, lse, None, True, 0.1,
                                      -1, 0)
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
    y, h = _ops().norm_fwd(x, x, torch.empty(8, **m), torch.empty(8, **m), 1e-5, False)
    assert (y.shape, y.dtype, h.shape, h.dtype) == ((2, 3, 8), F16, (2, 3, 8), F16)
    y, h = _ops().norm_fwd(x, None, torch.empty(8, dtype=BF16, **m), None, 1e-6, True)
    assert (y.shape, y.dtype, h.shape) == ((2, 3, 8), F16, (0,))
    dx, dw, db = _ops().norm_bwd(x, x, torch.empty(8, dtype=BF16, **m), x, 1e-5, False, True)
    assert (dx.shape, dx.dtype, dw.shape, dw.dtype, db.shape, db.dtype) == ((2, 3, 8), F16, (8,), BF16, (8,), BF16)
    assert _ops().norm_bwd(x, x, torch.empty(8, **m), None, 1e-6, True, False)[2].shape == (0,)
    q = torch.empty(2, 5, 3, 16, dtype=BF16, **m).transpose(1, 2)
    y = _ops().rope_fwd(q, torch.empty(3, 16, dtype=BF16, **m), torch.empty(3, 16, dtype=BF16, **m), True)
    assert (y.shape, y.dtype, y.is_contiguous()) == ((2, 3, 5, 16), BF16, True)
    args = _decode_step_args(**m)
    logits = _ops().decode_step(*args)
    assert (logits.shape, logits.dtype) == ((2, 3, 50), F32)
    a = torch.empty(3, 20, dtype=BF16, **m)
    assert [(t.shape, t.dtype) for t in _ops().gelu_bwd(a, a)] == [((3, 20), BF16)] * 2
    assert [(t.shape, t.dtype) for t in _ops().swiglu_bwd(a, a, a)] == [((3, 20), BF16)] * 3
    logits, targets = torch.empty(6, 11, dtype=BF16, **m), torch.empty(6, dtype=torch.long, **m)
    for loss, lse in (_ops().cross_entropy_fwd(logits, targets, -100),
                      _ops().cross_entropy_fused_(logits, targets, -100, None)):
        assert [(t.shape, t.dtype) for t in (loss, lse)] == [((6,), F32)] * 2
    grad = _ops().cross_entropy_bwd(loss, logits, targets, lse, -100)
    assert (grad.shape, grad.dtype) == ((6, 11), BF16)


def test_meta_errors():
    m = dict(device="meta")
    logits, targets = torch.empty(2, 6, 11, **m), torch.empty(2, 6, dtype=torch.long, **m)
    _raises(r"fastlm::cross_entropy: logits must be 2-D \(tokens, vocab\), got shape \[2, 6, 11\]",
            _ops().cross_entropy_fwd, logits, targets, -100)
    args = list(_decode_step_args(**m))
    args[0] = args[0][0]
    _raises(r"fastlm::decode_step: tokens and head must be 2-D, got 1-D and 2-D", _ops().decode_step, *args)
    q3, w = torch.empty(2, 5, 16, **m), torch.empty(8, 16, **m)
    _raises(r"fastlm::attention_fwd: q, k, v must be 4-D, got 3-D, 3-D, 3-D", _ops().attention_fwd, q3, q3, q3, True,
            0.25, -1, 0)
    _raises(r"fastlm::decode_attention: q must be 4-D, got 3-D", _ops().decode_attention, q3, q3, q3,
            torch.empty(2, dtype=torch.long, **m), 0.25, -1)
    _raises(r"fastlm: x must have at least 1 dim and weights 2, got 0 and 2", _ops().linear, torch.empty((), **m), w,
            None)
    _raises(r"fastlm: x must have at least 1 dim and weights 2, got 3 and 1", _ops().mlp_swiglu, q3, w, w, w[0], None)
    _raises(r"fastlm::norm_fwd: x must have at least 1 dim", _ops().norm_fwd, torch.empty((), **m), None, w[0], None,
            1e-5, True)
    _raises(r"fastlm::rope_fwd: x must be 4-D \(batch, seqlen, heads, head_dim\), got 3-D", _ops().rope_fwd, q3, w, w,
            False)


def _decode_step_args(**m):
    """Arguments of decode_step for one SwiGLU block (d 16, 2 heads of 8, 1 kv head, intermediate 24, vocab 50)
    and tokens (2, 3) at positions (2, 0) of a cache of 9."""
    w = lambda *shape: torch.randn(*shape, **m) / 4
    block = [w(16), None, w(16, 16), None, w(8, 16), None, w(8, 16), None, w(16, 16), None, w(16), None,
             w(24, 16), None, w(24, 16), w(16, 24), None]
    cos, sin = (t.to(m.get("device", "cpu")) for t in reference.rope_cos_sin(torch.arange(9), 8))
    tokens = torch.randint(0, 50, (2, 3)).to(m.get("device", "cpu"))
    pos = torch.tensor([2, 0]).to(m.get("device", "cpu"))
    return (tokens, pos, w(50, 16), None, cos, sin, block, [torch.zeros(2, 9, 1, 8, **m)],
            [torch.zeros(2, 9, 1, 8, **m)], w(16), None, w(50, 16), 1e-6, True)


def _op_cases():
    """(op name, arguments) of every CPU op, valid for its kernel."""
    q, k, v = torch.randn(1, 5, 4, 16), torch.randn(1, 7, 2, 16), torch.randn(1, 7, 2, 16)
    out, lse = _ops().attention_fwd(q, k, v, True, 0.25, -1, 0)
    kc, vc = torch.randn(2, 12, 2, 16), torch.randn(2, 12, 2, 16)
    x = torch.randn(3, 8)
    w, b = torch.randn(8), torch.randn(8)
    q4 = torch.randn(2, 3, 4, 16)
    cos, sin = reference.rope_cos_sin(torch.arange(3), 16)
    logits, targets = torch.randn(6, 11), torch.tensor([0, 10, -100, 3, 3, 7])
    _, ce_lse = _ops().cross_entropy_fwd(logits, targets, -100)
    return [
        ("attention_fwd", (q, k, v, True, 0.25, -1, 0)),
        ("attention_bwd", (torch.randn_like(out), q, k, v, out, lse, torch.randn_like(lse), True, 0.25, -1, 0)),
        ("decode_attention", (torch.randn(2, 1, 4, 16), kc, vc, torch.tensor([12, 5], dtype=torch.int32), 0.25)),
        ("mlp_gelu", (x, torch.randn(24, 8), torch.randn(24), torch.randn(8, 24), torch.randn(8), torch.randn(3, 8))),
        ("mlp_swiglu", (x, torch.randn(24, 8), torch.randn(24, 8), torch.randn(8, 24), None)),
        ("linear", (x, torch.randn(24, 8), torch.randn(24))),
        ("norm_fwd", (x, torch.randn(3, 8), w, b, 1e-5, False)),
        ("norm_fwd", (x.to(BF16), None, w, None, 1e-6, True)),
        ("norm_bwd", (torch.randn(3, 8), x, w, torch.randn(3, 8), 1e-5, False, True)),
        ("norm_bwd", (torch.randn(3, 8).to(BF16), x.to(BF16), w, None, 1e-6, True, False)),
        ("rope_fwd", (q4, cos, sin, False)),
        ("rope_fwd", (q4, cos.expand(2, 3, 16), sin.expand(2, 3, 16), True)),
        ("decode_step", _decode_step_args()),
        ("gelu_bwd", (torch.randn(3, 20), torch.randn(3, 20))),
        ("swiglu_bwd", (torch.randn(3, 20), torch.randn(3, 20), torch.randn(3, 20))),
        ("cross_entropy_fwd", (logits, targets, -100)),
        ("cross_entropy_bwd", (torch.randn(6), logits, targets, ce_lse, -100)),
        ("cross_entropy_fused_", (logits.clone(), targets, -100, torch.randn(6))),
    ]


def test_opcheck():
    for name, args in _op_cases():
        torch.library.opcheck(getattr(_ops(), name).default, args)


def test_meta_kernels_refuse_mixed_devices():
    """A call with one tensor argument on the CPU and the others on the meta device (the dispatcher then runs the
    Meta kernel) is an error that names that argument, not uninitialized CPU tensors."""
    def to_meta(a, keep):
        if isinstance(a, (list, tuple)):
            return [to_meta(t, keep) for t in a]
        return a.to("meta") if isinstance(a, torch.Tensor) and a is not keep else a

    for name, args in _op_cases():
        arg_names = [a.name for a in getattr(_ops(), name).default._schema.arguments]
        kept = [(i, t) for i, a in enumerate(args) for t in (a if isinstance(a, (list, tuple)) else [a])
                if isinstance(t, torch.Tensor)]
        for i, keep in kept:
            with pytest.raises(RuntimeError, match=rf"fastlm::{name}: {arg_names[i]} is on cpu while other tensor "
                                                   r"arguments are on the meta device"):
                getattr(_ops(), name)(*[to_meta(a, keep) for a in args])


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
    _raises(r"softmax_scale must be finite in float32, got 1e\+39", att, q, k, k, False, 1e39, -1, -1)
    _raises(r"softmax_scale must be finite in float32", _ops().decode_attention, q, k, k, torch.tensor([4]), -1e39)


def test_attention_bwd_errors():
    bwd = _ops().attention_bwd
    q, k = torch.randn(1, 4, 4, 16), torch.randn(1, 6, 2, 16)
    out, lse = _ops().attention_fwd(q, k, k, False, 0.25, -1, -1)
    _raises(r"attention_bwd: dout must have q's shape", bwd, out[:, :3], q, k, k, out, lse, None, False, 0.25, -1,
            -1)
    _raises(r"attention_bwd \(CPU\): out must be a CPU tensor of q's dtype", bwd, out, q, k, k, out.double(), lse,
            None, False, 0.25, -1, -1)
    _raises(r"lse must be a float32 CPU tensor of shape \(1, 4, 4\)", bwd, out, q, k, k, out, lse[:, :2], None,
            False, 0.25, -1, -1)
    _raises(r"attention_bwd: nheads of q \(4\) must be a multiple of nheads of k/v \(3\)", bwd, out, q,
            torch.randn(1, 6, 3, 16), torch.randn(1, 6, 3, 16), out, lse, None, False, 0.25, -1, -1)
    _raises(r"dlse must be a float32 CPU tensor of shape \(1, 4, 4\)", bwd, out, q, k, k, out, lse, lse.double(),
            False, 0.25, -1, -1)


def test_attention_bwd_empty_and_fp16():
    """No keys: dq 0 (and empty dk, dv); no queries: dk, dv 0; fp16 gradients by the rule; strided dout."""
    q, k = torch.randn(1, 3, 2, 8), torch.randn(1, 0, 1, 8)
    out, lse = _ops().attention_fwd(q, k, k, False, 0.3, -1, -1)
    dq, dk, dv = _ops().attention_bwd(out, q, k, k, out, lse, None, False, 0.3, -1, -1)
    assert torch.equal(dq, torch.zeros_like(q)) and dk.shape == (1, 0, 1, 8)
    q0, k0 = torch.randn(1, 0, 2, 8), torch.randn(1, 5, 1, 8)
    out0, lse0 = _ops().attention_fwd(q0, k0, k0, False, 0.3, -1, -1)
    _, dk0, dv0 = _ops().attention_bwd(out0, q0, k0, k0, out0, lse0, None, False, 0.3, -1, -1)
    assert torch.equal(dk0, torch.zeros_like(k0)) and torch.equal(dv0, torch.zeros_like(k0))
    q, k, v = (torch.randn(2, 70, 4, 24).to(F16)[:, :, :s] for s in (4, 2, 2))      # strided, GQA 2:1
    out, lse = _ops().attention_fwd(q, k, v, True, 0.2, -1, 0)
    dout = torch.randn(2, 70, 24, 4).to(F16).transpose(2, 3)                        # head dim not contiguous
    grads = _ops().attention_bwd(dout, q, k, v, out, lse, None, True, 0.2, -1, 0)
    refs = []
    for dt in (torch.float64, F16):
        leaves = [t.detach().to(dt).requires_grad_() for t in (q, k, v)]
        ref = reference.attention(*leaves, causal=True, softmax_scale=0.2)
        refs.append(torch.autograd.grad(ref, leaves, dout.to(dt)))
    for name, g, g64, glow in zip(("dq", "dk", "dv"), grads, *refs):
        check_rule(name, g, g64, glow)


@pytest.mark.parametrize("threads", [2, 3, 5])
def test_attention_bwd_split_passes(threads):
    """Fewer (batch, kv head) items than threads: dK/dV by key chunks, then dQ by query shares; 5 key tiles split into
    chunks of uneven size, causal with Sq < Sk and non-causal with a window."""
    with num_threads(threads):
        for sq, causal, window in ((300, False, (-1, -1)), (170, True, (-1, -1)), (300, False, (90, 7))):
            q, k, v = torch.randn(1, sq, 3, 24), torch.randn(1, 300, 1, 24), torch.randn(1, 300, 1, 24)
            left, right = window
            out, lse = _ops().attention_fwd(q, k, v, causal, 0.3, left, 0 if causal else right)
            dout = torch.randn_like(out)
            grads = _ops().attention_bwd(dout, q, k, v, out, lse, None, causal, 0.3, left, 0 if causal else right)
            refs = []
            for dt in (torch.float64, F32):
                leaves = [t.to(dt).requires_grad_() for t in (q, k, v)]
                ref = reference.attention(*leaves, causal=causal, softmax_scale=0.3, window=window)
                refs.append(torch.autograd.grad(ref, leaves, dout.to(dt)))
            for name, g, g64, glow in zip(("dq", "dk", "dv"), grads, *refs):
                check_rule(f"{name} sq={sq} causal={causal} window={window}", g, g64, glow)


@pytest.mark.parametrize("threads", [1, 3])
def test_attention_bwd_in_chunks(threads):
    """More packed operands than the kernel holds at once (8M floats): 33000 keys of 2 kv heads, K and V in rows of 64
    floats, are 1.05x that, so each kv head with its 2 query heads is a chunk of its own; with 3 threads each chunk
    also splits into the dK/dV and dQ passes."""
    with num_threads(threads):
        q, k, v = torch.randn(1, 16, 4, 64), torch.randn(1, 33000, 2, 64), torch.randn(1, 33000, 2, 64)
        out, lse = _ops().attention_fwd(q, k, v, False, 0.125, -1, -1)
        dout, dlse = torch.randn_like(out), torch.randn_like(lse)
        grads = _ops().attention_bwd(dout, q, k, v, out, lse, dlse, False, 0.125, -1, -1)
        refs = []
        for dt in (torch.float64, F32):
            leaves = [t.to(dt).requires_grad_() for t in (q, k, v)]
            ref, ref_lse = reference.attention(*leaves, softmax_scale=0.125, return_lse=True)
            refs.append(torch.autograd.grad((ref, ref_lse), leaves, (dout.to(dt), dlse.to(dt))))
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
    _raises(r"headdim of the caches \(8\) must equal headdim of q \(16\)", dec, q, kc[..., :8], kc[..., :8], lens,
            1.0)
    _raises(r"headdim must be >= 1, got 0", dec, q[..., :0], kc[..., :0], kc[..., :0], lens, 1.0)
    _raises(r"window_left must be >= -1 \(-1: no window\), got -2", dec, q, kc, kc, lens, 1.0, -2)


def test_decode_step_errors():
    args = _decode_step_args()
    step = _ops().decode_step

    def call(**at):                       # args with the entries at the given indices replaced
        return step(*[at.get(f"i{i}", a) for i, a in enumerate(args)])

    kc = args[7][0]
    with pytest.raises(RuntimeError, match="no two of them may share memory"):
        call(i8=[kc])                                                      # v_cache = k_cache
    # the Python wrapper checks the window before any cache is written
    (tokens, input_pos, tok_emb, _, cos, sin, blocks, k_caches, v_caches, norm_w, _, head, eps, is_rms) = args
    before = k_caches[0].clone()
    with pytest.raises(ValueError, match="window_left must be an int >= -1"):
        ops.decode_step(tokens, input_pos, tok_emb, blocks, k_caches, v_caches, norm_w, head, eps=eps, is_rms=is_rms,
                        rope_cos=cos, rope_sin=sin, window_left=-5, backend="cpu")
    assert torch.equal(k_caches[0], before)
    for at, words in ((dict(k_caches=[k_caches[0].to("meta")]), r"k_caches\[0\] is on meta"),
                      (dict(head=head.to("meta")), "head is on meta"),
                      (dict(blocks=blocks[:4] + [blocks[4].to("meta")] + blocks[5:]),
                       r"blocks\[4\] \(wk\) is on meta")):
        kw = {**dict(tokens=tokens, input_pos=input_pos, tok_emb=tok_emb, blocks=blocks, k_caches=k_caches,
                     v_caches=v_caches, norm_weight=norm_w, head=head), **at}
        with pytest.raises(ValueError, match=words + " but tokens is on cpu"):
            ops.decode_step(**kw, eps=eps, is_rms=is_rms, rope_cos=cos, rope_sin=sin)
    assert torch.equal(k_caches[0], before)
    with pytest.raises(RuntimeError, match=r"elements must not overlap \(e.g. an expanded tensor\)"):
        call(i8=[torch.zeros(1, 9, 1, 8).expand(2, 9, 1, 8)])
    block = list(args[6])
    block[15] = torch.randn(16, 20)
    with pytest.raises(RuntimeError,
                       match=r"block 0's w2 \(w_proj / w_down\) must have shape \(16, 24\), got \[16, 20\]"):
        call(i6=block)
    with pytest.raises(RuntimeError, match=r"block 0's norm1 weight must have shape \(12,\) for tok_emb's d_model 12"):
        call(i2=torch.randn(50, 12))
    block = list(args[6])
    block[2] = torch.randn(12, 16)
    with pytest.raises(RuntimeError, match=r"block 0's wq must have shape \(n_head \* 8, 16\), n_head a multiple of "
                                           r"the caches' n_kv_head 1, for the caches' head_dim 8 and tok_emb's "
                                           r"d_model 16, got \[12, 16\]"):
        call(i6=block)
    with pytest.raises(RuntimeError, match=r"the batch of tokens \(3\) must equal the KV caches' batch"):
        call(i0=torch.zeros(3, 3, dtype=torch.long), i1=torch.zeros(3, dtype=torch.long))
    with pytest.raises(RuntimeError, match=r"norm_w must have shape \(16,\), got \[15\]"):
        call(i9=torch.randn(15))
    # the op's own checks ahead of any the Python wrapper makes
    for at, words in (
            (dict(i0=args[0].float()), r"tokens must be an int32/int64 CPU tensor of shape \(batch, seqlen\), got a "
                                       r"Float tensor of shape \[2, 3\]"),
            (dict(i0=args[0][:, :0]), r"tokens must have batch >= 1 and seqlen >= 1, got shape \[2, 0\]"),
            (dict(i8=[]), r"need one k_cache and one v_cache per block and 17 block tensors per block; got 1 k_caches, "
                          r"0 v_caches and 17 block tensors"),
            (dict(i2=args[2][0]), r"tok_emb must be 2-D \(vocab, d_model\), got shape \[16\]"),
            (dict(i5=None), "rope_cos and rope_sin must be given together"),
            (dict(i7=[kc[..., :0]], i8=[kc[..., :0]]), r"the KV caches need n_kv_head >= 1 and head_dim >= 1")):
        with pytest.raises(RuntimeError, match=words):
            call(**at)


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
    _raises(r"b_proj must have shape \(8,\), got \[5\]", _ops().mlp_gelu, x, w1, None, w2, torch.randn(5), None)
    _raises(r"w_gate must be \(intermediate, d\) with d = 8 \(x's last dim\), got \[24, 5\]", _ops().mlp_swiglu, x,
            w1[:, :5], w1[:, :5], w2, None)
    for op in ("cross_entropy_fwd", "cross_entropy_fused_"):             # (an empty vocabulary has no softmax)
        _raises(f"fastlm::{op}: the vocabulary \\(logits' last dim\\) must be >= 1, got 0",
                getattr(_ops(), op), torch.randn(3, 0), torch.zeros(3, dtype=torch.long), -100,
                *([None] if op.endswith("_") else []))


def test_norm_errors():
    norm = _ops().norm_fwd
    x, w = torch.randn(3, 8), torch.randn(8)
    _raises(r"x must have at least 1 dim \(\.\.\., d\), got a 0-D tensor", norm, torch.tensor(1.0), None, w[:1],
            None, 1e-5, True)
    _raises(r"x must be float32, bfloat16 or float16, got Double", norm, x.double(), None, w, None, 1e-5, True)
    _raises(r"residual must have x's dtype Float, got BFloat16", norm, x, x.to(BF16), w, None, 1e-5, True)
    _raises(r"residual must have x's shape \[3, 8\], got \[3, 7\]", norm, x, x[:, :7], w, None, 1e-5, True)
    _raises(r"weight must have shape \(8,\) for x's last dim 8, got \[7\]", norm, x, None, w[:7], None, 1e-5, True)
    _raises(r"weight must be float32, bfloat16 or float16, got Double", norm, x, None, w.double(), None, 1e-5, True)
    _raises(r"bias must have weight's dtype Float, got Half", norm, x, None, w, w.half(), 1e-5, False)
    _raises(r"bias must have shape \(8,\) for x's last dim 8, got \[2, 4\]", norm, x, None, w, w.view(2, 4), 1e-5,
            False)
    _raises(r"eps must be a non-negative number, got -1", norm, x, None, w, None, -1.0, True)
    bwd = _ops().norm_bwd
    _raises(r"norm_bwd: h must have at least 1 dim", bwd, torch.tensor(1.0), torch.tensor(1.0), w, None, 1e-5, True,
            False)
    _raises(r"norm_bwd: dy must have h's dtype Float and shape \[3, 8\], got Float \[3, 7\]", bwd, x[:, :7], x, w,
            None, 1e-5, True, False)
    _raises(r"norm_bwd: dh must have h's dtype Float and shape \[3, 8\], got BFloat16", bwd, x, x, w, x.to(BF16),
            1e-5, True, False)
    _raises(r"norm_bwd: h must be float32, bfloat16 or float16, got Double", bwd, x.double(), x.double(), w, None,
            1e-5, True, False)
    _raises(r"norm_bwd: weight must have shape \(8,\) for h's last dim 8, got \[7\]", bwd, x, x, w[:7], None, 1e-5,
            True, False)
    _raises(r"norm_bwd: eps must be a non-negative number, got -1", bwd, x, x, w, None, -1.0, True, False)


def test_rope_errors():
    rope = _ops().rope_fwd
    x = torch.randn(2, 3, 4, 16)
    cos, sin = reference.rope_cos_sin(torch.arange(3), 16)
    _raises(r"x must be 4-D \(batch, seqlen, heads, head_dim\), got shape \[3, 4, 16\]", rope, x[0], cos, sin, False)
    _raises(r"x must be 4-D", rope, torch.tensor(1.0), cos, sin, False)
    _raises(r"dtype must be float32, bfloat16 or float16, got Double", rope, x.double(), cos.double(),
            sin.double(), False)
    _raises(r"head_dim \(x's last dim\) must be even, got 15", rope, x[..., :15], cos[:, :15], sin[:, :15], False)
    _raises(r"cos must have x's dtype Float, got BFloat16", rope, x, cos.to(BF16), sin, False)
    _raises(r"cos must have shape \(3, 16\) or \(2, 3, 16\) for x of shape \[2, 3, 4, 16\], got \[2, 16\]", rope,
            x, cos[:2], sin, False)
    _raises(r"sin must have shape \(3, 16\) or \(2, 3, 16\)", rope, x, cos, sin.expand(3, 3, 16), False)
    _raises(r"sin must have cos's shape \[2, 3, 16\], got \[3, 16\]", rope, x, cos.expand(2, 3, 16), sin, False)


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


# (leading dims, d, intermediate, d_out): odd sizes (vector tails), a single token and a few (matrix-vector path),
# one token block, and GELU blocks of different sizes (600 tokens, an 8 MB fp32 block budget at intermediate 4100:
# 511 + 89; SwiGLU keeps two buffers: 255 + 255 + 90)
FFN_SHAPES = [((5,), 40, 72, 40), ((1,), 64, 256, 64), ((2, 33), 24, 2056, 17), ((70,), 48, 1100, 48),
              ((600,), 16, 4100, 16)]


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


def _act_grads(kind, dh, *pre):
    """(activation gradients..., activation) by autograd through torch's own gelu / silu, in the inputs' dtype."""
    pre = [t.detach().requires_grad_() for t in pre]
    h = torch.nn.functional.gelu(pre[0], approximate="tanh") if kind == "gelu" else \
        torch.nn.functional.silu(pre[0]) * pre[1]
    return (*torch.autograd.grad(h, pre, dh), h.detach())


@pytest.mark.parametrize("dtype", [F32, BF16, F16], ids=str)
@pytest.mark.parametrize("n", [1, 13, 4099])
def test_activation_backward_rule(dtype, n):
    """gelu_bwd / swiglu_bwd (one fused pass) against autograd through torch's gelu / silu in float64 and in the
    input dtype; odd lengths exercise the vector tails, and |x| reaches 12 (saturated tanh and sigmoid, where
    1 + tanh cancels)."""
    a = (torch.randn(3, n) * 4).clamp(-12, 12).to(dtype)
    g, u, dh = (torch.randn(3, n) * 3).to(dtype), torch.randn(3, n).to(dtype), torch.randn(3, n).to(dtype)
    for kind, got, pre in (("gelu", _ops().gelu_bwd(dh, a), (a,)), ("swiglu", _ops().swiglu_bwd(dh, g, u), (g, u))):
        want64 = _act_grads(kind, dh.double(), *(t.double() for t in pre))
        for name, out, ref64, ref in zip(("grad", "grad", "act")[-len(got):], got, want64, _act_grads(kind, dh, *pre)):
            check_rule(f"{kind}_bwd {name}", out, ref64, ref)
    _raises(r"every input must be a CPU Float tensor of dh's shape \[3, 4\]", _ops().swiglu_bwd,
            torch.randn(3, 4), torch.randn(3, 4), torch.randn(3, 5))
    _raises(r"dtype must be float32, bfloat16 or float16, got Double", _ops().gelu_bwd, torch.randn(2).double(),
            torch.randn(2).double())


def test_mlp_strided_bias_few_tokens():
    """The matrix-vector path reads b_fc itself: an expanded (stride-0) and a strided bias."""
    x, w_fc, _, w_proj, b_proj, res = _gelu_case((3,), 24, 40, 24, F32, True, True)
    for b_fc in (torch.randn(1).expand(40), torch.randn(80)[::2]):
        args = (x, w_fc, b_fc, w_proj, b_proj, res)
        check_rule("mlp_gelu strided bias", _ops().mlp_gelu(*args), reference.mlp_gelu(*map(_f64, args)),
                   reference.mlp_gelu(*args))


def test_mlp_strided_and_empty():
    x = torch.randn(8, 20, 2)[..., 0]  # (8, 20), row stride 40
    args = _gelu_case((8,), 20, 72, 20, F32, True, True)
    args = (x, *args[1:5], torch.randn(20, 8).t())
    check_rule("mlp_gelu strided", _ops().mlp_gelu(*args), reference.mlp_gelu(*map(_f64, args)),
               reference.mlp_gelu(*args))
    empty = torch.randn(0, 3, 20)
    assert _ops().mlp_gelu(empty, *args[1:5], None).shape == (0, 3, 20)
    assert _ops().mlp_swiglu(empty, args[1], args[1], args[3], None).shape == (0, 3, 20)


@pytest.mark.parametrize("lead", [(3,), (20,), (2, 10)])     # the matrix-vector path and the block path
def test_mlp_residual_with_padded_rows(lead):
    """A residual whose rows are padded (row stride d_out + 8, last dim contiguous) is read in place, by its stride."""
    x, w1, b1, w2, b2, _ = _gelu_case(lead, 24, 40, 17, F32, True, False)
    res = torch.randn(*lead, 25)[..., :17]
    args = (x, w1, b1, w2, b2, res)
    check_rule("mlp_gelu padded residual", _ops().mlp_gelu(*args), reference.mlp_gelu(*map(_f64, args)),
               reference.mlp_gelu(*args))
    w_gate = torch.randn(40, 24) / math.sqrt(24)
    args = (x, w_gate, w1, w2, res)
    check_rule("mlp_swiglu padded residual", _ops().mlp_swiglu(*args), reference.mlp_swiglu(*map(_f64, args)),
               reference.mlp_swiglu(*args))


@pytest.mark.parametrize("tokens", [3, 16, 20])              # the matrix-vector path (up to 16 rows) and the block path
@pytest.mark.parametrize("strided", ["w_fc", "w_proj", "w_gate", "w_up", "w_down"])
def test_mlp_transposed_weights(tokens, strided):
    """Each weight in turn a transposed view (column-major): the kernels take strided weights on every path."""
    x, w1, b1, w2, b2, res = _gelu_case((tokens,), 24, 40, 24, F32, True, True)
    w_gate = (torch.randn(40, 24) / math.sqrt(24))

    def t(w, name):
        return w.t().contiguous().t() if name == strided else w
    if strided in ("w_fc", "w_proj"):
        args = (x, t(w1, "w_fc"), b1, t(w2, "w_proj"), b2, res)
        op, ref = _ops().mlp_gelu, reference.mlp_gelu
    else:
        args = (x, t(w_gate, "w_gate"), t(w1, "w_up"), t(w2, "w_down"), res)
        op, ref = _ops().mlp_swiglu, reference.mlp_swiglu
    assert not all(a.is_contiguous() for a in args if a is not None)
    check_rule(f"strided {strided}", op(*args), ref(*map(_f64, args)), ref(*args))


def test_mlp_zero_hidden():
    """x (..., 0): the up-projections are 0, so the output is bias / activation(0) / residual only."""
    x = torch.randn(2, 3, 0)
    args = (x, torch.randn(5, 0), torch.randn(5), torch.randn(4, 5), torch.randn(4), torch.randn(2, 3, 4))
    check_rule("mlp_gelu d=0", _ops().mlp_gelu(*args), reference.mlp_gelu(*map(_f64, args)), reference.mlp_gelu(*args))
    sw = (x, torch.randn(5, 0), torch.randn(5, 0), torch.randn(4, 5))
    assert torch.equal(_ops().mlp_swiglu(*sw, None), torch.zeros(2, 3, 4))


@pytest.mark.parametrize("tokens", [3, 20])                 # the matrix-vector path and the block path
def test_mlp_zero_intermediate(tokens):
    """intermediate 0: the down-projection sums nothing; the output is b_proj (+ residual)."""
    x, res = torch.randn(tokens, 8), torch.randn(tokens, 5)
    b = torch.randn(5)
    out = _ops().mlp_gelu(x, torch.randn(0, 8), torch.randn(0), torch.randn(5, 0), b, res)
    torch.testing.assert_close(out, b + res)
    out = _ops().mlp_swiglu(x, torch.randn(0, 8), torch.randn(0, 8), torch.randn(5, 0), res)
    assert torch.equal(out, res)


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

# (leading dims of x, in_features, out_features): the matrix-vector path (<= 16 rows: 1, 6, 7, 15 and 16 rows go
# through the 4-, 2- and 1-row dot products; in_features not a whole number of vectors or of unrolled blocks; one
# output) and the packed GEMM above it (17 rows, one past the path's limit; rows not a multiple of the 6-row block,
# columns not of the 16-column panel, a reduction of 600 = 256 + 256 + 88 in three partial sums; 100 rows, more than
# one row chunk, against 200 columns in panel groups whose last group and last panel are partial)
LINEAR_SHAPES = [((1,), 40, 1000), ((2, 3), 20, 7), ((7,), 72, 1), ((1, 8), 1, 13), ((15,), 40, 33), ((2, 8), 36, 9),
                 ((17,), 40, 33), ((3, 50), 24, 17), ((19,), 600, 20), ((100,), 300, 200)]


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
    for weight in (w, torch.randn(40, 24).t(), w[::2]):     # rows contiguous; transposed; row stride 80
        check_rule("linear strided", _ops().linear(x, weight, None),
                   torch.nn.functional.linear(x.double(), weight.double()), torch.nn.functional.linear(x, weight))
    assert _ops().linear(torch.randn(0, 4, 40), w, None).shape == (0, 4, 24)
    b = torch.randn(24)
    assert torch.equal(_ops().linear(torch.randn(2, 0), torch.randn(24, 0), b), b.expand(2, 24))
    assert torch.equal(_ops().linear(torch.randn(2, 0), torch.randn(24, 0), None), torch.zeros(2, 24))


def _thp_mode() -> str:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return f.read().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        return "unavailable"


def _advised_for_huge_pages(t: torch.Tensor) -> bool | None:
    """Whether a mapping of /proc/self/smaps that overlaps t's memory is advised for huge pages ("hg" in its VmFlags;
    None where smaps shows no VmFlags)."""
    begin, end = t.data_ptr(), t.data_ptr() + t.nbytes
    advised, inside = None, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and all(c in "0123456789abcdef-" for c in head):
                lo, hi = (int(a, 16) for a in head.split("-"))
                inside = lo < end and begin < hi
            elif inside and head == "VmFlags:":
                advised = bool(advised) or "hg" in line.split()[1:]
    return advised


@pytest.mark.parametrize("huge_pages", ["", "on", "off"])
def test_linear_large_output(monkeypatch, huge_pages):
    """With FASTLM_CPU_HUGE_PAGES=on an output of 16 MB or more is advised for transparent huge pages
    (csrc/cpu/output.h), by default and with "off" it is not; the values must not depend on it. 1030 x 8200 fp32:
    33.8 MB. What is checked is the advice (madvise(MADV_HUGEPAGE) marks the mapping "hg"): whether the system then
    backs it with huge pages depends on its free memory at that moment, not on fastlm."""
    monkeypatch.setenv("FASTLM_CPU_HUGE_PAGES", huge_pages)
    x, w, b = torch.randn(1030, 24), torch.randn(8200, 24) / 5, torch.randn(8200)
    out = _ops().linear(x, w, b)
    check_rule("linear large", out, torch.nn.functional.linear(x.double(), w.double(), b.double()),
               torch.nn.functional.linear(x, w, b))
    if _thp_mode() == "unavailable":
        pytest.skip("no transparent huge pages here (/sys/kernel/mm/transparent_hugepage): the values are checked, "
                    "the advice cannot be")
    advised = _advised_for_huge_pages(out)
    if advised is None:
        pytest.skip("/proc/self/smaps shows no VmFlags here: the values are checked, the advice cannot be")
    assert advised == (huge_pages == "on"), f"FASTLM_CPU_HUGE_PAGES={huge_pages!r}: 'hg' in the smaps VmFlags " \
                                            f"of the large output is {advised}"


def test_huge_pages_switch_refuses_other_values(monkeypatch):
    monkeypatch.setenv("FASTLM_CPU_HUGE_PAGES", "yes")
    with pytest.raises(ValueError, match=r"FASTLM_CPU_HUGE_PAGES must be off or on, got 'yes'"):
        _ops().linear(torch.randn(1030, 24), torch.randn(8200, 24), None)


def test_linear_errors():
    x, w = torch.randn(3, 8), torch.randn(5, 8)
    _raises(r"weight must be \(out_features, 8\) for x's last dim 8, got \[5, 7\]", _ops().linear, x, w[:, :7], None)
    _raises(r"weight must be 2-D", _ops().linear, x, w[0], None)
    _raises(r"x must have at least 1 dim", _ops().linear, torch.tensor(1.0), w, None)
    _raises(r"weight must have x's dtype", _ops().linear, x, w.to(BF16), None)
    _raises(r"dtype must be float32, bfloat16 or float16, got Double", _ops().linear, x.double(), w.double(), None)
    _raises(r"bias must be a CPU Float tensor of shape \(5,\)", _ops().linear, x, w, torch.randn(4))


# ---- norms and RoPE --------------------------------------------------------------------------------------------------

def _norm_ref(x, residual, weight, bias, is_rms):
    """(y, h) of the reference, h None without a residual."""
    kind, eps = ("rms", 1e-6) if is_rms else ("layer", 1e-5)
    if residual is not None:
        return reference.add_norm(x, residual, weight, bias, eps, kind=kind)
    return reference.rms_norm(x, weight, eps) if is_rms else reference.layer_norm(x, weight, bias, eps), None


def _norm_check(x, residual, weight, bias, is_rms):
    y, h = _ops().norm_fwd(x, residual, weight, bias, 1e-6 if is_rms else 1e-5, is_rms)
    assert y.dtype == x.dtype and y.shape == x.shape and y.is_contiguous() and torch.isfinite(y).all()
    y_low, h_low = _norm_ref(x, residual, weight, bias, is_rms)
    check_rule("norm_fwd", y, _norm_ref(*map(_f64, (x, residual, weight, bias)), is_rms)[0], y_low)
    if residual is None:
        assert h.shape == (0,)
    else:
        assert torch.equal(h, h_low)  # x + residual rounded to x's dtype, as torch's add rounds it


# (residual, bias, is_rms)
NORM_KINDS = {"rms": (False, False, True), "add_rms": (True, False, True), "layer": (False, True, False),
              "layer_no_bias": (False, False, False), "add_layer": (True, True, False),
              "add_layer_no_bias": (True, False, False)}


@pytest.mark.parametrize("dtype", [F32, BF16, F16], ids=str)
@pytest.mark.parametrize("d", [1, 7, 40, 96, 1000, 4099])   # single element, vector tails, several vectors per row
@pytest.mark.parametrize("rows", [1, 3, 129])                # 129 rows of the wide sizes split across threads
@pytest.mark.parametrize("kind", NORM_KINDS)
def test_norm_rule(kind, rows, d, dtype):
    residual, bias, is_rms = NORM_KINDS[kind]
    _norm_check(torch.randn(rows, d).to(dtype), torch.randn(rows, d).to(dtype) if residual else None,
                (1.0 + 0.5 * torch.randn(d)).to(dtype), torch.randn(d).to(dtype) if bias else None, is_rms)


@pytest.mark.parametrize("x_dtype, w_dtype", [(x, w) for x in (F32, BF16, F16) for w in (F32, BF16, F16) if x != w],
                         ids=str)
def test_norm_weight_dtype_differs(x_dtype, w_dtype):
    x, r = torch.randn(5, 72).to(x_dtype), torch.randn(5, 72).to(x_dtype)
    w, b = (1.0 + 0.5 * torch.randn(72)).to(w_dtype), torch.randn(72).to(w_dtype)
    _norm_check(x, r, w, b, False)
    _norm_check(x, None, w, None, True)


def test_norm_strided():
    w, b = 1.0 + 0.5 * torch.randn(40), torch.randn(40)
    xs = [torch.randn(5, 7, 96)[..., 3:43],                   # rows 96 apart: read in place
          torch.randn(7, 5, 40).transpose(0, 1),              # leading dims that do not collapse into one stride
          torch.randn(40, 35).t(),                            # strided last dim
          torch.randn(40)]                                    # a single row
    for x in xs:
        r = torch.randn(*x.shape, 2)[..., 1]                  # residual with a strided last dim
        for residual, bias, is_rms in NORM_KINDS.values():
            _norm_check(x, r if residual else None, w, b if bias else None, is_rms)
    y, h = _ops().norm_fwd(torch.randn(0, 3, 40), torch.randn(0, 3, 40), w, b, 1e-5, False)
    assert y.shape == h.shape == (0, 3, 40)
    y, h = _ops().norm_fwd(torch.randn(3, 0), None, torch.randn(0), None, 1e-6, True)
    assert y.shape == (3, 0) and h.shape == (0,)


def _rope_check(x, cos, sin, inverse=False):
    out = _ops().rope_fwd(x, cos, sin, inverse)
    assert out.dtype == x.dtype and out.shape == x.shape and out.is_contiguous() and torch.isfinite(out).all()
    s = -sin if inverse else sin  # the transposed rotation by Hugging Face tables (equal halves) is by -sin
    check_rule("rope_fwd", out, reference.apply_rope(x.double(), cos.double(), s.double()),
               reference.apply_rope(x, cos, s))
    return out


@pytest.mark.parametrize("dtype", [F32, BF16, F16], ids=str)
@pytest.mark.parametrize("D", [2, 16, 40, 96, 128])         # a tail-only half, vector tails, whole vectors
@pytest.mark.parametrize("per_sequence", [False, True])      # (S, D) or (B, S, D) tables
@pytest.mark.parametrize("inverse", [False, True])
def test_rope_rule(dtype, D, per_sequence, inverse):
    B, S, H = 3, 7, 5
    pos = torch.arange(S) + 11
    if per_sequence:
        pos = torch.stack([pos + off for off in (0, 5, 300)]).reshape(-1)
    cos, sin = reference.rope_cos_sin(pos, D, 10000.0, dtype)
    if per_sequence:
        cos, sin = cos.view(B, S, D), sin.view(B, S, D)
    _rope_check(torch.randn(B, S, H, D).to(dtype), cos, sin, inverse)


def test_rope_strided():
    B, S, H, D = 2, 9, 4, 40
    cos, sin = reference.rope_cos_sin(torch.arange(S), D)
    qkv = torch.randn(B, S, 3, H, D)                          # a fused projection: q, k, v are strided views
    wide = torch.empty(S, 2, D)                                # tables with rows 2 D apart
    wide[:, 0], wide[:, 1] = cos, sin
    for x in (qkv[:, :, 1], torch.randn(B, H, S, D).transpose(1, 2), torch.randn(B, S, H, 2 * D)[..., ::2]):
        for inverse in (False, True):
            _rope_check(x, cos, sin, inverse)
            _rope_check(x, wide[:, 0], wide[:, 1], inverse)
            _rope_check(x, cos, wide[:, 1], inverse)              # cos and sin with different row strides
            _rope_check(x, wide[:, 0], sin, inverse)
    assert _ops().rope_fwd(torch.randn(0, S, H, D), cos, sin, False).shape == (0, S, H, D)


def test_rope_inverse_is_the_transpose():
    """For any tables, inverse=True is the transposed rotation (the vector-Jacobian product of the forward), and for
    Hugging Face tables it undoes the forward."""
    x, g = torch.randn(2, 7, 3, 40), torch.randn(2, 7, 3, 40)
    cos, sin = torch.randn(7, 40), torch.randn(7, 40)         # halves differ
    vjps = []
    for dtype in (torch.float64, F32):
        xr = x.to(dtype).requires_grad_()
        vjps.append(torch.autograd.grad(reference.apply_rope(xr, cos.to(dtype), sin.to(dtype)), xr, g.to(dtype))[0])
    check_rule("rope_fwd(inverse) = transpose", _ops().rope_fwd(g, cos, sin, True), *vjps)

    cos, sin = reference.rope_cos_sin(torch.arange(7) + 1000, 40)
    round_trip = _ops().rope_fwd(_ops().rope_fwd(x, cos, sin, False), cos, sin, True)
    ref = [reference.apply_rope(reference.apply_rope(x.to(t), cos.to(t), sin.to(t)), cos.to(t), -sin.to(t))
           for t in (torch.float64, F32)]
    check_rule("rope_fwd round trip", round_trip, *ref)


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
    # storage (B, H, S, D) viewed as (B, S, H, D); 130 queries/keys span three 64-row blocks; D = 72 has a vector tail
    # on AVX-512 (16 floats) but not on AVX2 (8): test_attention.py's CPU_CASES have tails on both
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


@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
def test_attention_single_key_rows_are_exact(dtype):
    """A query that sees exactly one key (the first row under a causal mask, every row with window (0, 0)) gets that
    key's value row exactly, and its score's gradient cancels exactly (dq = 0, no dk), as the reference's softmax of
    one element gives, at any logit size: the running maximum's own exponent is exactly 0, and delta = dO . O sums as
    the tile product forms dP."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 70, 2, 40, dtype=dtype) * 3 for _ in range(3))
    dout = torch.randn(2, 70, 2, 40, dtype=dtype)
    for causal, window in ((True, (-1, -1)), (False, (0, 0))):
        out, lse = _ops().attention_fwd(q, k, v, causal, 1.0, *window)
        one = slice(0, 1) if causal else slice(None)  # the rows that see one key
        assert torch.equal(out[:, one], v[:, one])
        dq, dk, _ = _ops().attention_bwd(dout, q, k, v, out, lse, None, causal, 1.0, *window)
        assert torch.equal(dq[:, one], torch.zeros_like(dq[:, one]))
        if not causal:
            assert torch.equal(dk, torch.zeros_like(dk))


def test_attention_empty_rows_and_sizes():
    # causal with Sk < Sq: the first Sq - Sk queries see no key -> out 0, lse -inf
    q, k, v = torch.randn(1, 70, 2, 16), torch.randn(1, 6, 2, 16), torch.randn(1, 6, 2, 16)
    out, lse = _attention_check(q, k, v, True, 0.25, (-1, -1))
    assert torch.equal(out[:, :64], torch.zeros(1, 64, 2, 16)) and torch.isneginf(lse[:, :, :64]).all()
    out, lse = _ops().attention_fwd(q, k[:, :0], v[:, :0], False, 0.25, -1, -1)
    assert torch.equal(out, torch.zeros_like(q)) and torch.isneginf(lse).all()
    out, lse = _ops().attention_fwd(q[:, :0], k, v, False, 0.25, -1, -1)
    assert out.shape == (1, 0, 2, 16) and lse.shape == (1, 2, 0)


def test_attention_packs_the_visible_keys_or_reads_them_in_place():
    # each thread packs the visible keys of its kv head when they fit its share of 8M floats: 40001 keys of 64 + 64
    # floats (5.1M) do on one thread and are read tile by tile from the inputs on two; both give the same bits, and
    # the output, summed over 626 key tiles (the last one ragged), stays within the rule (one serial chain through
    # every key did not). Then the same with a causal window whose ~35000 visible keys (4.5M floats) still need the
    # reading in place on two threads.
    q, k, v = torch.randn(2, 16, 4, 64), torch.randn(2, 40001, 2, 64), torch.randn(2, 40001, 2, 64)
    for causal, window in ((False, (-1, -1)), (True, (35000, -1))):
        with num_threads(1):
            packed, packed_lse = _attention_check(q, k, v, causal, 0.125, window)
        with num_threads(2):
            in_place, in_place_lse = _ops().attention_fwd(q, k, v, causal, 0.125, window[0], 0 if causal else -1)
        assert torch.equal(packed, in_place) and torch.equal(packed_lse, in_place_lse)
    # only the key tiles some query sees are read: here from key 300 - 16 - 20 = 264 on, in the tile from 256
    q, k, v = torch.randn(1, 16, 2, 32), torch.randn(1, 300, 1, 32), torch.randn(1, 300, 1, 32)
    out, _ = _attention_check(q, k, v, True, 0.3, (20, -1))
    k[:, :256], v[:, :256] = float("nan"), float("nan")
    assert torch.equal(_ops().attention_fwd(q, k, v, True, 0.3, 20, 0)[0], out)


def test_attention_threads_agree():
    # the work split differs with the thread count (set here: the same on every machine), the results do not
    q, k, v = torch.randn(2, 200, 4, 64), torch.randn(2, 200, 2, 64), torch.randn(2, 200, 2, 64)
    results = []
    for threads in (1, 3):
        with num_threads(threads):
            results.append(_ops().attention_fwd(q, k, v, True, 0.125, -1, 0))
    (one, one_lse), (many, many_lse) = results
    assert torch.equal(one, many) and torch.equal(one_lse, many_lse)


@pytest.mark.parametrize("scale", [1.0, 1e20, 1e25, 1e28, 1e29, 1e35])
def test_attention_and_decode_huge_logits(scale):
    """Scaled scores far beyond 2^24 (here up to ~1e35, and ~1e9 from the inputs): the rounding of the running maximum
    exceeds the exponent range there; the row's maximum must still get probability ~1, not underflow to 0/0."""
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 1, 2, 8), torch.randn(1, 5, 2, 8), torch.randn(1, 5, 2, 8)
    out, lse = _ops().attention_fwd(q, k, v, False, scale, -1, -1)
    want = reference.attention(q.double(), k.double(), v.double(), softmax_scale=scale)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    torch.testing.assert_close(out, want.float(), rtol=1e-6, atol=1e-6)
    dec = _ops().decode_attention(q, k, v, torch.tensor([5]), scale)
    torch.testing.assert_close(dec, want.float(), rtol=1e-6, atol=1e-6)
    q, k, v = torch.randn(1, 4, 2, 8) * 3e4, torch.randn(1, 6, 2, 8) * 3e4, torch.randn(1, 6, 2, 8)
    out, _ = _ops().attention_fwd(q, k, v, False, 1.0, -1, -1)
    torch.testing.assert_close(out, reference.attention(q.double(), k.double(), v.double(), softmax_scale=1.0).float(),
                               rtol=1e-6, atol=1e-6)


def test_attention_backward_with_huge_lse_takes_the_reference():
    """Rows whose LSE passes 2^14 / log2(e) (scaled scores of ~1e4 and more) cannot recompute their probabilities
    from the fp32 LSE: ops.attention's backward on the cpu backend gives them the reference's gradients (the C++
    kernel's dv was off by 1.9 at q, k ~ 3e3 x randn); ordinary rows keep the C++ kernel."""
    from fastlm import ops
    torch.manual_seed(0)
    for mult in (3e3, 3e4):
        q, k = (torch.randn(1, 4, 2, 8) * mult).requires_grad_(), (torch.randn(1, 6, 2, 8) * mult).requires_grad_()
        v = torch.randn(1, 6, 2, 8, requires_grad=True)
        got = torch.autograd.grad(ops.attention(q, k, v, softmax_scale=1.0, backend="cpu"), (q, k, v),
                                  torch.ones(1, 4, 2, 8))
        q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
        want = torch.autograd.grad(reference.attention(q64, k64, v64, softmax_scale=1.0), (q64, k64, v64),
                                   torch.ones(1, 4, 2, 8, dtype=torch.float64))
        for g, w in zip(got, want):
            torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-5)
    q, k, v = (torch.randn(1, 4, 2, 8, requires_grad=True) for _ in range(3))
    out = ops.attention(q, k, v, backend="cpu")
    with torch.profiler.profile() as prof:
        out.sum().backward()
    assert "fastlm::attention_bwd" in [e.name for e in prof.events()]


def test_attention_backward_fallback_fp16_past_its_range():
    """fp16 scores past fp16's range (|LSE| ~ 4e4-8e4, finite output): the huge-LSE fallback computes in fp32, as the
    kernels do, so the gradients are finite and within twice the error of the fp32 reference's rounded to fp16 (in
    fp16 PyTorch's own are NaN)."""
    from fastlm import ops
    torch.manual_seed(0)
    for _ in range(3):
        q, k = ((torch.randn(1, 4, 1, 16) * 100).half().requires_grad_() for _ in range(2))
        v = torch.randn(1, 4, 1, 16).half().requires_grad_()
        out = ops.attention(q, k, v, softmax_scale=1.0, backend="cpu")
        dout = torch.randn_like(out)
        got = torch.autograd.grad(out, (q, k, v), dout)
        want64, want32 = ([t.detach().to(dt).requires_grad_() for t in (q, k, v)] for dt in (torch.float64, F32))
        for leaves in (want64, want32):
            leaves[:] = torch.autograd.grad(reference.attention(*leaves, softmax_scale=1.0), leaves,
                                            dout.to(leaves[0].dtype))
        for name, g, w64, w32 in zip("qkv", got, want64, want32):
            assert torch.isfinite(g).all(), f"d{name}: non-finite"
            check_rule(f"d{name}", g, w64, w32.half())


@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
def test_attention_backward_fallback_in_row_blocks(dtype, monkeypatch):
    """The huge-LSE fallback takes the query rows in blocks of about _FALLBACK_SCORES scores (a long sequence's whole
    score matrix would not fit in memory): its gradients pass the rule against the unblocked reference's (the blocks'
    dK, dV summed in fp32), causal and windowed, GQA, with an LSE gradient."""
    attention_op = importlib.import_module("fastlm.ops.attention")     # (fastlm.ops.attention is the function)
    monkeypatch.setattr(attention_op, "_FALLBACK_SCORES", 2 * 4 * 23 * 3)     # blocks of 3 query rows
    blocks = []
    real = reference.masked_attention_backward
    monkeypatch.setattr(reference, "masked_attention_backward",
                        lambda *a, **kw: blocks.append(a[0].shape[1]) or real(*a, **kw))
    torch.manual_seed(0)
    # (q as a (B, H, S, D) tensor's transpose: the gradients come back contiguous, as the op's fake promises)
    q = torch.randn(2, 4, 17, 8).transpose(1, 2) * 3e3
    k, v = torch.randn(2, 23, 2, 8) * 3e3, torch.randn(2, 23, 2, 8)
    dout, dlse = torch.randn(2, 17, 4, 8), torch.randn(2, 4, 17)
    for causal, window in ((True, (-1, 0)), (False, (5, 2))):
        blocks.clear()
        args = [t.to(dtype) for t in (dout, q, k, v)]
        out, lse = _ops().attention_fwd(*args[1:], causal, 1.0, *window)
        got = attention_op._native_bwd(args[0], *args[1:], out, lse, dlse, causal, 1.0, *window)
        assert blocks == [3] * 5 + [2]
        want64, want = (reference.attention_backward(*(t.to(dt) for t in args), causal=causal, softmax_scale=1.0,
                                                     window=window, dlse=dlse.to(dt)) for dt in (torch.float64, dtype))
        for name, g, w64, w in zip("qkv", got, want64, want):
            assert g.dtype == dtype and g.is_contiguous()
            check_rule(f"d{name}", g, w64, w)


@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
def test_decode_nan_query_gives_nan(dtype):
    q, kc = torch.randn(1, 2, 2, 8), torch.randn(1, 700, 1, 8)    # 700 keys: several chunks to combine
    q[0, 1, 0, 0] = float("nan")
    out = _ops().decode_attention(q.to(dtype), kc.to(dtype), kc.to(dtype), torch.tensor([700]), 0.3)
    assert torch.isnan(out[0, 1, 0]).all() and torch.isfinite(out[0, 0]).all() and torch.isfinite(out[0, 1, 1]).all()


def test_attention_window_bounds_beyond_int64_positions():
    """Window bounds of Sq + Sk and more reach every key: even 2^63 - 1 (whose position arithmetic would overflow)
    equals an unbounded window, on the C++ op and through ops.attention on every CPU backend."""
    q, k, v = torch.randn(1, 3, 1, 8), torch.randn(1, 4, 1, 8), torch.randn(1, 4, 1, 8)
    full = _ops().attention_fwd(q, k, v, False, 0.3, -1, -1)[0]
    for left, right in ((-1, 2**63 - 1), (2**63 - 1, -1), (2**63 - 1, 2**63 - 1), (7, 7)):
        assert torch.equal(_ops().attention_fwd(q, k, v, False, 0.3, left, right)[0], full)
    from fastlm import ops
    for backend in ("cpu", "torch"):
        want = ops.attention(q, k, v, backend=backend)
        for window in ((-1, 2**63 - 1), (2**64, 2**70)):
            assert torch.equal(ops.attention(q, k, v, window=window, backend=backend), want)


def test_decode_positions_and_windows_near_int64_max():
    """Sums of a position and a length near 2^63 overflowed: decode_step took input_pos 2^63 - 1 as in range (1 + it
    wrapped) and wrote one cache row before the caches (glibc then aborted at a free), and decode_attention's window
    start for window_left 2^63 - 1 with fewer cached keys than queries wrapped (zeros instead of the keys)."""
    from fastlm import ops
    d, D, V, inter = 16, 16, 10, 8

    def w(*s):
        return torch.randn(*s) / 4
    blocks = [w(d), None, w(D, d), None, w(D, d), None, w(D, d), None, w(d, D), None, w(d), None,
              w(inter, d), None, w(inter, d), w(d, inter), None]
    kc, vc = torch.zeros(1, 9, 1, D), torch.zeros(1, 9, 1, D)
    for pos in (2**63 - 1, 2**63 - 9, 9):
        with pytest.raises(ValueError, match=rf"input_pos\[0\] \+ seqlen = {pos} \+ 1 must lie in \[1, 9\]"):
            ops.decode_step(torch.tensor([[3]]), torch.tensor([pos]), w(V, d), blocks, [kc], [vc], w(d), w(V, d),
                            eps=1e-6, is_rms=True, backend="cpu")
    assert (kc == 0).all() and (vc == 0).all()
    q, k, v = torch.randn(1, 4, 2, 8), torch.randn(1, 6, 1, 8), torch.randn(1, 6, 1, 8)
    lens = torch.tensor([2])                       # 2 keys for 4 queries (2 - 4 - (2^63 - 1) wraps): 2 see none
    full = _ops().decode_attention(q, k, v, lens, 0.3, -1)
    for window_left in (6, 2**62, 2**63 - 2, 2**63 - 1):
        assert torch.equal(_ops().decode_attention(q, k, v, lens, 0.3, window_left), full), window_left


def test_cross_entropy_vocab_of_one_any_stride():
    # a (N, 1) logits tensor's last-dim stride is meaningless (a transposed (1, N) one has N): taken as it is
    logits, t = torch.randn(1, 4).t(), torch.zeros(4, dtype=torch.long)
    from fastlm import ops
    assert torch.equal(ops.cross_entropy(logits, t, backend="cpu"), ops.cross_entropy(logits, t, backend="torch"))


def test_ops_feed_the_kernels_unit_stride_rows():
    """The C++ kernels read rows with unit stride along the head dim; ops.attention / ops.decode_attention copy an
    input whose head dim is strided, so backend="cpu" accepts any strides, as the other backends do."""
    from fastlm import ops
    q, k, v = (torch.randn(1, 5, 2, 32)[..., ::2] for _ in range(3))
    check_rule("attention strided head dim", ops.attention(q, k, v, backend="cpu"),
               reference.attention(q.double(), k.double(), v.double()), reference.attention(q, k, v))
    lens = torch.tensor([5])
    check_rule("decode strided head dim", ops.decode_attention(q[:, :1], k, v, lens, backend="cpu"),
               reference.decode_attention(q[:, :1].double(), k.double(), v.double(), lens),
               reference.decode_attention(q[:, :1], k, v, lens))


@pytest.mark.parametrize("Hkv,D,dtype", [(8, 128, F32), (8, 128, BF16), (4, 64, F32), (2, 40, F32), (1, 16, BF16),
                                         (3, 20, F16)], ids=str)
def test_decode_rows_sharing_pages(Hkv, D, dtype):
    # cache rows of 4 KB down to 32 B: 1, 2, 4, 8 and 16 rows per page, each walked in its page order (decode.cpp);
    # several chunks, blocks cut short by the length, new queries that see fewer keys than a whole last block holds
    # (length 512)
    B, Sq, S_max = 4, 2, 700
    q = torch.randn(B, Sq, 2 * Hkv, D).to(dtype)
    kc, vc = (torch.randn(B, S_max, Hkv, D).to(dtype) for _ in range(2))
    lens = torch.tensor([700, 517, 512, 37])
    out = _ops().decode_attention(q, kc, vc, lens, D ** -0.5)
    r64 = reference.decode_attention(q.double(), kc.double(), vc.double(), lens)
    check_rule("decode", out, r64, reference.decode_attention(q, kc, vc, lens))


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


@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
@pytest.mark.parametrize("where", ["q", "k"])
def test_attention_nan_input_gives_nan(dtype, where):
    """A NaN in a query (or key) makes that query's (or every query that sees the key's) output and LSE NaN, as
    torch's softmax does, also where masked scores follow it in a tile (the diagonal tile of a causal mask, whose
    running maximum took the -inf after the NaN); the other rows stay finite."""
    q, k, v = (torch.randn(1, 70, 2, 16, dtype=dtype) for _ in range(3))
    (q if where == "q" else k)[0, 5, 1, 3] = float("nan")
    out, lse = ops.attention(q, k, v, causal=True, return_lse=True, backend="cpu")
    ref, ref_lse = reference.attention(q.double(), k.double(), v.double(), causal=True, return_lse=True)
    assert torch.equal(torch.isnan(out), torch.isnan(ref)) and torch.equal(torch.isnan(lse), torch.isnan(ref_lse))
    assert torch.isnan(lse).sum() == (1 if where == "q" else 70 - 5)


def test_cross_entropy_nan_logit_gives_nan_lse():
    logits = torch.full((2, 20), float("-inf"))
    logits[0, 0], logits[1] = float("nan"), torch.randn(20)
    loss, lse = _ops().cross_entropy_fwd(logits, torch.tensor([3, 3]), -100)
    assert torch.isnan(lse[0]) and torch.isnan(loss[0]) and torch.isfinite(lse[1]) and torch.isfinite(loss[1])


@pytest.mark.parametrize("shift", [100.0, 1000.0, -3000.0])
def test_cross_entropy_gradient_next_to_a_large_lse(shift):
    """Logits far from 0 (|lse| of 100-3000): the gradient's probabilities are formed from the row's max and log-sum,
    not from the rounded lse (which moved each one by up to half an ulp of |lse|: 3.5e-6 off at a shift of 100 where
    torch errs by 7.5e-8); by the rule for the separate backward and the fused (in-place) one."""
    logits, t = torch.randn(64, 50) * 2 + shift, torch.randint(0, 50, (64,))
    g = torch.randn(64)
    x64 = logits.double().requires_grad_()
    want64 = torch.autograd.grad((torch.nn.functional.cross_entropy(x64, t, reduction="none") * g.double()).sum(),
                                 x64)[0]
    x32 = logits.clone().requires_grad_()
    want32 = torch.autograd.grad((torch.nn.functional.cross_entropy(x32, t, reduction="none") * g).sum(), x32)[0]
    _, lse = _ops().cross_entropy_fwd(logits, t, -100)
    check_rule("cross_entropy_bwd", _ops().cross_entropy_bwd(g, logits, t, lse, -100), want64, want32)
    fused = logits.clone()
    _ops().cross_entropy_fused_(fused, t, -100, g)
    check_rule("cross_entropy_fused_", fused, want64, want32)


def test_activations_of_huge_negative_inputs():
    """gelu and silu of x << 0 are -0 (the logistic underflows to 0), not x / (1 + 2^126): finite garbage from
    |x| ~ 1e30 on (gelu_bwd's h was -3.5 at x = -3e38) and NaN through the SwiGLU MLP."""
    x = torch.tensor([-3e38, -1e36, -1e32, -90.0, 0.5])
    _, h = _ops().gelu_bwd(torch.ones(5), x)
    torch.testing.assert_close(h, torch.nn.functional.gelu(x.double(), approximate="tanh").float())
    _, _, h = _ops().swiglu_bwd(torch.ones(5), x, torch.ones(5))
    torch.testing.assert_close(h, torch.nn.functional.silu(x.double()).float())
    eye = torch.eye(5)
    out = _ops().mlp_swiglu(x[None], eye, eye, eye, None)                 # silu(x) * x
    torch.testing.assert_close(out[0], (torch.nn.functional.silu(x.double()) * x.double()).float())
    out = _ops().mlp_gelu(x[None], eye, None, eye, None, None)
    torch.testing.assert_close(out[0], torch.nn.functional.gelu(x.double(), approximate="tanh").float())


def test_in_place_ops_refuse_overlapping_but_take_strided_tensors():
    """cross_entropy_fused_ (logits overwritten) and decode_step (caches written) refuse tensors whose elements
    overlap, an unfolded one too (ATen calls its overlap "too hard" to tell; it gave losses 1.9 off), and take
    non-overlapping ones that are not dense (a slice of a larger buffer)."""
    t = torch.randint(0, 16, (22,))
    with pytest.raises(RuntimeError, match="their elements must not overlap"):
        _ops().cross_entropy_fused_(torch.randn(100).unfold(0, 16, 4), t, -100, None)
    rows = torch.randn(44, 16)[::2]                                  # every other row: strided, not overlapping
    want, _ = _ops().cross_entropy_fwd(rows, t, -100)
    loss, _ = _ops().cross_entropy_fused_(rows, t, -100, None)
    assert torch.equal(loss, want)
    args = list(_decode_step_args())
    want = _ops().decode_step(*args)
    args[7], args[8] = ([torch.zeros(2, 12, 1, 8)[:, :9]] for _ in range(2))   # views into longer caches
    assert torch.equal(_ops().decode_step(*args), want)
    args[7] = [torch.zeros(2, 10, 1, 8).as_strided((2, 9, 1, 8), (80, 4, 8, 1))]   # rows overlap
    with pytest.raises(RuntimeError, match="the KV caches are written in place, so their elements must not overlap"):
        _ops().decode_step(*args)


def test_decode_step_table_dtypes():
    """pos_emb (and the RoPE tables) in another dtype than tok_emb: an error before any cache is written (a bf16
    model with an fp32 pos_emb promoted its hidden state to fp32, whose keys were then copied into the bf16 caches
    with fp32 row lengths, past the caches' ends)."""
    args = list(_decode_step_args())
    cos = args[4]
    args[4] = cos.double()
    before = args[7][0].clone()
    with pytest.raises(RuntimeError, match="rope_cos must have tok_emb's dtype Float, got Double"):
        _ops().decode_step(*args)
    args[4], args[3] = cos, torch.randn(9, 16, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="pos_emb must have tok_emb's dtype Float, got Double"):
        _ops().decode_step(*args)
    assert torch.equal(args[7][0], before)


@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
def test_attention_forward_with_key_tiles_packed_per_query_block(dtype):
    """A kv head whose keys exceed a thread's share of the packing budget (8M floats over min(threads, 16)) is not
    packed whole: each key tile is packed when a query block needs it (fp32 rows, or bf16 words on the dot
    products). 16 threads bring the share down to 512K floats, which 2100 keys of head dim 128 pass."""
    with num_threads(16):
        for sq, sk, d, causal in ((70, 2100, 128, True), (33, 2111, 127, False)):
            q = torch.randn(1, sq, 2, d).to(dtype)
            k, v = (torch.randn(1, sk, 1, d).to(dtype) for _ in range(2))
            ref64 = reference.attention(q.double(), k.double(), v.double(), causal=causal)
            out = ops.attention(q, k, v, causal=causal, backend="cpu")
            check_rule(f"out {sq}x{sk} D{d}", out, ref64, reference.attention(q, k, v, causal=causal))
