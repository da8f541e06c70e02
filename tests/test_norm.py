"""LayerNorm / RMSNorm (alone and fused with the residual add) against the float64 reference: outputs and every
gradient by the numerics rule, for the Triton kernels and the C++ CPU kernels (forward and backward). `check_op` is
shared with the other op tests (rope, ffn, cross_entropy)."""
import pytest
import torch

from conftest import DEVICE, ON_GPU, backend_device, needs_cpu_kernel, triton_and_cpu
from fastlm import backends, reference
from fastlm.ops.norm import add_layer_norm, add_rms_norm, layer_norm, rms_norm
from fastlm.testing import check_op, check_rule

BACKENDS, BACKEND_DTYPES = triton_and_cpu("norm_fwd")


def _inputs(shape, dtype, residual, bias, w_dtype=None, device=DEVICE):
    D = shape[-1]
    w_dtype = w_dtype or dtype
    x = torch.randn(shape, dtype=dtype, device=device)
    r = torch.randn(shape, dtype=dtype, device=device) if residual else None
    w = 1.0 + 0.5 * torch.randn(D, dtype=w_dtype, device=device)
    b = torch.randn(D, dtype=w_dtype, device=device) if bias else None
    return x, r, w, b


@pytest.mark.parametrize("backend, dtype", BACKEND_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 40), (7, 96), (3, 43, 40), (129, 96), (5, 37)])  # 37: a tail past any vector
@pytest.mark.parametrize("kind", ["layer", "rms", "add_layer", "add_rms"])
def test_norm_rule(kind, shape, backend, dtype):
    x, r, w, b = _inputs(shape, dtype, kind.startswith("add"), kind.endswith("layer"), device=backend_device(backend))
    _check_norm(kind, backend, x, r, w, b)


def _check_norm(kind, backend, x, r, w, b, eps=None):
    """The op of `kind` against the reference, at its default eps (1e-5 LayerNorm, 1e-6 RMSNorm) unless given."""
    kw = {} if eps is None else {"eps": eps}
    eps = eps if eps is not None else (1e-5 if kind.endswith("layer") else 1e-6)
    if kind == "layer":
        check_op(kind, lambda x, w, b: layer_norm(x, w, b, backend=backend, **kw),
                 lambda x, w, b: reference.layer_norm(x, w, b, eps), [x, w, b])
    elif kind == "rms":
        check_op(kind, lambda x, w: rms_norm(x, w, backend=backend, **kw),
                 lambda x, w: reference.rms_norm(x, w, eps), [x, w])
    elif kind == "add_layer":
        check_op(kind, lambda x, r, w, b: add_layer_norm(x, r, w, b, backend=backend, **kw),
                 lambda x, r, w, b: reference.add_norm(x, r, w, b, eps, kind="layer"), [x, r, w, b])
    else:
        check_op(kind, lambda x, r, w: add_rms_norm(x, r, w, backend=backend, **kw),
                 lambda x, r, w: reference.add_norm(x, r, w, None, eps, kind="rms"), [x, r, w])


@pytest.mark.parametrize("backend, dtype", BACKEND_DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["layer", "add_rms"])
def test_many_rows(kind, backend, dtype):
    """1000 rows of 40: the C++ backward sums dweight / dbias over blocks of 409 rows (three, the last one short)."""
    if backend == "triton" and not ON_GPU:
        pytest.skip("1000 rows through the Triton interpreter: the rule tests above cover the Triton kernels on CPU")
    x, r, w, b = _inputs((8, 125, 40), dtype, kind.startswith("add"), kind.endswith("layer"),
                         device=backend_device(backend))
    _check_norm(kind, backend, x, r, w, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["layer", "rms", "add_layer", "add_rms"])
def test_eps(kind, backend):
    # inputs of variance ~0.01 and eps 0.05: eps moves every output and gradient far past the rule's bound
    x, r, w, b = _inputs((7, 96), torch.float32, kind.startswith("add"), kind.endswith("layer"),
                         device=backend_device(backend))
    x, r = x * 0.1, (r * 0.01 if r is not None else None)
    _check_norm(kind, backend, x, r, w, b, eps=0.05)


