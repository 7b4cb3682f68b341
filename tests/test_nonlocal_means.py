"""The second stage's non-local means: the average it defines, in bands as in one piece."""

import pytest
import torch
import torch.nn.functional as F

from mitdenoise.nonlocal_means import nonlocal_means


def _nonlocal_means_by_definition(guide, target, h, radius, patch):
    """Every offset of the window, every pixel: sum_q w(p, q) target(q) / sum_q w(p, q)."""
    c, height, width = guide.shape
    halo = radius + patch
    g = F.pad(guide[None], (halo,) * 4, mode="reflect")[0].double()
    t = F.pad(target[None], (halo,) * 4, mode="reflect")[0].double()
    out = torch.zeros(c, height, width, dtype=torch.float64)
    for i in range(height):
        for j in range(width):
            pi, pj = i + halo, j + halo
            centre = g[:, pi - patch : pi + patch + 1, pj - patch : pj + patch + 1]
            total, weights = torch.zeros(c, dtype=torch.float64), 0.0
            for dy in range(-radius, radius + 1):
                for dx in range(-radius, radius + 1):
                    qi, qj = pi + dy, pj + dx
                    other = g[:, qi - patch : qi + patch + 1, qj - patch : qj + patch + 1]
                    w = torch.exp(-((centre - other) ** 2).mean() / (h * h))
                    total += w * t[:, qi, qj]
                    weights += w
            out[:, i, j] = total / weights
    return out.float()


def test_nonlocal_means_is_the_weighted_average_it_defines():
    rng = torch.Generator().manual_seed(0)
    guide = 0.3 + 0.4 * torch.rand(3, 11, 13, generator=rng)
    target = torch.rand(3, 11, 13, generator=rng)
    for t in (None, target):
        expected = _nonlocal_means_by_definition(guide, guide if t is None else t, 0.1, 3, 1)
        got = nonlocal_means(guide, 0.1, t, search_radius=3, patch_radius=1)
        assert torch.allclose(got, expected, atol=1e-5)


def test_nonlocal_means_in_bands_equals_one_band(monkeypatch):
    rng = torch.Generator().manual_seed(1)
    guide, target = torch.rand(3, 70, 30, generator=rng), torch.rand(3, 70, 30, generator=rng)
    whole = nonlocal_means(guide, 0.2, target, search_radius=4)
    monkeypatch.setattr("mitdenoise.nonlocal_means.ROWS_PER_BAND", 16)
    assert torch.allclose(nonlocal_means(guide, 0.2, target, search_radius=4), whole, atol=1e-6)


def test_nonlocal_means_keeps_a_constant_image_and_averages_noise_away():
    flat = torch.full((3, 40, 40), 0.4)
    assert torch.allclose(nonlocal_means(flat, 0.02), flat, atol=1e-6)
    noisy = flat + 0.02 * torch.randn(3, 40, 40, generator=torch.Generator().manual_seed(0))
    assert nonlocal_means(flat, 0.02, noisy).sub(flat).std() < 0.25 * noisy.sub(flat).std()
    assert torch.equal(nonlocal_means(flat, 0.0, noisy), noisy)
    with pytest.raises(ValueError, match="one shape"):
        nonlocal_means(flat, 0.02, noisy[:, :20])
