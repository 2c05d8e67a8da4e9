"""Gradual mask and the Levy–Desplanques guard."""

from __future__ import annotations

import torch

from aqexport.calibrate.transforms import (
    band_width,
    dominance_margin,
    enforce_dominance_,
    gradual_mask,
    matrix_report,
)


def test_band_grows_from_diagonal_to_full():
    widths = [band_width(e, 5, 9) for e in range(5)]
    assert widths[0] == 1 and widths[-1] == 9 and widths == sorted(widths)
    mask = gradual_mask(5, 2, 0.1)
    assert torch.equal(mask.diagonal(), torch.ones(5))
    assert mask[0, 1] == mask[1, 0] == torch.tensor(0.1) and mask[0, 2] == 0


def test_guard_keeps_every_matrix_invertible_under_adversarial_updates():
    torch.manual_seed(0)
    n = 32
    learned = torch.eye(n).repeat(3, 1, 1)
    mask = gradual_mask(n, n, 1.0)
    for step in range(200):
        # Adversarial: push off-diagonals up, diagonals toward zero and across sign.
        learned += 0.5 * torch.randn_like(learned)
        learned.diagonal(dim1=-2, dim2=-1).mul_(0.3)
        if step % 17 == 0:
            learned[..., 3, :] = 1e3  # a row entirely dominated by its off-diagonals
            learned.diagonal(dim1=-2, dim2=-1)[..., 5] = 0.0
        enforce_dominance_(learned, mask, margin=1e-2)
        effective = learned * mask
        assert bool((dominance_margin(effective) >= 1e-2 - 1e-6).all())
        report = matrix_report(effective)
        assert report["inverse_error"] < 1e-8
        assert torch.isfinite(torch.linalg.inv(effective.double())).all()


def test_guard_leaves_dominant_matrices_alone():
    a = torch.eye(4) * 2 + 0.1
    before = a.clone()
    assert enforce_dominance_(a, torch.ones(4, 4)) == 0
    assert torch.equal(a, before)
