"""Gradient dissimilarity Gamma and its decomposition (method.md section 3)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def gamma(gradients: Sequence[torch.Tensor]) -> float:
    """Gamma = (1/N) sum_i ||g_i - g_bar||^2."""
    g = torch.stack([t.double() for t in gradients])
    return float(((g - g.mean(0)) ** 2).sum(1).mean())


def gamma_decomposition(original: Sequence[torch.Tensor], fused: Sequence[torch.Tensor]) -> dict[str, float]:
    """Gamma_fused = Gamma_orig + R + Phi, with Delta_i = delta_i^fused - delta_i^orig,
    R = (1/N) sum ||Delta_i||^2 and Phi = (2/N) sum <delta_i^orig, Delta_i>."""
    g_orig = torch.stack([t.double() for t in original])
    g_fused = torch.stack([t.double() for t in fused])
    d_orig = g_orig - g_orig.mean(0)
    d_fused = g_fused - g_fused.mean(0)
    delta = d_fused - d_orig
    return {
        "gamma": float((d_fused**2).sum(1).mean()),
        "gamma_orig": float((d_orig**2).sum(1).mean()),
        "gamma_R": float((delta**2).sum(1).mean()),
        "gamma_Phi": float(2 * (d_orig * delta).sum(1).mean()),
    }
