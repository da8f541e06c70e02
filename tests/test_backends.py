"""fastlm.backends: what backend="auto" picks, and that it serves float64 inputs (which no kernel takes) by the
reference for every op instead of failing."""
import pytest
import torch

from conftest import backend_device, needs_cpu_kernel
from fastlm import backends, ops, reference

F64 = torch.float64


def _t(*shape):
    return torch.randn(*shape, dtype=F64)


CASES = {  # op call on float64 inputs, the reference's answer
    "attention": (lambda q, k, v, **kw: ops.attention(q, k, v, causal=True, **kw),
                  lambda q, k, v: reference.attention(q, k, v, causal=True), (_t(1, 5, 2, 8), _t(1, 5, 1, 8),
                                                                             _t(1, 5, 1, 8))),
    "decode_attention": (lambda q, k, v, **kw: ops.decode_attention(q, k, v, torch.tensor([3]), **kw),
                         lambda q, k, v: reference.decode_attention(q, k, v, torch.tensor([3])),
                         (_t(1, 1, 2, 8), _t(1, 4, 1, 8), _t(1, 4, 1, 8))),
    "linear": (ops.linear, torch.nn.functional.linear, (_t(2, 8), _t(3, 8), _t(3))),
    "mlp_swiglu": (ops.mlp_swiglu, reference.mlp_swiglu, (_t(2, 8), _t(12, 8), _t(12, 8), _t(8, 12))),
    "mlp_gelu": (ops.mlp_gelu, reference.mlp_gelu, (_t(2, 8), _t(12, 8), _t(12), _t(8, 12), _t(8))),
    "rms_norm": (ops.rms_norm, reference.rms_norm, (_t(2, 8), _t(8))),
    "rms_norm fp32 x, fp64 weight": (ops.rms_norm, reference.rms_norm, (_t(2, 8).float(), _t(8))),
    "add_layer_norm": (ops.add_layer_norm, lambda x, r, w, b: reference.add_norm(x, r, w, b, 1e-5, kind="layer"),
                       (_t(2, 8), _t(2, 8), _t(8), _t(8))),
    "apply_rope": (ops.apply_rope, reference.apply_rope, (_t(1, 3, 2, 8), _t(3, 8), _t(3, 8))),
    "cross_entropy": (ops.cross_entropy, reference.cross_entropy, (_t(4, 10), torch.tensor([1, 2, 3, 9]))),
}


@pytest.mark.parametrize("name", list(CASES))
def test_auto_serves_float64_by_the_reference(name):
    fn, ref, inputs = CASES[name]
    out, expected = fn(*inputs), ref(*inputs)
    out, expected = (t if isinstance(t, tuple) else (t,) for t in (out, expected))
    for o, e in zip(out, expected):
        assert o.dtype == e.dtype
        torch.testing.assert_close(o, e, rtol=0, atol=0)


def test_resolve_dtype_rule():
    cpu = torch.device("cpu")
    assert backends.resolve("auto", cpu, "linear", native_ops=("linear",), dtype=F64) == "torch"
    if backends.extension_has("linear", "cpu"):
        assert backends.resolve("auto", cpu, "linear", native_ops=("linear",), dtype=torch.bfloat16) == "cpu"
        # (an explicit backend is taken as asked: test_explicit_backends_refuse_what_they_cannot_run)
    # the Triton interpreter computes bf16 wrongly: "auto" takes the reference for an op without a C++ kernel
    if backends.interpreter() and backends.triton_available():
        assert backends.resolve("auto", cpu, "an op", native_ops=(), dtype=torch.float32) == "triton"
        assert backends.resolve("auto", cpu, "an op", native_ops=(), dtype=torch.bfloat16) == "torch"


@pytest.mark.parametrize("name", list(CASES))
def test_explicit_backends_refuse_what_they_cannot_run(name):
    """Every op, named in the error: a backend that is no name, float64 on the C++ CPU kernels (a TypeError naming
    the argument, as the Triton path gives), bf16 on the Triton interpreter (which computes it wrongly)."""
    fn, _, inputs = CASES[name]
    op = name.split()[0]
    for bad in (["cpu"], "tpu", None):
        with pytest.raises(ValueError, match=f"^{op}: backend must be one of"):
            fn(*inputs, backend=bad)
    if backends.extension() is not None:
        with pytest.raises(TypeError, match=f"^{op}: (the cpu backend takes float32/float16/bfloat16 [a-z_]+|.*dtype "
                                            "must be one of .* for backend 'cpu'), got torch.float64"):
            fn(*inputs, backend="cpu")
    if backends.interpreter() and backends.triton_available():
        bf16 = [t.bfloat16() if t.is_floating_point() else t for t in inputs]
        if op == "linear":                                  # (its "triton" path is torch's GEMM, right in bf16)
            torch.testing.assert_close(fn(*bf16, backend="triton"), torch.nn.functional.linear(*bf16))
            return
        with pytest.raises(TypeError, match=f"^{op}: backend='triton' on cpu tensors runs through the Triton "
                                            "interpreter, which computes bfloat16 wrongly"):
            fn(*bf16, backend="triton")


