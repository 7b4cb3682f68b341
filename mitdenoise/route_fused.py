"""The CUDA inference route: window attention as one fused kernel.

Unfused, the (windows, heads, N, N) scores go to memory and back several times,
most of the network's memory traffic; ``F.scaled_dot_product_attention`` keeps them
on chip. All windows take the position bias alone, then the few masked ones (the
shifted block's last row and column of windows) are redone with their shift mask.

Inference only: the fused kernels' backward refused these shapes, so training keeps
the plain route. ``SwinIR.forward`` sends a CUDA forward without autograd here; under
bf16/fp16 autocast a whole Swin block can instead be one Triton kernel
(:mod:`mitdenoise.triton_block`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FUSED_WINDOWS = 32768
"""Windows per chunk on the fused route: each fused attention call stays under CUDA's
65535-block grid limit (y and z), along which attention kernels may lay out their batch."""


def padded_qkv(attn, x: torch.Tensor) -> torch.Tensor:
    """``attn.qkv(x)`` as (bn, N, 3, heads, hd') with each head zero-padded to hd' = a multiple of 8.

    Fused attention kernels need the head size aligned (16 bytes); the network's
    is 60 / 6 = 10. Zero columns leave the products unchanged, and padding the
    weights rather than the activations costs no extra copy.
    """
    bn, n, c = x.shape
    heads, hd = attn.num_heads, c // attn.num_heads
    padded = -(-hd // 8) * 8
    weight = attn.qkv.weight.view(3, heads, hd, c)
    bias = attn.qkv.bias.view(3, heads, hd)
    if padded != hd:
        weight = F.pad(weight, (0, 0, 0, padded - hd))
        bias = F.pad(bias, (0, padded - hd))
    return F.linear(x, weight.reshape(-1, c), bias.reshape(-1)).view(bn, n, 3, heads, padded)


def fused_attention(attn, x: torch.Tensor, keep: torch.Tensor | None, mask, rows: tuple[int, int]) -> torch.Tensor:
    """``attn(x, keep, mask, rows)`` (the plain ``WindowAttention.forward``) through
    ``F.scaled_dot_product_attention``; ``mask`` is the block's ``EdgeShiftMask`` or None."""
    if keep is not None:
        x = x * keep
    bn, n, c = x.shape
    hd = c // attn.num_heads
    q, k, v = padded_qkv(attn, x).permute(2, 0, 3, 1, 4).unbind(0)  # (bn, heads, N, padded hd)
    bias = attn.position_bias().to(q.dtype).contiguous()  # kernels want the mask's rows contiguous
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.expand(bn, -1, -1, -1), scale=attn.scale)
    if mask is not None:
        index, masks = mask.edges(rows)
        per_image = (rows[1] - rows[0]) * mask.grid[1]
        images = bn // per_image
        index = (torch.arange(images, device=index.device).unsqueeze(1) * per_image + index).flatten()
        edge_bias = (bias + masks.to(bias.dtype)).repeat(images, 1, 1, 1)
        edge = F.scaled_dot_product_attention(
            q.index_select(0, index), k.index_select(0, index), v.index_select(0, index),
            attn_mask=edge_bias, scale=attn.scale,
        )
        out = out.index_copy(0, index, edge)
    return attn.proj(out[..., :hd].transpose(1, 2).reshape(bn, n, c))
