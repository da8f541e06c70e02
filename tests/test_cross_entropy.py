"""Cross-entropy and fused linear + cross-entropy against the float64 reference: losses and gradients by the numerics
rule for every reduction, ignore_index, vocabularies 13 to 50257, chunking, empty and bad input; the Triton kernels and
the C++ CPU kernels (cpu backend) through one test matrix."""
import importlib
import math

import pytest
import torch

from conftest import DEVICE, backend_device, needs_cpu_kernel, triton_and_cpu
from fastlm import reference
from fastlm.ops.cross_entropy import cross_entropy, linear_cross_entropy
from fastlm.testing import check_op, check_rule


BACKENDS, BACKEND_DTYPES = triton_and_cpu("cross_entropy_fwd")


def _targets(shape, V, ignore_index=-100, n_ignored=1, device=DEVICE):
    t = torch.randint(0, V, shape, device=device)
    t.view(-1)[:n_ignored] = ignore_index
    return t


def _ce(reduction, backend, ignore_index=-100):
    def fn(logits, t):
        return cross_entropy(logits, t, ignore_index=ignore_index, reduction=reduction, backend=backend)

    def ref(logits, t):
        out = reference.cross_entropy(logits.reshape(-1, logits.shape[-1]), t.reshape(-1), ignore_index=ignore_index,
                                      reduction=reduction)
        return out.reshape(t.shape) if reduction == "none" else out
    return fn, ref


@pytest.mark.parametrize("backend, dtype", BACKEND_DTYPES, ids=lambda x: str(x).replace("torch.", ""))
@pytest.mark.parametrize("N, V, reduction, ignore_index",
                         [(1, 1000, "none", -100), (7, 1000, "mean", 3), (129, 1000, "sum", 3),
                          (129, 1000, "none", -100), (3, 50257, "mean", -100), (3, 50257, "none", 3),
                          (5, 13, "none", -100)])   # a row shorter than two SIMD vectors
def test_cross_entropy_rule(backend, dtype, N, V, reduction, ignore_index):
    # ignore_index 3 is also a valid class: targets equal to it are ignored all the same (and leave the mean)
    dev = backend_device(backend)
    logits = 3.0 * torch.randn(N, V, dtype=dtype, device=dev)
    fn, ref = _ce(reduction, backend, ignore_index)
    check_op(f"cross_entropy[{backend}, {reduction}, ignore_index={ignore_index}]", fn, ref,
             [logits, _targets((N,), V, ignore_index, n_ignored=min(2, N - 1), device=dev)])


@pytest.mark.parametrize("backend", BACKENDS)
def test_cross_entropy_leading_dims_ignore_index_and_large_logits(backend):
    dev = backend_device(backend)
    logits = torch.randn(2, 5, 300, device=dev)
    logits[0, 0, 7] = 80.0                           # a dominant logit: the online max must rescale correctly
    t = _targets((2, 5), 300, ignore_index=3, n_ignored=2, device=dev)
    t[0, 0] = 7
    fn, ref = _ce("none", backend, ignore_index=3)
    out = check_op("cross_entropy(ignore_index=3)", fn, ref, [logits, t])[0]
    assert out.shape == (2, 5) and torch.equal(out.view(-1)[1:2], torch.zeros(1, device=dev))


@pytest.mark.parametrize("backend", BACKENDS)
def test_cross_entropy_all_ignored_and_empty(backend):
    dev = backend_device(backend)
    logits = torch.randn(4, 50, device=dev, requires_grad=True)
    t = torch.full((4,), -100, device=dev)
    loss = cross_entropy(logits, t, backend=backend)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))
    e = torch.randn(0, 50, device=dev, requires_grad=True)
    assert cross_entropy(e, t[:0], backend=backend).item() == 0.0
    assert cross_entropy(e, t[:0], reduction="none", backend=backend).shape == (0,)
    # with a strided vocabulary dim (no element to read: no layout error either)
    assert cross_entropy(torch.cat([e, e], dim=1)[:, ::2], t[:0], backend=backend).item() == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_cross_entropy_extreme_and_nan_logits(backend):
    dev = backend_device(backend)
    logits = torch.randn(4, 100, device=dev)
    logits[0, 7] = 1e10                        # certain prediction of a huge logit: loss 0, gradient 0
    logits[1] = torch.finfo(torch.float32).min  # all equal and huge: loss log(100)
    logits[2, 3] = float("nan")                # NaN in, NaN out (a diverged model must not report a finite loss)
    logits = torch.cat([logits, torch.randn(1, 100, device=dev)])
    logits[4, 9] = float("inf")                # +inf at another class: loss +inf, as torch gives it
    logits.requires_grad_(True)
    t = torch.tensor([7, 5, 1, 2, 4], device=dev)
    loss = cross_entropy(logits, t, reduction="none", backend=backend)
    loss.sum().backward()
    want = reference.cross_entropy(logits.detach().double(), t, reduction="none")
    assert loss[0].item() == 0.0 and logits.grad[0].abs().max().item() == 0.0
    # (the float64 reference rounds row 1's log(100) away next to 3.4e38)
    assert abs(loss[1].item() - math.log(100)) < 1e-5 and torch.isnan(loss[2])
    assert abs(loss[3].item() - want[3].item()) < 1e-5
    assert loss[4].item() == math.inf == want[4].item()


