"""The two masks of masked training: the input mask and the attention keep-mask.

The input mask hides most pixels of the noisy training patch, so the network cannot
learn the noise and has to reconstruct image content from the few pixels left; it
is used in training only. The attention keep-mask zeroes tokens at random inside
every window attention, at training and at inference alike (the network draws it
through :func:`draw_keep_mask`).
"""

from __future__ import annotations

import torch

MASKED_VALUE = -0.1
"""What a masked pixel becomes (the authors' ``x*m - 0.1 + 0.1*m``): outside [0, 1], so it can't pass for a pixel."""


def input_mask(
    x: torch.Tensor, ratio_range: tuple[int, int] = (80, 90), generator: torch.Generator | None = None
) -> torch.Tensor:
    """Hide pixels of ``x`` ((C, H, W) or (B, C, H, W), values in [0, 1]); returns a new tensor.

    For every patch a ratio ``p = randint(low, high) / 100`` is drawn (``ratio_range``
    in percent, both ends included); each pixel position is then masked with
    probability ``p``, all channels together, and set to :data:`MASKED_VALUE`.
    ``(0, 0)`` masks nothing and returns ``x`` unchanged.
    """
    low, high = (int(r) for r in ratio_range)
    if not 0 <= low <= high <= 100:
        raise ValueError(f"ratio_range must satisfy 0 <= low <= high <= 100, not {ratio_range}")
    if high == 0:
        return x
    batched = x.dim() == 4
    if not batched:
        if x.dim() != 3:
            raise ValueError(f"expected a (C, H, W) or (B, C, H, W) tensor, got shape {tuple(x.shape)}")
        x = x.unsqueeze(0)
    b, _, h, w = x.shape
    ratio = torch.randint(low, high + 1, (b, 1, 1, 1), generator=generator, device=x.device).to(x.dtype) / 100
    keep = (torch.rand((b, 1, h, w), generator=generator, device=x.device, dtype=x.dtype) >= ratio).to(x.dtype)
    out = x * keep + MASKED_VALUE * (1 - keep)
    return out if batched else out[0]


def draw_keep_mask(
    shape: tuple[int, ...], ratio_range: tuple[int, int], generator: torch.Generator | None, device: torch.device
) -> torch.Tensor | None:
    """0/1 float attention keep-mask: each token kept with probability 1 - r, r drawn from ``ratio_range`` (%).

    None when the range is (0, 0): no mask.
    """
    low, high = ratio_range
    if high == 0:
        return None
    if low == high:
        ratio = low / 100
    else:
        ratio = int(torch.randint(low, high + 1, (1,), generator=generator, device=device).item()) / 100
    return (torch.rand(shape, generator=generator, device=device) >= ratio).float()


def ramped(ratio_range: tuple[int, int], step: int, ramp: int) -> tuple[int, int]:
    """A mask ratio range scaled by ``min(1, step / ramp)``: a curriculum from no mask to ``ratio_range``.

    ``ramp`` <= 0 gives ``ratio_range`` from the first step. A pure function of the step, so a
    resumed run draws the masks an uninterrupted one would.
    """
    low, high = ratio_range
    if ramp <= 0 or step >= ramp:
        return (int(low), int(high))
    t = max(step, 0) / ramp
    return (round(low * t), round(high * t))
