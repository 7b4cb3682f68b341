"""Non-local means as a second stage: average each pixel with look-alikes found far away.

A network whose attention sees 8x8 windows cannot tell a colour blotch tens of pixels wide
from the picture; camera noise (demosaicked, JPEG-compressed) carries such blotches. Non-local
means compares 3x3 patches of a guide (the network's output) over a 21x21 search window and
averages the pixels whose patches look alike, the way BM3D's second stage averages guided by its first
(Buades, Coll & Morel 2005; Dabov et al. 2007). Weights are ``exp(-d / h^2)`` with ``d`` the mean
squared difference of two patches over every channel; the pixel itself has weight 1.

Each pair of pixels (p, p + o) has one distance, so only half the offsets are computed and each
weight is used twice, for p and for p + o.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SEARCH_RADIUS = 10
"""Half-width of the search window (21x21)."""
PATCH_RADIUS = 1
"""Half-width of the compared patches (3x3)."""
ROWS_PER_BAND = 256
"""Image rows handled at once: bounds the working memory on big images (about 40 floats a pixel)."""


def _box_mean(x: torch.Tensor, radius: int) -> torch.Tensor:
    """Mean over (2r+1)x(2r+1) boxes of (..., H, W), valid positions only: (..., H - 2r, W - 2r)."""
    k = 2 * radius + 1
    c = x.cumsum(-1)
    c = torch.cat([c[..., k - 1 : k], c[..., k:] - c[..., :-k]], dim=-1)
    c = c.cumsum(-2)
    c = torch.cat([c[..., k - 1 : k, :], c[..., k:, :] - c[..., :-k, :]], dim=-2)
    return c / (k * k)


@torch.inference_mode()
def nonlocal_means(
    guide: torch.Tensor,
    h: float,
    target: torch.Tensor | None = None,
    *,
    search_radius: int = SEARCH_RADIUS,
    patch_radius: int = PATCH_RADIUS,
) -> torch.Tensor:
    """Average ``target`` (default: ``guide``) with weights from ``guide``'s patches.

    Both are (C, H, W) float images in [0, 1], ``h`` on the same scale. With a denoised image
    as the guide and the noisy one as the target this is BM3D's second stage in non-local
    means form: the noise is averaged away among look-alikes the guide found, so what the
    network took for texture and left, or for noise and flattened, is judged again. With the
    guide alone it smooths the guide. On a noisy image alone it is plain non-local means.
    Borders are reflected.
    """
    if guide.ndim != 3 or (target is not None and target.shape != guide.shape):
        shapes = f"{tuple(guide.shape)}" + ("" if target is None else f" and {tuple(target.shape)}")
        raise ValueError(f"expected (C, H, W) tensors of one shape, got {shapes}")
    target = guide if target is None else target
    if h <= 0:
        return target.clone()
    height = guide.shape[1]
    halo = search_radius + patch_radius
    out = torch.empty_like(target)
    for top in range(0, height, ROWS_PER_BAND):
        bottom = min(height, top + ROWS_PER_BAND)
        lo, hi = max(0, top - halo), min(height, bottom + halo)
        edges = dict(pad_top=top - lo < halo, pad_bottom=hi - bottom < halo)
        band = _band(guide[:, lo:hi], target[:, lo:hi], h, search_radius, patch_radius, **edges)
        out[:, top:bottom] = band[:, top - lo : top - lo + bottom - top]
    return out


def _band(
    guide: torch.Tensor, target: torch.Tensor, h: float, radius: int, patch: int, *, pad_top: bool, pad_bottom: bool
) -> torch.Tensor:
    """:func:`nonlocal_means` of rows (C, h, W); the same shape, valid where the halo reached."""
    c, rows, cols = guide.shape
    halo = radius + patch
    top, bottom = (halo if pad_top else 0), (halo if pad_bottom else 0)
    mode = "reflect" if min(rows, cols) > halo else "replicate"
    xp = F.pad(guide[None], (halo, halo, top, bottom), mode=mode)[0].float()
    tp = xp if target is guide else F.pad(target[None], (halo, halo, top, bottom), mode=mode)[0].float()
    _, H, W = xp.shape
    scale = -1.0 / (h * h * c)
    total = tp.clone()
    weights = torch.ones((H, W), dtype=xp.dtype)
    offsets = [(dy, dx) for dy in range(0, radius + 1) for dx in range(-radius, radius + 1) if dy > 0 or dx > 0]
    for dy, dx in offsets:
        # pairs p = (i, j), q = (i + dy, j + dx), both inside the padded band
        i0, i1 = 0, H - dy
        j0, j1 = max(0, -dx), min(W, W - dx)
        a = xp[:, i0:i1, j0:j1]
        b = xp[:, i0 + dy : i1 + dy, j0 + dx : j1 + dx]
        d = (a - b).square_().sum(0)
        w = _box_mean(d, patch).mul_(scale).exp_()
        # w holds the distance of the patches centred on p + (patch, patch)
        pi, pj = i0 + patch, j0 + patch
        hh, ww = w.shape
        weights[pi : pi + hh, pj : pj + ww] += w
        weights[pi + dy : pi + dy + hh, pj + dx : pj + dx + ww] += w
        total[:, pi : pi + hh, pj : pj + ww].addcmul_(w, tp[:, pi + dy : pi + dy + hh, pj + dx : pj + dx + ww])
        total[:, pi + dy : pi + dy + hh, pj + dx : pj + dx + ww].addcmul_(w, tp[:, pi : pi + hh, pj : pj + ww])
    result = total / weights
    return result[:, top : H - bottom, halo : W - halo].to(target.dtype)