@needs_cpu_kernel("cross_entropy_fwd")
def test_cpu_kernels_check_their_arguments():
    logits, t = torch.randn(4, 50), torch.tensor([1, 2, -100, 49])
    ops = torch.ops.fastlm
    with pytest.raises(RuntimeError, match=r"targets must be in \[0, 50\) or equal ignore_index \(-100\), got 50"):
        ops.cross_entropy_fwd(logits, torch.tensor([1, 2, 50, 3]), -100)
    with pytest.raises(RuntimeError, match=r"targets must be a CPU int64 or int32 tensor of shape \(4,\)"):
        ops.cross_entropy_fwd(logits, t[:3], -100)
    with pytest.raises(RuntimeError, match="logits must be 2-D"):
        ops.cross_entropy_fwd(logits[0], t, -100)
    with pytest.raises(RuntimeError, match="contiguous last dim"):
        ops.cross_entropy_fwd(logits.t().contiguous().t(), t, -100)
    with pytest.raises(RuntimeError, match=r"grad_loss must be a floating-point CPU tensor of shape \(4,\)"):
        ops.cross_entropy_bwd(torch.ones(3), logits, t, torch.zeros(4), -100)
    with pytest.raises(RuntimeError, match=r"grad_scale must be a floating-point CPU tensor of shape \(4,\)"):
        ops.cross_entropy_fused_(logits.clone(), t, -100, torch.ones(4, 1))
    with pytest.raises(RuntimeError, match="must not overlap"):
        ops.cross_entropy_fused_(logits[:1].clone().expand(4, 50), t, -100, None)
    with pytest.raises(TypeError, match="the cpu backend takes float32/float16/bfloat16 x, got torch.float64"):
        linear_cross_entropy(torch.randn(4, 8, dtype=torch.float64), torch.randn(50, 8, dtype=torch.float64), t,
                             backend="cpu")
    # (no double backward: tests/test_backends.py::test_second_order_gradients_are_a_clear_error)
    # the fused call: loss as the forward's, the gradient over the logits as the backward's
    loss, lse = ops.cross_entropy_fwd(logits, t, -100)
    scale = torch.rand(4)
    grad = logits.clone()
    loss2, lse2 = ops.cross_entropy_fused_(grad, t, -100, scale)
    assert torch.equal(loss, loss2) and torch.equal(lse, lse2)
    # (to rounding: the fused call forms the probabilities from the row's max and log-sum, the backward from the lse)
    torch.testing.assert_close(grad, ops.cross_entropy_bwd(scale, logits, t, lse, -100), rtol=0, atol=1e-6)


def _lce(reduction, chunk_size, bias, backend, ignore_index=-100):
    def fn(x, w, t, *b):
        return linear_cross_entropy(x, w, t, b[0] if bias else None, ignore_index=ignore_index, reduction=reduction,
                                    chunk_size=chunk_size, backend=backend)

    def ref(x, w, t, *b):
        out = reference.linear_cross_entropy(x.reshape(-1, x.shape[-1]), w, t.reshape(-1), b[0] if bias else None,
                                             ignore_index=ignore_index, reduction=reduction)
        return out.reshape(t.shape) if reduction == "none" else out
    return fn, ref


@pytest.mark.parametrize("backend, dtype", BACKEND_DTYPES, ids=lambda x: str(x).replace("torch.", ""))
@pytest.mark.parametrize("N, d, V, chunk, bias, reduction, ignore_index",
                         [(7, 40, 1000, None, True, red, ign) for red, ign in (("mean", 3), ("sum", -100),
                                                                              ("none", 3))]
                         + [(129, 96, 1000, 32, False, red, ign) for red, ign in (("mean", -100), ("none", -100))]
                         # (ragged chunks of at least 2 rows: a 1-row product of 50257 terms takes MKL's GEMV,
                         # whose fp32 error is up to 4x its GEMM's, which the reference's 5-row product takes)
                         + [(1, 40, 1000, 1, False, "sum", -100), (5, 40, 50257, 3, True, "mean", 3)])
