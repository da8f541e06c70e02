"""The numerics rule (see docs/numerics.md), shared by tests/ and the benchmark's error column.

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
        atol = ATOL.get(out.dtype, 1e-6) * max(scale, 1.0)
    err, err_low = max_err(o, ref64), max_err(ref_low, ref64)
    assert err <= factor * err_low + atol, (
        f"{name}: max|out - ref64| = {err:.3e} > {factor} * max|ref_{str(out.dtype)[6:]} - ref64| "
        f"({err_low:.3e}) + atol ({atol:.1e})")
    return err, err_low
