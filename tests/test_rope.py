"""RoPE against the float64 reference (Hugging Face rotate_half): output and gradient by the numerics rule, shared and
per-sequence tables, position offsets, non-contiguous (fused-QKV slice) inputs, bad input; for the Triton kernel and
the C++ CPU kernel."""
import math

import pytest
import torch

from conftest import DEVICE, ON_GPU, backend_device, needs_cpu_kernel, triton_and_cpu
from fastlm import backends, reference
from fastlm.ops.rope import apply_rope, rope_cos_sin
from fastlm.testing import check_op, check_rule

BACKENDS, BACKEND_DTYPES = triton_and_cpu("rope_fwd")


def _rope(backend):
    return lambda x, cos, sin: apply_rope(x, cos, sin, backend=backend)


@pytest.mark.parametrize("backend, dtype", BACKEND_DTYPES, ids=str)
@pytest.mark.parametrize("B, S, H, D", [(1, 1, 1, 40), (2, 7, 3, 96), (1, 129, 2, 64), (3, 5, 4, 16)])
def test_rope_rule(B, S, H, D, backend, dtype):
    dev = backend_device(backend)
    x = torch.randn(B, S, H, D, dtype=dtype, device=dev)
    cos, sin = rope_cos_sin(torch.arange(S, device=dev) + 3, D)        # position offset 3
    check_op("apply_rope", _rope(backend), reference.apply_rope, [x, cos, sin], constants=(1, 2))