def test_linear_cross_entropy_rule(backend, dtype, N, d, V, chunk, bias, reduction, ignore_index):
    dev = backend_device(backend)
    x = torch.randn(N, d, dtype=dtype, device=dev)
    w = torch.randn(V, d, dtype=dtype, device=dev) / d ** 0.5
    inputs = [x, w, _targets((N,), V, ignore_index, n_ignored=min(1, N - 1), device=dev)] + (
        [torch.randn(V, dtype=dtype, device=dev)] if bias else [])
    fn, ref = _lce(reduction, chunk, bias, backend, ignore_index)
    # mean/sum: the gradients are formed in the forward and scaled by the upstream scalar afterwards, exact for a
    # power of two (1, or a loss scale); "none" takes random per-token cotangents
    check_op(f"linear_cross_entropy[{backend}, {reduction}, chunk={chunk}]", fn, ref, inputs, scalar_cotangent=0.5)


@needs_cpu_kernel("cross_entropy_fwd")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_linear_cross_entropy_weight_gradient_through_addmm_out_dtype(dtype):
    """Over several chunks, the 16-bit weight's gradient accumulates in fp32 through torch.addmm(out_dtype=float32)
    where torch has that kernel (CUDA). CPU torch has none, so a CPU kernel that computes as cuBLAS does (fp32
    products of the 16-bit operands) is registered here for the duration of the test, to run that path: the loss and
    every gradient keep to the numerics rule, and every chunk's product went through it."""
    ce = importlib.import_module("fastlm.ops.cross_entropy")  # (the module; fastlm.ops.cross_entropy is the op)
    calls = []

    def addmm_out_dtype(acc, mat1, mat2, out_dtype, *, beta=1, alpha=1):
        calls.append((acc.dtype, mat1.dtype, mat2.dtype, out_dtype))
        return beta * acc + alpha * (mat1.to(out_dtype) @ mat2.to(out_dtype))

    N, d, V, chunk = 100, 40, 300, 32
    x, w = torch.randn(N, d, dtype=dtype), torch.randn(V, d, dtype=dtype) / d ** 0.5
    try:
        with torch.library._scoped_library("aten", "IMPL") as lib:
            lib.impl("addmm.dtype", addmm_out_dtype, "CPU")
            ce._has_addmm_out_dtype.cache_clear()
            assert ce._has_addmm_out_dtype("cpu")
            check_op(f"linear_cross_entropy[cpu, {dtype}, addmm out_dtype]", *_lce("mean", chunk, False, "cpu"),
                     [x, w, _targets((N,), V, device="cpu")])
    finally:
        ce._has_addmm_out_dtype.cache_clear()
    assert not ce._has_addmm_out_dtype("cpu")
    chunks = -(-N // chunk)
    assert calls and len(calls) % chunks == 0, calls
    assert set(calls) == {(torch.float32, dtype, dtype, torch.float32)}


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_cross_entropy_leading_dims_and_no_grad(backend):
    dev = backend_device(backend)
    x = torch.randn(2, 5, 40, device=dev)
    w = torch.randn(300, 40, device=dev)
    t = _targets((2, 5), 300, device=dev)
    fn, ref = _lce("none", 4, False, backend)
    check_op("linear_cross_entropy(leading dims)", fn, ref, [x, w, t])
    with torch.no_grad():
        check_op("linear_cross_entropy(no_grad)", *_lce("mean", 3, False, backend), [x, w, t], grads=False)
    check_op("linear_cross_entropy(chunk past int64)", *_lce("sum", 2 ** 64, False, backend), [x, w, t])  # one chunk


def test_out_of_range_target_under_compile_poisons_its_row():
    # under torch.compile the host check of the targets cannot run (no sync): a target outside [0, V) gives the
    # Triton kernel's row a NaN loss and a NaN gradient row, never a finite wrong gradient; the other rows are exact
    logits = torch.randn(4, 7, device=DEVICE, requires_grad=True)
    t = torch.tensor([1, 7, 2, 3], device=DEVICE)
    fn = torch.compile(lambda lg, t: cross_entropy(lg, t, reduction="none", backend="triton"), fullgraph=True,
                       backend="aot_eager")
    loss = fn(logits, t)
    loss.nansum().backward()
    assert torch.isnan(loss[1]) and torch.isnan(logits.grad[1]).all()
    good = [0, 2, 3]
    want = torch.nn.functional.cross_entropy(logits[good].detach().double(), t[good], reduction="none")
    torch.testing.assert_close(loss[good].double(), want, rtol=1e-6, atol=1e-6)
    assert torch.isfinite(logits.grad[good]).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_linear_cross_entropy_gradients_formed_in_backward(backend, reduction):
    """The op itself, told compute_grad=False, forms the mean / sum gradients in its backward from the upstream
    gradient instead of in the forward: the same gradients."""
    dev = backend_device(backend)
    x = torch.randn(9, 16, device=dev, requires_grad=True)
    w = torch.randn(40, 16, device=dev, requires_grad=True)
    b = torch.randn(40, device=dev, requires_grad=True)
    t = _targets((9,), 40, ignore_index=3, n_ignored=2, device=dev)
    want = torch.autograd.grad(3 * linear_cross_entropy(x, w, t, b, ignore_index=3, reduction=reduction,
                                                        backend=backend), (x, w, b))
    loss = torch.ops.fastlm_py.linear_cross_entropy(x, w, b, t, 3, reduction, 4, False, backend)[0]
    for g, g_want in zip(torch.autograd.grad(3 * loss, (x, w, b)), want):
        torch.testing.assert_close(g, g_want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_linear_cross_entropy_has_no_double_backward(backend, reduction):
    # an error, never a silent zero second derivative (mean / sum take the gradients the forward computed); the
    # reference backend differentiates twice
    dev = backend_device(backend)
    x = torch.randn(6, 16, device=dev, requires_grad=True)
    w = torch.randn(40, 16, device=dev, requires_grad=True)
    t = _targets((6,), 40, device=dev)
    loss = linear_cross_entropy(x, w, t, reduction=reduction, backend=backend).sum()
    with pytest.raises(RuntimeError, match="linear_cross_entropy: higher-order gradients are not supported"):
        torch.autograd.grad(loss, x, create_graph=True)
    loss = linear_cross_entropy(x, w, t, reduction=reduction, backend="torch").sum()
    (gx,) = torch.autograd.grad(loss, x, create_graph=True)
    assert torch.autograd.grad(gx.square().sum(), w)[0].abs().max() > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_cross_entropy_empty(backend):
    dev = backend_device(backend)
    x = torch.randn(0, 40, device=dev, requires_grad=True)
    w = torch.randn(300, 40, device=dev, requires_grad=True)
    loss = linear_cross_entropy(x, w, torch.zeros(0, dtype=torch.long, device=dev), backend=backend)
    loss.backward()
    assert loss.item() == 0.0 and x.grad.shape == (0, 40) and torch.equal(w.grad, torch.zeros_like(w))
    # hidden size 0: the logits are the bias alone
    x = torch.randn(2, 3, 0, device=dev, requires_grad=True)
    w = torch.randn(10, 0, device=dev, requires_grad=True)
    b = torch.randn(10, device=dev)
    t = _targets((2, 3), 10, device=dev)
    loss = linear_cross_entropy(x, w, t, b, reduction="none", backend=backend)
    want = torch.nn.functional.cross_entropy(b.expand(6, 10), t.reshape(-1), reduction="none").reshape(2, 3)
    torch.testing.assert_close(loss, want)
    loss.sum().backward()
    assert x.grad.shape == (2, 3, 0) and w.grad.shape == (10, 0)


@pytest.mark.parametrize("call, exc, words", [
    (lambda l, t, x, w: cross_entropy(l, t.float()), TypeError, "targets"),
    (lambda l, t, x, w: cross_entropy(l, t[:-1]), ValueError, "targets"),
    (lambda l, t, x, w: cross_entropy(l, t, reduction="avg"), ValueError, "reduction"),
    (lambda l, t, x, w: cross_entropy(l, t, ignore_index=1.5), TypeError, "ignore_index"),
    (lambda l, t, x, w: cross_entropy(l, t, ignore_index=2 ** 31), ValueError, "ignore_index must fit in int32"),
    (lambda l, t, x, w: cross_entropy(l, t.tolist()), TypeError, "targets must be a torch.Tensor, got list"),
    (lambda l, t, x, w: cross_entropy(l[0, 0], t[0]), ValueError, "logits must be \\(..., vocab\\), got a 0-dim"),
    (lambda l, t, x, w: linear_cross_entropy(x[0, 0], w, t[0]), ValueError, "x must be \\(..., hidden\\), got a 0-dim"),
    (lambda l, t, x, w: cross_entropy(l, torch.full_like(t, 50)), ValueError, "targets"),
    (lambda l, t, x, w: cross_entropy(l, torch.full_like(t, -1)), ValueError, "targets"),
    (lambda l, t, x, w: cross_entropy(l.long(), t), TypeError, "logits"),
    (lambda l, t, x, w: cross_entropy(l[:, :0], t), ValueError, "vocabulary"),
    (lambda l, t, x, w: cross_entropy(l.double(), t, backend="triton"), TypeError, "float64"),
    (lambda l, t, x, w: linear_cross_entropy(x, w[:, :-1], t), ValueError, "weight"),
    (lambda l, t, x, w: linear_cross_entropy(x, w.half(), t), TypeError, "weight"),
    (lambda l, t, x, w: linear_cross_entropy(x, w, t, torch.zeros(3)), ValueError, "bias"),
    (lambda l, t, x, w: linear_cross_entropy(x, w, t, chunk_size=0), ValueError, "chunk_size"),
    (lambda l, t, x, w: linear_cross_entropy(x, w, t, reduction="max"), ValueError, "reduction"),
    (lambda l, t, x, w: linear_cross_entropy(x, w, t.to("meta")), ValueError, "targets"),
    (lambda l, t, x, w: linear_cross_entropy(x, w.to("meta"), t), ValueError, "weight is on meta"),
])
def test_bad_input(call, exc, words):
    logits, t = torch.randn(7, 50, device=DEVICE), _targets((7,), 50)
    x, w = torch.randn(7, 40, device=DEVICE), torch.randn(50, 40, device=DEVICE)
    with pytest.raises(exc, match=words):
        call(logits, t, x, w)


@pytest.mark.parametrize("backend", BACKENDS)
def test_expanded_grads(backend):
    # loss.sum() hands backward a stride-0 gradient
    dev = backend_device(backend)
    logits = torch.randn(7, 300, device=dev, requires_grad=True)
    x, w = torch.randn(7, 40, device=dev, requires_grad=True), torch.randn(300, 40, device=dev)
    t = _targets((7,), 300, device=dev)
    cross_entropy(logits, t, reduction="none", backend=backend).sum().backward()
    linear_cross_entropy(x, w, t, reduction="none", chunk_size=3, backend=backend).sum().backward()
    logits64, x64 = logits.detach().double().requires_grad_(), x.detach().double().requires_grad_()
    reference.cross_entropy(logits64, t, reduction="none").sum().backward()
    reference.linear_cross_entropy(x64, w.double(), t, reduction="none").sum().backward()
    check_rule("cross_entropy dlogits (expanded grad)", logits.grad, logits64.grad, logits64.grad.float())
    check_rule("linear_cross_entropy dx (expanded grad)", x.grad, x64.grad, x64.grad.float())


@pytest.mark.parametrize("backend", BACKENDS)
def test_padded_logit_rows(backend):
    # logits whose rows are views into wider rows (logits[..., :V] of a padded vocabulary): read at their own row
    # stride, the gradient written at its own (dense) one, the padding's gradient 0
    dev = backend_device(backend)
    base = (3.0 * torch.randn(7, 310, device=dev)).requires_grad_()
    t = _targets((7,), 300, device=dev)
    cot = torch.randn(7, device=dev)
    loss = cross_entropy(base[:, :300], t, reduction="none", backend=backend)
    (loss * cot).sum().backward()
    base64 = base.detach().double().requires_grad_()
    loss64 = reference.cross_entropy(base64[:, :300], t, reduction="none")
    (loss64 * cot.double()).sum().backward()
    low = base.detach().clone().requires_grad_()
    (reference.cross_entropy(low[:, :300], t, reduction="none") * cot).sum().backward()
    check_rule("cross_entropy loss (padded rows)", loss, loss64, loss64.float())
    check_rule("cross_entropy dlogits (padded rows)", base.grad, base64.grad, low.grad)
    assert torch.equal(base.grad[:, 300:], torch.zeros(7, 10, device=dev))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_large_vocab_gpu(dtype):
    logits = 3.0 * torch.randn(67, 128256, dtype=dtype, device=DEVICE)
    check_op("cross_entropy(128k vocab)", *_ce("mean", "triton"), [logits, _targets((67,), 128256)])
    x = torch.randn(1031, 512, dtype=dtype, device=DEVICE)
    w = torch.randn(32000, 512, dtype=dtype, device=DEVICE) / 512 ** 0.5
    check_op("linear_cross_entropy(32k vocab, 5 chunks)", *_lce("mean", 256, False, "triton"),
             [x, w, _targets((1031,), 32000)],
             scalar_cotangent=1.0)
