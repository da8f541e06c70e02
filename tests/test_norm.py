"""LayerNorm / RMSNorm (alone and fused with the residual add) against the float64 reference: outputs and every
gradient by the numerics rule. `check_op` is shared with the other op tests (rope, ffn, cross_entropy)."""
import pytest
import torch

from conftest import DEVICE, DTYPES
from fastlm import reference
from fastlm.ops.norm import add_layer_norm, add_rms_norm, layer_norm, rms_norm
from fastlm.testing import check_rule


def _tuple(x):
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def check_op(name, fn, ref, inputs, *, grads=True, constants=(), scalar_cotangent=None):
    """fn(*inputs) against ref(*inputs) in float64 and at the inputs' own precision, for every output and (with
    ``grads``) the gradient of every floating-point input not listed in ``constants`` (indices) under random
    cotangents (``scalar_cotangent`` instead, when given, for 0-dim outputs). Non-tensors pass through."""
    def leaves(to64):
        out = []
        for i, t in enumerate(inputs):
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                t = t.detach().to(torch.float64 if to64 else t.dtype).clone()
                t.requires_grad_(grads and i not in constants)
            out.append(t)
        return out

    kin, lin, din = leaves(False), leaves(False), leaves(True)
    out, low, r64 = _tuple(fn(*kin)), _tuple(ref(*lin)), _tuple(ref(*din))
    assert len(out) == len(r64), f"{name}: {len(out)} outputs, reference has {len(r64)}"
    for i, (o, lo, r) in enumerate(zip(out, low, r64)):
        assert o.dtype == lo.dtype, f"{name} output {i}: dtype {o.dtype}, reference {lo.dtype}"
        assert torch.isfinite(o).all() or not torch.isfinite(r).all(), f"{name} output {i}: non-finite values"
        check_rule(f"{name} output {i}", o, r, lo)
    if not grads:
        return out
    cot = [torch.full_like(r, scalar_cotangent) if scalar_cotangent is not None and r.dim() == 0 else
           torch.randn(r.shape, dtype=torch.float64, device=r.device) for r in r64]
    idx = [i for i, t in enumerate(kin) if isinstance(t, torch.Tensor) and t.requires_grad]

    def grad(outs, ins):
        return torch.autograd.grad(outs, [ins[i] for i in idx], [c.to(o.dtype) for c, o in zip(cot, outs)],
                                   allow_unused=True)

    for i, gk, gl, g64 in zip(idx, grad(out, kin), grad(low, lin), grad(r64, din)):
        if g64 is None:
            continue
        assert gk is not None, f"{name}: no gradient for input {i}"
        assert gk.dtype == kin[i].dtype and gk.shape == kin[i].shape
        assert torch.isfinite(gk).all(), f"{name}: non-finite gradient for input {i}"
        check_rule(f"{name} grad of input {i}", gk, g64, gl)
    return out


def _inputs(shape, dtype, residual, bias, w_dtype=None):
    D = shape[-1]
    w_dtype = w_dtype or dtype
    x = torch.randn(shape, dtype=dtype, device=DEVICE)
    r = torch.randn(shape, dtype=dtype, device=DEVICE) if residual else None
    w = 1.0 + 0.5 * torch.randn(D, dtype=w_dtype, device=DEVICE)
    b = torch.randn(D, dtype=w_dtype, device=DEVICE) if bias else None
    return x, r, w, b


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 40), (7, 96), (3, 43, 40), (129, 96)])
@pytest.mark.parametrize("kind", ["layer", "rms", "add_layer", "add_rms"])
def test_norm_rule(kind, shape, dtype):
    x, r, w, b = _inputs(shape, dtype, kind.startswith("add"), kind.endswith("layer"))
    if kind == "layer":
        check_op(kind, lambda x, w, b: layer_norm(x, w, b, backend="triton"), reference.layer_norm, [x, w, b])
    elif kind == "rms":
        check_op(kind, lambda x, w: rms_norm(x, w, backend="triton"), reference.rms_norm, [x, w])
    elif kind == "add_layer":
        check_op(kind, lambda x, r, w, b: add_layer_norm(x, r, w, b, backend="triton"),
                 lambda x, r, w, b: reference.add_norm(x, r, w, b, 1e-5, kind="layer"), [x, r, w, b])
    else:
        check_op(kind, lambda x, r, w: add_rms_norm(x, r, w, backend="triton"),
                 lambda x, r, w: reference.add_norm(x, r, w, None, 1e-6, kind="rms"), [x, r, w])


def test_layer_norm_without_bias_and_fp32_weight():
    x, _, w, _ = _inputs((7, 40), torch.float16, False, False, w_dtype=torch.float32)
    check_op("layer_norm(bias=None)", lambda x, w: layer_norm(x, w, None, backend="triton"),
             lambda x, w: reference.layer_norm(x, w, None), [x, w])


def test_large_offset_rows():
    # mean >> std: the two-pass variance must not cancel catastrophically
    x, r, w, b = _inputs((7, 96), torch.float32, True, True)
    x = x + 1000.0
    check_op("add_layer_norm(offset)", lambda x, r, w, b: add_layer_norm(x, r, w, b, backend="triton"),
             lambda x, r, w, b: reference.add_norm(x, r, w, b, 1e-5, kind="layer"), [x, r, w, b])


def test_noncontiguous_input_and_expanded_grad():
    base = torch.randn(96, 7, device=DEVICE)
    x = base.t().requires_grad_()                      # (7, 96), stride (1, 7)
    w = torch.randn(96, device=DEVICE, requires_grad=True)
    y = rms_norm(x, w, backend="triton")
    y.sum().backward()                                  # stride-0 expanded gradient
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    reference.rms_norm(x64, w64).sum().backward()
    check_rule("rms_norm dx (expanded grad)", x.grad, x64.grad, x64.grad.float())
    check_rule("rms_norm dw (expanded grad)", w.grad, w64.grad, w64.grad.float())


def test_empty_input():
    x = torch.randn(0, 40, device=DEVICE, requires_grad=True)
    r = torch.randn(0, 40, device=DEVICE, requires_grad=True)
    w = torch.randn(40, device=DEVICE, requires_grad=True)
    b = torch.randn(40, device=DEVICE, requires_grad=True)
    y, h = add_layer_norm(x, r, w, b, backend="triton")
    assert y.shape == (0, 40) and h.shape == (0, 40)
    (y.sum() + h.sum()).backward()
    assert x.grad.shape == (0, 40) and torch.equal(w.grad, torch.zeros(40)) and torch.equal(b.grad, torch.zeros(40))


def test_torch_backend_is_reference():
    x, r, w, _ = _inputs((7, 40), torch.float32, True, False)
    y, h = add_rms_norm(x, r, w, backend="torch")
    y_ref, h_ref = reference.add_norm(x, r, w, None, 1e-6, kind="rms")
    assert torch.equal(y, y_ref) and torch.equal(h, h_ref)


@pytest.mark.parametrize("call, exc, words", [
    (lambda x, w: layer_norm(x, w[:-1], None), ValueError, "weight"),
    (lambda x, w: layer_norm(x, w, torch.zeros(3)), ValueError, "bias"),
    (lambda x, w: rms_norm(x, None), TypeError, "weight"),
    (lambda x, w: rms_norm(x.long(), w), TypeError, "x"),
    (lambda x, w: rms_norm(x, w, eps=-1.0), ValueError, "eps"),
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
