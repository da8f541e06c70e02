"""The numerics rule (README, "How correctness is judged"), shared by tests/ and the benchmark's error column.

    max|out - ref64| <= 2 * max|ref_low - ref64| + atol

ref64 is the reference in float64, ref_low the same reference at the kernel's dtype: a kernel may be no more than
twice as wrong as PyTorch itself at that precision.
"""
from __future__ import annotations

import torch

ATOL = {torch.float32: 1e-6, torch.float16: 1e-5, torch.bfloat16: 1e-4, torch.float64: 1e-12}


def max_err(out: torch.Tensor, ref64: torch.Tensor) -> float:
    """max|out - ref64|, ignoring positions where both are -inf (e.g. LSE of rows that see no key)."""
    o, r = out.detach().to(torch.float64).cpu(), ref64.detach().to(torch.float64).cpu()
    both_inf = torch.isinf(o) & torch.isinf(r) & (torch.sign(o) == torch.sign(r))
    diff = torch.where(both_inf, torch.zeros_like(o), (o - r).abs())
    return float(diff.max()) if diff.numel() else 0.0


def check_rule(name: str, out: torch.Tensor, ref64: torch.Tensor, ref_low: torch.Tensor, *, atol: float | None = None,
               factor: float = 2.0) -> tuple[float, float]:
    """Assert the numerics rule for one tensor; returns (kernel error, torch's own error at low precision)."""
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref64.shape)}"
    o = out.detach().cpu()
    ref_nan = torch.isnan(ref64.detach().cpu())
    assert not (torch.isnan(o) & ~ref_nan).any(), f"{name}: NaN where the reference is finite"
    if atol is None:
        scale = float(ref64.detach().abs().max()) if ref64.numel() else 1.0
        scale = scale if scale == scale and scale != float("inf") and scale > 0 else 1.0
        atol = ATOL.get(out.dtype, 1e-6) * scale  # per unit of the reference's magnitude, up or down
    err, err_low = max_err(o, ref64), max_err(ref_low, ref64)
    assert err <= factor * err_low + atol, (
        f"{name}: max|out - ref64| = {err:.3e} > {factor} * max|ref_{str(out.dtype)[6:]} - ref64| "
        f"({err_low:.3e}) + atol ({atol:.1e})")
    return err, err_low


def passes_rule(name: str, out: torch.Tensor, ref64: torch.Tensor, ref_low: torch.Tensor, **kw) -> tuple[bool, float,
                                                                                                        float]:
    """check_rule as a verdict, for reports that judge instead of assert: (passed, kernel error, torch's own error)."""
    try:
        return (True, *check_rule(name, out, ref64, ref_low, **kw))
    except AssertionError:
        return False, max_err(out, ref64), max_err(ref_low, ref64)


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
