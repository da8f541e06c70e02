"""torch.library integration of the norm, RoPE, MLP, cross-entropy and attention ops: opcheck of every custom op
(schema, fake tensor, autograd registration, AOT dispatch), and torch.compile(fullgraph=True) of forward + backward of
each public op with the torch and triton backends, and the C++ CPU backend where the extension has the op, compared
with eager.
Compilation uses the aot_eager backend (dynamo + AOTAutograd + fake tensors, which is where custom ops can break);
inductor's C++ codegen adds nothing for opaque custom ops and costs seconds per graph on a CPU."""
import importlib

import pytest
import torch

from conftest import DEVICE
from fastlm import backends

# the modules, not the same-named public functions that fastlm.ops binds
attn_ops = importlib.import_module("fastlm.ops.attention")
ce_ops = importlib.import_module("fastlm.ops.cross_entropy")
ffn_ops = importlib.import_module("fastlm.ops.ffn")
norm_ops = importlib.import_module("fastlm.ops.norm")
rope_ops = importlib.import_module("fastlm.ops.rope")
linear_ops = importlib.import_module("fastlm.ops.linear")


def _r(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype, device=DEVICE)


def _opcheck_cases():
    x, r, w, b = _r(5, 40), _r(5, 40), _r(40), _r(40)
    h, mean, rstd = x + r, _r(5), _r(5).abs() + 0.5
    cos, sin = rope_ops.rope_cos_sin(torch.arange(3, device=DEVICE), 16)
    logits, t = _r(5, 300), torch.randint(0, 300, (5,), device=DEVICE)
    t[0] = -100
    lse = torch.logsumexp(logits, -1)
    w1, b1, w2 = _r(24, 40), _r(24), _r(40, 24)
    return [
        ("norm_fwd[layer,residual]", norm_ops._norm_fwd, (x, r, w, b, 1e-5, False)),
        ("norm_fwd[rms]", norm_ops._norm_fwd, (x, None, w, None, 1e-6, True)),
        ("norm_bwd", norm_ops._norm_bwd, (_r(5, 40), h, w, mean, rstd, _r(5, 40), True, False)),
        ("rope", rope_ops._rope, (_r(2, 3, 2, 16), cos, sin, False)),
        ("cross_entropy_fwd", ce_ops._ce_fwd, (logits, t, -100)),
        ("cross_entropy_bwd", ce_ops._ce_bwd, (_r(5), logits, t, lse, -100)),
        ("linear_cross_entropy[mean]", ce_ops._lce, (x, _r(300, 40), None, t, -100, "mean", 2, True, "triton")),
        ("linear_cross_entropy[none]", ce_ops._lce, (x, _r(300, 40), _r(300), t, -100, "none", 2, False, "triton")),
        ("linear_cross_entropy_bwd", ce_ops._lce_bwd, (_r(5), x, _r(300, 40), None, t, -100, 2, "triton")),
        ("mlp_gelu", ffn_ops._tr_gelu, (x, w1, b1, w2, None, r, True)),
        ("gelu_bwd", ffn_ops._tr_gelu_bwd, (_r(5, 24), _r(5, 24))),
        ("mlp_swiglu", ffn_ops._tr_swiglu, (x, w1, _r(24, 40), w2, None, True)),
        ("swiglu_bwd", ffn_ops._tr_swiglu_bwd, (_r(5, 24), _r(5, 24), _r(5, 24))),
        ("attention_bwd", attn_ops._triton_bwd, _attention_bwd_args(_r)),
    ]


def _attention_bwd_args(randn):
    """dout, q, k, v, out, lse, dlse and the flags of an attention backward (GQA, causal, a window)."""
    q, k, v = randn(1, 9, 4, 16), randn(1, 11, 2, 16), randn(1, 11, 2, 16)
    return (randn(1, 9, 4, 16), q, k, v, randn(1, 9, 4, 16), randn(1, 4, 9), randn(1, 4, 9), True, 0.25, 5, 0)


def _native_opcheck_cases():
    """The autograd wrappers (fastlm_native_py::) of the C++ CPU ops, on CPU tensors."""
    x, r, w, b = (torch.randn(*shape) for shape in ((5, 40), (5, 40), (40,), (40,)))
    cos, sin = rope_ops.rope_cos_sin(torch.arange(3), 16)
    logits, t = torch.randn(5, 300), torch.randint(0, 300, (5,))
    t[0] = -100
    return [
        ("cross_entropy", ce_ops._nat_ce, (logits, t, -100), "cross_entropy_fwd"),
        ("linear_cross_entropy[mean]", ce_ops._lce, (x, torch.randn(300, 40), None, t, -100, "mean", 2, True, "cpu"),
         "cross_entropy_fused_"),
        ("linear_cross_entropy_bwd", ce_ops._lce_bwd,
         (torch.randn(5), x, torch.randn(300, 40), None, t, -100, 2, "cpu"), "cross_entropy_fused_"),
        ("norm_fwd[layer,residual]", norm_ops._nat_norm, (x, r, w, b, 1e-5, False), "norm_fwd"),
        ("norm_fwd[rms]", norm_ops._nat_norm, (x, None, w, None, 1e-6, True), "norm_fwd"),
        ("rope", rope_ops._nat_rope, (torch.randn(2, 3, 2, 16), cos, sin, False), "rope_fwd"),
        ("linear", linear_ops._nat_linear, (torch.randn(3, 40), torch.randn(7, 40), torch.randn(7)), "linear"),
        ("attention", attn_ops._native_fwd, (torch.randn(1, 9, 4, 16), torch.randn(1, 11, 2, 16),
                                             torch.randn(1, 11, 2, 16), True, 0.25, -1, 0), "attention_fwd"),
        ("attention_bwd", attn_ops._native_bwd, _attention_bwd_args(torch.randn), "attention_bwd"),
        ("cross_entropy_bwd", ce_ops._nat_ce_bwd, (torch.randn(5), logits, t, torch.logsumexp(logits, -1), -100),
         "cross_entropy_bwd"),
        ("mlp_gelu", ffn_ops._nat_gelu, (x, torch.randn(24, 40), torch.randn(24), torch.randn(40, 24), None, r),
         "gelu_bwd"),
        ("gelu_bwd", ffn_ops._nat_gelu_bwd, (torch.randn(5, 24), torch.randn(5, 24)), "gelu_bwd"),
        ("mlp_swiglu", ffn_ops._nat_swiglu, (x, torch.randn(24, 40), torch.randn(24, 40), torch.randn(40, 24), r),
         "swiglu_bwd"),
        ("swiglu_bwd", ffn_ops._nat_swiglu_bwd, (torch.randn(5, 24), torch.randn(5, 24), torch.randn(5, 24)),
         "swiglu_bwd"),
    ]