@pytest.mark.parametrize("backend, dtype", BACKEND_DTYPES, ids=str)
def test_rope_per_sequence_positions_and_qkv_slice(backend, dtype):
    B, S, H, D = 3, 7, 2, 40
    dev, rope = backend_device(backend), _rope(backend)
    qkv = torch.randn(B, S, 3, H, D, dtype=dtype, device=dev)
    pos = torch.stack([torch.arange(S) + off for off in (0, 5, 100)]).to(dev)            # (B, S)
    cos, sin = rope_cos_sin(pos.reshape(-1), D)
    cos, sin = cos.reshape(B, S, D), sin.reshape(B, S, D)
    out = check_op("apply_rope(qkv slice, per-sequence)", lambda t, c, s: rope(t[:, :, 1], c, s),
                   lambda t, c, s: reference.apply_rope(t[:, :, 1], c, s), [qkv, cos, sin], constants=(1, 2))
    # each sequence's rows equal the shared-table result at its own offset
    cos1, sin1 = rope_cos_sin(torch.arange(S, device=dev) + 5, D)
    assert torch.equal(out[0][1:2], rope(qkv[1:2, :, 1], cos1, sin1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_rope_general_tables_gradient(backend):
    # tables whose halves differ exercise the transposed rotation in backward beyond Hugging Face's tables
    dev = backend_device(backend)
    x = torch.randn(2, 7, 3, 40, device=dev)
    cos, sin = torch.randn(7, 40, device=dev), torch.randn(7, 40, device=dev)
    check_op("apply_rope(random tables)", _rope(backend), reference.apply_rope, [x, cos, sin], constants=(1, 2))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("per_sequence", [False, True])
def test_rope_double_backward(backend, per_sequence):
    # the backward (the transposed rotation of dy) differentiated again: gradients for dy and for both tables, whose
    # halves differ, so that a table gradient with its halves swapped shows
    dev = backend_device(backend)
    shape = (2, 7, 40) if per_sequence else (7, 40)
    x, dy = torch.randn(2, 7, 3, 40, device=dev), torch.randn(2, 7, 3, 40, device=dev)
    cos, sin = torch.randn(shape, device=dev), torch.randn(shape, device=dev)

    def backward_of(rope):
        return lambda x, c, s, dy: torch.autograd.grad(rope(x, c, s), x, dy, create_graph=True)[0]
    check_op("apply_rope backward", backward_of(_rope(backend)), backward_of(reference.apply_rope), [x, cos, sin, dy])


@pytest.mark.parametrize("backend, dtype", BACKEND_DTYPES, ids=str)
@pytest.mark.parametrize("per_sequence", [False, True])
def test_rope_table_gradients(backend, dtype, per_sequence):
    # tables that require grad (learned frequencies) get their gradients on every backend, summed over the heads (and
    # the batch, for shared tables), as the reference's autograd gives them; fp32 tables beside low-precision x too
    dev = backend_device(backend)
    x = torch.randn(2, 7, 3, 40, dtype=dtype, device=dev)
    shape = (2, 7, 40) if per_sequence else (7, 40)
    cos, sin = torch.randn(shape, device=dev), torch.randn(shape, device=dev)
    check_op("apply_rope(learned tables)", _rope(backend), reference.apply_rope, [x, cos, sin])


@pytest.mark.parametrize("backend", BACKENDS + ["torch"])
def test_rope_tables_with_a_batch_dim_of_one(backend):
    # transformers' rotary tables are (1, S, D) when the batch shares its positions: the (S, D) result, gradients too
    dev = backend_device(backend) if backend != "torch" else DEVICE
    x = torch.randn(3, 7, 2, 40, device=dev, requires_grad=True)
    cos, sin = (t.requires_grad_() for t in rope_cos_sin(torch.arange(7, device=dev), 40))
    outs = [apply_rope(x, c, s, backend=backend) for c, s in ((cos, sin), (cos[None], sin[None]))]
    assert torch.equal(*outs)
    grads = [torch.autograd.grad(o.square().sum(), (x, cos, sin)) for o in outs]
    assert all(torch.equal(a, b) for a, b in zip(*grads))


@pytest.mark.parametrize("backend", BACKENDS)
def test_rope_expanded_grad_and_empty(backend):
    dev, rope = backend_device(backend), _rope(backend)
    x = torch.randn(2, 7, 3, 40, device=dev, requires_grad=True)
    cos, sin = rope_cos_sin(torch.arange(7, device=dev), 40)
    rope(x, cos, sin).sum().backward()
    x64 = x.detach().double().requires_grad_()
    reference.apply_rope(x64, cos.double(), sin.double()).sum().backward()
    check_rule("apply_rope dx (expanded grad)", x.grad, x64.grad, x64.grad.float())
    e = torch.randn(0, 7, 3, 40, device=dev, requires_grad=True)
    y = rope(e, cos, sin)
    assert y.shape == e.shape
    y.sum().backward()
    assert e.grad.shape == e.shape


def test_rope_cos_sin_closed_form():
    # Hugging Face's tables, element by element in Python floats: angle(p, i) = p * base^(-2i/D), both halves equal
    D, base = 40, 500000.0
    pos = torch.tensor([0, 1, 7, 4095], device=DEVICE)
    cos, sin = rope_cos_sin(pos, D, base=base)
    assert cos.shape == sin.shape == (4, D) and cos.dtype == torch.float32
    want_cos = torch.tensor([[math.cos(p * base ** (-2 * (j % (D // 2)) / D)) for j in range(D)] for p in pos.tolist()])
    want_sin = torch.tensor([[math.sin(p * base ** (-2 * (j % (D // 2)) / D)) for j in range(D)] for p in pos.tolist()])
    assert (cos.cpu() - want_cos).abs().max() <= 1e-7 and (sin.cpu() - want_sin).abs().max() <= 1e-7
    assert rope_cos_sin(pos, D, dtype=torch.float64)[0].dtype == torch.float64
    # linear scaling (position interpolation): the angles of position p / factor
    cos4, sin4 = rope_cos_sin(pos * 4, D, base=base, scaling={"rope_type": "linear", "factor": 4})
    assert (cos4 - cos).abs().max() <= 1e-6 and (sin4 - sin).abs().max() <= 1e-6


@pytest.mark.parametrize("call, exc, words", [
    (lambda x, c, s: apply_rope(x[0], c, s), ValueError, "x"),
    (lambda x, c, s: apply_rope(x[..., :-1], c[:, :-1], s[:, :-1]), ValueError, "even"),
    (lambda x, c, s: apply_rope(x, c[:-1], s), ValueError, "cos"),
    (lambda x, c, s: apply_rope(x, c.to("meta"), s), ValueError, "cos is on meta"),
    (lambda x, c, s: apply_rope(x, c, s[None].expand(3, -1, -1)), ValueError, "sin"),
    (lambda x, c, s: apply_rope(x, c, s[None].expand(2, -1, -1)), ValueError, "cos and sin must have the same shape"),
    (lambda x, c, s: apply_rope(x.long(), c, s), TypeError, "x"),
    (lambda x, c, s: apply_rope(x.double(), c, s, backend="triton"), TypeError, "float64"),
    (lambda x, c, s: rope_cos_sin(torch.arange(4), 7), ValueError, "head_dim"),
    (lambda x, c, s: rope_cos_sin(torch.arange(4), 8, base=-1.0), ValueError, "base"),
    (lambda x, c, s: rope_cos_sin(torch.arange(4), 8, base=math.inf), ValueError,
     "base must be a positive finite number, got inf"),
    (lambda x, c, s: rope_cos_sin(torch.zeros(2, 2), 8), ValueError, "positions"),
    (lambda x, c, s: rope_cos_sin(torch.arange(4), 8, dtype=torch.int64), TypeError, "dtype"),
    (lambda x, c, s: rope_cos_sin(torch.arange(4) + 0.5, 8), TypeError, "positions must be an integer tensor"),
    (lambda x, c, s: rope_cos_sin(torch.ones(4, dtype=torch.bool), 8), TypeError, "positions must be an integer"),
    (lambda x, c, s: rope_cos_sin(torch.arange(4), 8, scaling={"rope_type": "ntk"}), ValueError, "rope_type"),
])
def test_bad_input(call, exc, words):
    x = torch.randn(2, 7, 3, 40, device=DEVICE)
    c, s = rope_cos_sin(torch.arange(7, device=DEVICE), 40)
    with pytest.raises(exc, match=words):
        call(x, c, s)


@needs_cpu_kernel("rope_fwd")
def test_auto_runs_the_cpu_kernel_without_autograd_overhead():
    """CPU tensors: "auto" is the C++ kernel, called directly when no gradient is needed, through the autograd wrapper
    otherwise; tables in another dtype are cast to x's, as the reference casts them."""
    x = torch.randn(2, 7, 3, 40, dtype=torch.bfloat16)
    cos, sin = rope_cos_sin(torch.arange(7), 40)
    for grad in (False, True):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            y = apply_rope(x.requires_grad_(grad), cos, sin)
        names = {e.name for e in prof.events()}
        assert "fastlm::rope_fwd" in names and ("fastlm_native_py::rope" in names) == grad
        assert y.requires_grad == grad
    assert torch.equal(y, apply_rope(x, cos.bfloat16(), sin.bfloat16(), backend="cpu"))


@pytest.mark.skipif(ON_GPU or not backends.extension_has("rope_fwd", "cpu"),
                    reason="the error for backend='cuda' with the CPU-only extension built")
def test_cuda_backend_on_a_cpu_only_build():
    x = torch.randn(2, 7, 3, 40)
    cos, sin = rope_cos_sin(torch.arange(7), 40)
    with pytest.raises((RuntimeError, ValueError), match="apply_rope.*cuda"):
        apply_rope(x, cos, sin, backend="cuda")


@pytest.mark.gpu
def test_cuda_tensors_auto_is_triton_and_cuda_raises():
    x = torch.randn(2, 7, 3, 40, device=DEVICE)
    cos, sin = rope_cos_sin(torch.arange(7, device=DEVICE), 40)
    assert torch.equal(apply_rope(x, cos, sin), apply_rope(x, cos, sin, backend="triton"))
    with pytest.raises(RuntimeError, match="apply_rope"):   # no CUDA C++ RoPE: "rope_fwd", or no CUDA extension
        apply_rope(x, cos, sin, backend="cuda")


@pytest.mark.gpu
def test_rope_large_bf16():
    x = torch.randn(2, 1031, 32, 128, dtype=torch.bfloat16, device=DEVICE)
    cos, sin = rope_cos_sin(torch.arange(1031, device=DEVICE) + 7, 128, base=500000.0)
    check_op("apply_rope(large)", _rope("triton"), reference.apply_rope, [x, cos, sin], constants=(1, 2))


@pytest.mark.parametrize("backend", BACKENDS + ["torch"])
def test_rope_float64_tables(backend):
    """float64 tables beside fp32 x are rounded to x's dtype on every backend (the Triton kernel takes no float64):
    the result of fp32 tables, and their gradients come back in float64."""
    dev = backend_device(backend) if backend != "torch" else DEVICE
    x = torch.randn(2, 7, 3, 40, device=dev)
    cos, sin = (t.requires_grad_() for t in rope_cos_sin(torch.arange(7, device=dev), 40, dtype=torch.float64))
    y = apply_rope(x, cos, sin, backend=backend)
    assert y.dtype == torch.float32
    assert torch.equal(y, apply_rope(x, cos.detach().float(), sin.detach().float(), backend=backend))
    y.sum().backward()
    assert cos.grad.dtype == sin.grad.dtype == torch.float64