@pytest.mark.skipif(backends.extension() is None, reason="needs the C++ extension")
def test_cuda_backend_for_an_op_without_a_cuda_kernel():
    """backend="cuda" for an op fastlm has no CUDA C++ kernel for says so (no build would add one); for one it has,
    on a build without them, the error says how to build (device type "cuda" asked of the resolver directly)."""
    import os
    import re
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "csrc", "bindings_cuda.cpp")) as f:       # the ops the CUDA build registers
        block = f.read().split("TORCH_LIBRARY_IMPL(fastlm, CUDA, m)")[1].split("}")[0]
    assert tuple(re.findall(r'm\.impl\("(\w+)"', block)) == backends.CUDA_OPS
    backends._resolve.cache_clear()
    with pytest.raises(RuntimeError, match=r"backend='cuda' for rms_norm: fastlm has no CUDA C\+\+ kernel for "
                                           r"norm_fwd \(its CUDA kernels: attention_fwd, decode_attention, mlp_gelu, "
                                           r"mlp_swiglu\); use 'triton' or 'auto'"):
        backends._resolve("cuda", "cuda", "rms_norm", ("norm_fwd",), False)
    if not backends.extension_has("attention_fwd", "cuda"):
        with pytest.raises(RuntimeError, match="the extension has no cuda kernel for attention_fwd; build it with"):
            backends._resolve("cuda", "cuda", "attention", ("attention_fwd",), False)


def test_autotuning_switch(monkeypatch):
    """FASTLM_TRITON_AUTOTUNE: on, the autotuned kernels keep every candidate their pruning keeps and time them; off
    (the test suite's default), only the first survivor, untimed; read per new shape; any other value is an error
    naming the variable."""
    import triton

    from fastlm.kernels import _helpers

    def kernel(n):
        pass

    configs = [triton.Config({"BLOCK": b}) for b in (16, 32, 64, 128)]
    tuner = _helpers.autotune(configs, ["n"], lambda cs, named_args, **kw: [c for c in cs if c.kwargs["BLOCK"] >= 32])(
        triton.jit(kernel))
    tuner.nargs, calls = {}, []  # (the named arguments of the call being tuned: none here)
    monkeypatch.setenv("FASTLM_TRITON_AUTOTUNE", "0")
    assert [c.kwargs["BLOCK"] for c in tuner.prune_configs({})] == [32]
    assert tuner.do_bench(lambda: calls.append(1), quantiles=(0.5, 0.2, 0.8)) == [0.0, 0.0, 0.0] and calls == []
    monkeypatch.setenv("FASTLM_TRITON_AUTOTUNE", "1")
    assert [c.kwargs["BLOCK"] for c in tuner.prune_configs({})] == [32, 64, 128]
    monkeypatch.setenv("FASTLM_TRITON_AUTOTUNE", "yes")
    with pytest.raises(ValueError, match="FASTLM_TRITON_AUTOTUNE must be '0' or '1', got 'yes'"):
        tuner.prune_configs({})