@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_norm_without_bias_and_fp32_weight(backend):
    x, _, w, _ = _inputs((7, 40), torch.float16, False, False, w_dtype=torch.float32, device=backend_device(backend))
    check_op("layer_norm(bias=None)", lambda x, w: layer_norm(x, w, None, backend=backend),
             lambda x, w: reference.layer_norm(x, w, None), [x, w])


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_offset_rows(backend):
    # mean >> std: the two-pass variance must not cancel catastrophically
    x, r, w, b = _inputs((7, 96), torch.float32, True, True, device=backend_device(backend))
    x = x + 1000.0
    check_op("add_layer_norm(offset)", lambda x, r, w, b: add_layer_norm(x, r, w, b, backend=backend),
             lambda x, r, w, b: reference.add_norm(x, r, w, b, 1e-5, kind="layer"), [x, r, w, b])


@pytest.mark.parametrize("backend", BACKENDS)
def test_noncontiguous_input_and_expanded_grad(backend):
    base = torch.randn(96, 7, device=backend_device(backend))
    x = base.t().requires_grad_()                      # (7, 96), stride (1, 7)
    w = torch.randn(96, device=backend_device(backend), requires_grad=True)
    y = rms_norm(x, w, backend=backend)
    y.sum().backward()                                  # stride-0 expanded gradient
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    reference.rms_norm(x64, w64).sum().backward()
    check_rule("rms_norm dx (expanded grad)", x.grad, x64.grad, x64.grad.float())
    check_rule("rms_norm dw (expanded grad)", w.grad, w64.grad, w64.grad.float())


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_input(backend):
    x, r, w, b = (torch.randn(*shape, device=backend_device(backend), requires_grad=True)
                  for shape in ((0, 40), (0, 40), (40,), (40,)))
    y, h = add_layer_norm(x, r, w, b, backend=backend)
    assert y.shape == (0, 40) and h.shape == (0, 40)
    (y.sum() + h.sum()).backward()
    assert x.grad.shape == (0, 40)
    assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_hidden_size(backend):
    x, r, w, b = _inputs((3, 0), torch.float32, True, True, device=backend_device(backend))
    for t in (x, r, w, b):
        t.requires_grad_()
    y, h = add_layer_norm(x, r, w, b, backend=backend)
    assert y.shape == h.shape == (3, 0)
    (y.sum() + h.sum()).backward()
    assert x.grad.shape == (3, 0) and w.grad.shape == b.grad.shape == (0,)


def test_rows_wider_than_the_triton_kernels():
    # the Triton kernels keep a row in registers: past their width "auto" takes the reference, backend="triton"
    # raises naming the limit
    from fastlm.kernels.norm import MAX_D
    from fastlm.ops._checks import TRITON_MAX_NORM_DIM, fit_triton
    assert MAX_D == TRITON_MAX_NORM_DIM
    assert fit_triton("rms_norm", "triton", "auto", "hidden size", MAX_D, MAX_D) == "triton"
    assert fit_triton("rms_norm", "triton", "auto", "hidden size", MAX_D + 1, MAX_D) == "torch"
    assert fit_triton("rms_norm", "cpu", "auto", "hidden size", MAX_D + 1, MAX_D) == "cpu"
    x, _, w, _ = _inputs((2, MAX_D + 1), torch.float32, False, False, device=backend_device("triton"))
    with pytest.raises(ValueError, match=rf"rms_norm: backend='triton' takes hidden size 1..{MAX_D}, got {MAX_D + 1}"):
        rms_norm(x, w, backend="triton")


def test_torch_backend_is_reference():
    x, r, w, _ = _inputs((7, 40), torch.float32, True, False)
    y, h = add_rms_norm(x, r, w, backend="torch")
    y_ref, h_ref = reference.add_norm(x, r, w, None, 1e-6, kind="rms")
    assert torch.equal(y, y_ref) and torch.equal(h, h_ref)