def _opcheck(name, op, args):
    # forward ops get a differentiable first input so the autograd registration is exercised; backward ops have
    # no double-backward formula
    if not name.endswith("bwd"):
        args = (args[0].clone().requires_grad_(),) + args[1:]
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration", "test_faketensor",
                                                "test_aot_dispatch_dynamic"))


@pytest.mark.parametrize("name, op, args", _opcheck_cases(), ids=lambda v: v if isinstance(v, str) else "")
def test_opcheck(name, op, args):
    _opcheck(name, op, args)


@pytest.mark.parametrize("name, op, args, native_op", _native_opcheck_cases(),
                         ids=lambda v: v if isinstance(v, str) else "")
def test_opcheck_native(name, op, args, native_op):
    if not backends.extension_has(native_op, "cpu"):
        pytest.skip(f"the C++ extension (fastlm._C) with the CPU {native_op} is not built")
    _opcheck(name, op, args)


def _groups():
    """One function per op family calling each of its public ops, so one compiled graph covers the family."""
    t = torch.randint(0, 300, (2, 3), device=DEVICE)
    t[0, 0] = -100
    cos, sin = rope_ops.rope_cos_sin(torch.arange(3, device=DEVICE), 16)

    def norms(x, r, w, b, backend):
        return (norm_ops.layer_norm(x, w, b, backend=backend), norm_ops.rms_norm(x, w, backend=backend),
                *norm_ops.add_layer_norm(x, r, w, b, backend=backend), *norm_ops.add_rms_norm(x, r, w, backend=backend))

    def rope(q, backend):
        return rope_ops.apply_rope(q, cos.to(q.device), sin.to(q.device), backend=backend)

    def mlps(x, w1, b1, w2, b2, r, wg, backend):
        return (ffn_ops.mlp_gelu(x, w1, b1, w2, b2, r, backend=backend),
                ffn_ops.mlp_swiglu(x, wg, w1, w2, backend=backend))

    def losses(logits, x, w, b, backend):
        tt = t.to(logits.device)
        return (ce_ops.cross_entropy(logits, tt, backend=backend),
                ce_ops.linear_cross_entropy(x, w, tt, chunk_size=4, backend=backend),
                ce_ops.linear_cross_entropy(x, w, tt, b, reduction="none", chunk_size=4, backend=backend))

    def attention(q, k, v, backend):
        return (attn_ops.attention(q, k, v, causal=True, return_lse=True, backend=backend)
                + (attn_ops.attention(q, k, v, window=(3, 2), backend=backend),))

    return [
        ("attention", attention, [_r(2, 9, 4, 16), _r(2, 11, 2, 16), _r(2, 11, 2, 16)]),
        ("norms", norms, [_r(2, 3, 40), _r(2, 3, 40), _r(40), _r(40)]),
        ("rope", rope, [_r(2, 3, 4, 16)]),
        ("mlps", mlps, [_r(2, 3, 40), _r(24, 40), _r(24), _r(40, 24), _r(40), _r(2, 3, 40), _r(24, 40)]),
        ("losses", losses, [_r(2, 3, 300), _r(2, 3, 40), _r(300, 40), _r(300)]),
    ]


def _run(fn, inputs, backend):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves, backend=backend)
    outs = out if isinstance(out, tuple) else (out,)
    loss = sum((o.float() * torch.linspace(-1, 1, o.numel(), device=o.device).view(o.shape)).sum() for o in outs)
    loss.backward()
    return [o.detach() for o in outs] + [t.grad for t in leaves]


def _check_compiled(fn, inputs, backend):
    torch._dynamo.reset()
    eager = _run(fn, inputs, backend)
    compiled = _run(torch.compile(fn, fullgraph=True, backend="aot_eager"), inputs, backend)
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name, fn, inputs", _groups(), ids=lambda v: v if isinstance(v, str) else "")
def test_compile_fullgraph(name, fn, inputs, backend):
    _check_compiled(fn, inputs, backend)


NATIVE_OPS = {"attention": ("attention_fwd", "attention_bwd"), "norms": ("norm_fwd",), "rope": ("rope_fwd",),
              "mlps": ("mlp_gelu", "mlp_swiglu"),
              "losses": ce_ops._NATIVE}


@pytest.mark.parametrize("name, fn, inputs", [g for g in _groups() if g[0] in NATIVE_OPS],
                         ids=lambda v: v if isinstance(v, str) else "")
def test_compile_fullgraph_native(name, fn, inputs):
    if not all(backends.extension_has(op, "cpu") for op in NATIVE_OPS[name]):
        pytest.skip(f"the C++ extension (fastlm._C) with the CPU {', '.join(NATIVE_OPS[name])} is not built")
    _check_compiled(fn, [t.cpu() for t in inputs], "cpu")
