"""The input mask of masked training (the attention mask lives in :mod:`mitdenoise.model`).

During training most pixels of the noisy patch are hidden, so the network cannot
learn the noise and has to reconstruct image content from the few pixels left.
The mask is used in training only; at inference the whole image is seen.
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