@needs_cpu_kernel("norm_fwd")
def test_auto_runs_the_cpu_kernel_without_autograd_overhead():
    """CPU tensors: "auto" is the C++ kernel, called directly when no gradient is needed, through the autograd wrapper
    otherwise."""
    x, r, w, _ = _inputs((3, 40), torch.float32, True, False, device="cpu")
    for grad in (False, True):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            y, h = add_rms_norm(x, r, w.requires_grad_(grad))
        names = {e.name for e in prof.events()}
        assert "fastlm::norm_fwd" in names and ("fastlm_native_py::norm_fwd" in names) == grad
        assert y.requires_grad == grad
        assert torch.equal(h, x + r)


@pytest.mark.skipif(ON_GPU or not backends.extension_has("norm_fwd", "cpu"),
                    reason="the error for backend='cuda' with the CPU-only extension built")
def test_cuda_backend_on_a_cpu_only_build():
    x, _, w, _ = _inputs((3, 40), torch.float32, False, False)
    with pytest.raises((RuntimeError, ValueError), match="rms_norm.*cuda"):
        rms_norm(x, w, backend="cuda")


@pytest.mark.gpu
def test_cuda_tensors_auto_is_triton_and_cuda_raises():
    x, _, w, _ = _inputs((3, 40), torch.float32, False, False)
    assert torch.equal(rms_norm(x, w), rms_norm(x, w, backend="triton"))
    with pytest.raises(RuntimeError, match="rms_norm"):   # no CUDA C++ norm: "norm_fwd", or no CUDA extension at all
        rms_norm(x, w, backend="cuda")


@pytest.mark.parametrize("call, exc, words", [
    (lambda x, w: layer_norm(x, w[:-1], None), ValueError, "weight"),
    (lambda x, w: layer_norm(x, w, torch.zeros(3)), ValueError, "bias"),
    (lambda x, w: layer_norm(x, w, torch.zeros_like(w).half()), TypeError, "bias must have weight's dtype"),
    (lambda x, w: rms_norm(x[0, 0], w), ValueError, "x must have at least 1 dim"),
    (lambda x, w: add_rms_norm(x, None, w), TypeError, "add_rms_norm: residual must be a tensor"),
    (lambda x, w: rms_norm(x, None), TypeError, "weight"),
    (lambda x, w: rms_norm(x.long(), w), TypeError, "x"),
    (lambda x, w: rms_norm(x, w, eps=-1.0), ValueError, "eps"),
    (lambda x, w: rms_norm(x, w, eps=float("inf")), ValueError, "eps must be a finite non-negative number, got inf"),
    (lambda x, w: layer_norm(x, w, None, eps=float("nan")), ValueError, "eps must be a finite non-negative number"),
    (lambda x, w: add_rms_norm(x, x[:, :-1], w), ValueError, "residual"),
    (lambda x, w: add_rms_norm(x, x.half(), w), TypeError, "residual"),
    (lambda x, w: add_layer_norm(x, None, w, None), TypeError, "residual"),
    (lambda x, w: rms_norm(x, w, backend="nope"), ValueError, "backend"),
    (lambda x, w: rms_norm(x.double(), w.double(), backend="triton"), TypeError, "float64"),
    (lambda x, w: rms_norm(x, w.to("meta")), ValueError, "weight"),
])
def test_bad_input(call, exc, words):
    x, _, w, _ = _inputs((7, 40), torch.float32, False, False)
    with pytest.raises(exc, match=words):
        call(x, w)


@pytest.mark.gpu
def test_norm_large_bf16():
    x, r, w, b = _inputs((4099, 4096), torch.bfloat16, True, True)
    check_op("add_layer_norm(large)", lambda x, r, w, b: add_layer_norm(x, r, w, b, backend="triton"),
             lambda x, r, w, b: reference.add_norm(x, r, w, b, 1e-5, kind="layer"), [x, r, w, b])
    check_op("rms_norm(large)", lambda x, w: rms_norm(x, w, backend="triton"), reference.rms_norm, [x, w])
