"""fastlm.ops.linear: the C++ CPU kernel against F.linear in float64 (numerics rule), output and the gradients of x,
the weight and the bias, on the matrix-vector sizes (decoding) and above; bad input. (The other backends are F.linear
itself: nothing to compare.)"""
import pytest
import torch
import torch.nn.functional as F

from conftest import needs_cpu_kernel
from fastlm import backends
from fastlm.ops import linear
from fastlm.testing import check_op

NEEDS_CPU_KERNEL = needs_cpu_kernel("linear")


@NEEDS_CPU_KERNEL
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
# (2, 67) x 300 -> 80: more rows than one output tile, a reduction longer than one depth step, an odd number of
# 32-column panels (the bf16 dot products take them in pairs, the last one alone) with a ragged last panel
@pytest.mark.parametrize("lead, k, n", [((1,), 40, 300), ((2, 3), 20, 7), ((2, 9), 24, 17), ((3, 7), 37, 45),
                                        ((2, 67), 300, 80)])
@pytest.mark.parametrize("bias", [True, False])
def test_rule_and_grads(dtype, lead, k, n, bias):
    inputs = [torch.randn(*lead, k).to(dtype), (torch.randn(n, k) / k ** 0.5).to(dtype),
              torch.randn(n).to(dtype) if bias else None]
    check_op("linear[cpu]", lambda *a: linear(*a, backend="cpu"), F.linear, inputs)


def test_auto_uses_the_extension_on_cpu():
    """CPU tensors: "auto" and "cpu" run the C++ kernel (the profiler sees it), called directly when no gradient is
    needed, through the autograd wrapper otherwise (the rule tests compare with F.linear: a fallback to it would pass
    them)."""
    x, w = torch.randn(1, 16), torch.randn(8, 16)
    torch.testing.assert_close(linear(x, w), F.linear(x, w))
    if not backends.extension_has("linear", "cpu"):
        return
    assert backends.resolve("auto", torch.device("cpu"), "linear", native_ops=("linear",)) == "cpu"
    for backend in ("auto", "cpu"):
        for grad in (False, True):
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                y = linear(x, w.requires_grad_(grad), backend=backend)
            names = {e.name for e in prof.events()}
            assert "fastlm::linear" in names and ("fastlm_native_py::linear" in names) == grad, (backend, grad)
            assert y.requires_grad == grad


@NEEDS_CPU_KERNEL
@pytest.mark.parametrize("engine", ["aten", "fastlm"])
@pytest.mark.parametrize("bias", [True, False])
def test_bf16_on_either_gemm(engine, bias, monkeypatch):
    """bf16 above the matrix-vector sizes runs on ATen's GEMM (oneDNN: AMX tiles where the CPU has them;
    FASTLM_CPU_BF16=aten, the default there) or on gemm.h's (fastlm): both by the numerics rule, on the engine
    asked for, also when called directly with inputs that require grad. Any other value of the variable is an error
    naming it."""
    monkeypatch.setenv("FASTLM_CPU_BF16", engine)
    inputs = [torch.randn(2, 67, 300).bfloat16(), (torch.randn(80, 300) / 300 ** 0.5).bfloat16(),
              torch.randn(80).bfloat16() if bias else None]
    check_op(f"linear[cpu, {engine}]", lambda *a: linear(*a, backend="cpu"), F.linear, inputs)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        linear(*inputs, backend="cpu")
    names = {e.name for e in prof.events()}
    assert "fastlm::linear" in names and bool({"aten::mm", "aten::addmm"} & names) == (engine == "aten"), names
    # the op called directly with an input that requires grad (ATen's out= GEMMs refuse to record a graph)
    torch.testing.assert_close(torch.ops.fastlm.linear(inputs[0].clone().requires_grad_(), *inputs[1:]),
                               linear(*inputs, backend="cpu"), rtol=0, atol=0)
    monkeypatch.setenv("FASTLM_CPU_BF16", "amx")
    for x in (inputs[0], inputs[0][:1, :3]):  # (above the matrix-vector sizes and below: every bf16 call checks)
        with pytest.raises(ValueError, match="FASTLM_CPU_BF16 must be auto, aten or fastlm, got 'amx'"):
            linear(x, *inputs[1:], backend="cpu")


@NEEDS_CPU_KERNEL
def test_compile_fullgraph():
    x, w, b = torch.randn(2, 16), torch.randn(8, 16), torch.randn(8)
    torch._dynamo.reset()
    fn = torch.compile(lambda x, w, b: linear(x, w, b, backend="cpu") * 2, fullgraph=True, backend="eager")
    torch.testing.assert_close(fn(x, w, b), F.linear(x, w, b) * 2)


@pytest.mark.parametrize("call, exc, words", [
    (lambda x, w, b: linear(x, w[:, :-1], b), ValueError, "weight must be 2-D (out_features, 16)"),
    (lambda x, w, b: linear(x, w[0], b), ValueError, "weight must be 2-D"),
    (lambda x, w, b: linear(x, w, b[:-1]), ValueError, "bias must be a tensor of shape (8,)"),
    (lambda x, w, b: linear(x, w.double(), b), TypeError, "weight must have x's dtype"),
    (lambda x, w, b: linear(x, w, b.half()), TypeError, "bias must have x's dtype"),
    (lambda x, w, b: linear(x.long(), w, b), TypeError, "x must be a floating-point tensor"),
    (lambda x, w, b: linear(x[0, 0], w, b), ValueError, "0-dim"),
    (lambda x, w, b: linear(x, w, b, backend="tpu"), ValueError, "backend must be one of"),
    (lambda x, w, b: linear(x, w.to("meta"), b), ValueError, "linear: weight is on meta but x is on cpu"),
])
def test_bad_input(call, exc, words):
    x, w, b = torch.randn(2, 16), torch.randn(8, 16), torch.randn(8)
    with pytest.raises(exc, match=None) as info:
        call(x, w, b)
    assert words in str(info.value)


@NEEDS_CPU_KERNEL
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_x_starting_mid_word(dtype):
    """A contiguous x whose first element sits at an odd offset: with bf16 the GEMM reads x's rows as 32-bit words of
    pairs, in place only where they are word-aligned (else through a copy)."""
    x = torch.randn(1 + 18 * 24).to(dtype)[1:].view(18, 24)
    inputs = [x, (torch.randn(17, 24) / 24 ** 0.5).to(dtype), None]
    check_op("linear[cpu]", lambda *a: linear(*a, backend="cpu"), F.linear, inputs)