MATMUL_OPS = {  # the ops built on matrix products: call(backend, *tensors), tensor shapes (activation first)
    "attention": (lambda be, q, k, v: ops.attention(q, k, v, causal=True, backend=be), (2, 5, 4, 16), (2, 5, 2, 16),
                  (2, 5, 2, 16)),
    "decode_attention": (lambda be, q, k, v: ops.decode_attention(q, k, v, torch.tensor([3, 6], device=q.device),
                                                                  backend=be), (2, 1, 4, 16), (2, 6, 2, 16),
                         (2, 6, 2, 16)),
    "linear": (lambda be, x, w, b: ops.linear(x, w, b, backend=be), (3, 16), (24, 16), (24,)),
    "mlp_gelu": (lambda be, x, w1, b1, w2, b2: ops.mlp_gelu(x, w1, b1, w2, b2, backend=be), (3, 16), (40, 16), (40,),
                 (16, 40), (16,)),
    "mlp_swiglu": (lambda be, x, wg, wu, wd, r: ops.mlp_swiglu(x, wg, wu, wd, r, backend=be), (3, 16), (40, 16),
                   (40, 16), (16, 40), (3, 16)),
    "linear_cross_entropy": (lambda be, x, w: ops.linear_cross_entropy(x, w, torch.tensor([1, 0, 29], device=x.device),
                                                                       backend=be), (3, 16), (30, 16)),
}


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
@pytest.mark.parametrize("name", list(MATMUL_OPS))
def test_matmul_ops_under_autocast(name, backend):
    """Under torch.autocast the ops built on matrix products compute as autocast runs a matmul: bf16 activations
    beside fp32 weights (and caches) are fine, every fp32 argument is cast to bf16, the result is exactly the op's on
    the cast inputs, in bf16 (the cross-entropy's loss in fp32), and fp32 leaves get fp32 gradients; float64 stays
    float64 on the reference. (Before, the weights were refused, the result's dtype depended on the backend, and the
    Triton linear cross-entropy failed on autocast's bf16 matmul.)"""
    from conftest import DEVICE
    if backend == "cpu" and not backends.extension_has("linear", "cpu"):
        pytest.skip("the C++ extension (fastlm._C) is not built")
    device = DEVICE if backend == "triton" else "cpu"
    kind = torch.device(device).type
    fn, *shapes = MATMUL_OPS[name]
    grads = name != "decode_attention"                                  # (decoding is inference: no backward)
    leaves = [torch.randn(s, device=device, requires_grad=grads) for s in shapes]
    args = [leaves[0].detach().bfloat16()] + leaves[1:]
    if backend == "triton" and kind == "cpu" and name != "linear":     # the interpreter's bf16 is refused, by name
        # (linear's "triton" path is torch's GEMM, no Triton kernel)
        with pytest.raises(TypeError, match=f"^{name}: backend='triton' on cpu tensors runs through the Triton "
                                            "interpreter"), torch.autocast(kind, dtype=torch.bfloat16):
            fn(backend, *args)
        return
    with torch.autocast(kind, dtype=torch.bfloat16):
        out = fn(backend, *args)
    assert out.dtype == (torch.float32 if name == "linear_cross_entropy" else torch.bfloat16)
    assert torch.equal(out, fn(backend, *(a.bfloat16() for a in args)))    # (the same path: with autograd)
    if grads:
        out.float().sum().backward()
        assert all(leaf.grad is not None and leaf.grad.dtype == torch.float32 for leaf in leaves[1:])
    if backend == "torch":
        with torch.autocast(kind, dtype=torch.bfloat16):
            assert fn(backend, *(a.detach().double() for a in args)).dtype == torch.float64


def _f32(*shape, device):
    return torch.randn(*shape, device=device, requires_grad=True)


SECOND_ORDER = {  # op on fp32 leaves whose backward runs a kernel with no derivative of its own: input shapes, and
    # the C++ CPU kernel behind its "cpu" backend (None: "cpu" runs a differentiable torch backward)
    "attention": (lambda q, k, v, backend: ops.attention(q, k, v, causal=True, backend=backend), [(1, 5, 2, 8)] * 3,
                  "attention_fwd"),
    "mlp_gelu": (lambda x, w1, w2, backend: ops.mlp_gelu(x, w1, None, w2, None, backend=backend),
                 [(3, 8), (12, 8), (8, 12)], "mlp_gelu"),
    "mlp_swiglu": (lambda x, w1, w3, w2, backend: ops.mlp_swiglu(x, w1, w3, w2, backend=backend),
                   [(3, 8), (12, 8), (12, 8), (8, 12)], "mlp_swiglu"),
    "cross_entropy": (lambda x, backend: ops.cross_entropy(x, torch.tensor([1, 2, 9], device=x.device),
                                                           backend=backend), [(3, 10)], "cross_entropy_fwd"),
    "rms_norm": (lambda x, w, backend: ops.rms_norm(x, w, backend=backend), [(3, 8), (8,)], None),
}


@pytest.mark.parametrize("name, backend", [
    case for n, (_, _, cpu_kernel) in SECOND_ORDER.items()
    for case in [(n, "triton")] + ([pytest.param(n, "cpu", marks=needs_cpu_kernel(cpu_kernel))] if cpu_kernel else [])])
def test_second_order_gradients_are_a_clear_error(name, backend):
    """backward(create_graph=True) gives the right first-order gradients; differentiating them raises an error that
    names the op and the way out, never torch's bare 'no autograd formula' nor a silent zero."""
    fn, shapes, _ = SECOND_ORDER[name]
    device = backend_device(backend)
    leaves = [_f32(*s, device=device) for s in shapes]
    grads = torch.autograd.grad(fn(*leaves, backend=backend).square().sum(), leaves, create_graph=True)
    want = torch.autograd.grad(fn(*leaves, backend="torch").square().sum(), leaves)
    for g, w in zip(grads, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
    with pytest.raises(RuntimeError, match=f"{name}.*second-order gradients .* use backend='torch'"):
        sum(g.sum() for g in grads).backward()
