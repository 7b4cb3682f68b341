"""A whole Swin block as one Triton kernel: the CUDA route for bf16 inference.

Unfused, a block is some twenty CUDA kernels (norms, ``qkv``, the roll and window
partition copies, attention, projection, MLP, residual adds), each reading and
writing every token, so the network runs far under what its arithmetic or the
memory bandwidth allow. Here one program takes one 8x8 window
and does the whole block in registers: it gathers its 64 tokens straight from
the (shifted) image by index arithmetic, so there is no roll and no partition
copy; norm1, the attention keep-mask, ``qkv``, attention with the position bias
and the shift mask, ``proj``, residual, norm2, MLP and residual follow; it writes
the 64 tokens back to where they came from. Tokens stay fp32 between blocks, as
under torch's autocast; the matrix products take bf16 operands with fp32 sums.

Every window reads and writes only its own tokens, so windows need no ordering;
the output goes to a new tensor because the caller (the RSTB residual) still needs
the input. The kernel also runs on the CPU under ``TRITON_INTERPRET=1``, with fp32
products, which is how the tests pin it to the plain block.
"""

from __future__ import annotations

import warnings
import weakref

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU build of torch comes without Triton: the plain route runs instead
    triton = None

__all__ = ["available", "supports", "autocast_dtype", "block_forward"]

NUM_WARPS = 4
"""Warps per window program: 128 threads hold a window's 64 x 64 scores in 32 registers each."""


_failed: str | None = None
"""Why the kernel could not run in this process (then every block takes the fused route)."""


def available() -> bool:
    return triton is not None and _failed is None


def supports(dim: int, num_heads: int, hidden: int, window_size: int) -> bool:
    """Shapes the kernel handles with its registers: any of the released networks' and ours."""
    return window_size == 8 and _pow2(dim) <= 128 and _pow2(hidden) <= 256 and _pow2(dim // num_heads) <= 32


def autocast_dtype(config, device: torch.device) -> torch.dtype | None:
    """The products' type where every block of a network with ``config`` (a ``ModelConfig``)
    can be this kernel: under CUDA autocast to bf16 or fp16, with Triton there and a GPU from
    Ampere on. Else None: the fused route.

    fp32 keeps the fused route: Triton's fp32 products would be TF32, and fp32 is the
    precision that must match the authors' outputs.
    """
    if not torch.is_autocast_enabled("cuda") or torch.cuda.get_device_capability(device) < (8, 0):
        return None
    dtype = torch.get_autocast_dtype("cuda")
    if dtype not in (torch.bfloat16, torch.float16):
        return None
    hidden = int(config.embed_dim * config.mlp_ratio)
    if not available() or not all(
        supports(config.embed_dim, heads, hidden, config.window_size) for heads in config.num_heads
    ):
        return None
    return dtype


def _pow2(n: int) -> int:
    return 1 << max(4, (n - 1).bit_length())  # tl.dot wants every side a power of two and >= 16


if triton is not None:

    @triton.jit
    def _swin_block_kernel(
        x_ptr, out_ptr, keep_ptr, bias_ptr,
        norm1_w, norm1_b, qkv_w, qkv_b, proj_w, proj_b, norm2_w, norm2_b, fc1_w, fc1_b, fc2_w, fc2_b,
        height, width, n_cols, windows_per_image, eps, scale,
        C: tl.constexpr, CP: tl.constexpr, HEADS: tl.constexpr, HDP: tl.constexpr, HIDP: tl.constexpr,
        WS: tl.constexpr, SHIFT: tl.constexpr, HAS_KEEP: tl.constexpr, DOT: tl.constexpr,
    ):
        N: tl.constexpr = WS * WS
        window = tl.program_id(0)
        image = window // windows_per_image
        row = (window % windows_per_image) // n_cols
        col = window % n_cols
        i = tl.arange(0, N)
        # position in the shifted image, then in the image itself (torch.roll by -SHIFT)
        ys = row * WS + i // WS
        xs = col * WS + i % WS
        tokens = image.to(tl.int64) * height * width + ((ys + SHIFT) % height) * width + (xs + SHIFT) % width
        ch = tl.arange(0, CP)
        in_c = ch < C
        x = tl.load(x_ptr + tokens[:, None] * C + ch[None, :], mask=in_c[None, :], other=0.0).to(tl.float32)

        # norm1 (padded channels stay zero: their weights and biases are zero)
        mean = tl.sum(x, 1) / C
        centred = tl.where(in_c[None, :], x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, 1) / C + eps)
        normed = centred * rstd[:, None] * tl.load(norm1_w + ch)[None, :] + tl.load(norm1_b + ch)[None, :]
        if HAS_KEEP:  # the attention mask: dropped tokens enter qkv as zeros
            normed = normed * tl.load(keep_ptr + window.to(tl.int64) * N + i)[:, None]
        normed = normed.to(DOT)

        d = tl.arange(0, HDP)
        scores_at = i[:, None] * N + i[None, :]
        if SHIFT > 0:  # the shift mask: -100 between tokens from different regions of the shifted image
            region = tl.where(ys < height - WS, 0, tl.where(ys < height - SHIFT, 1, 2)) * 3
            region += tl.where(xs < width - WS, 0, tl.where(xs < width - SHIFT, 1, 2))
            shift_mask = tl.where(region[:, None] != region[None, :], -100.0, 0.0)
        attended = tl.zeros((N, CP), tl.float32)
        for h in tl.static_range(HEADS):
            # packed weights: (3, HEADS, CP, HDP) for qkv, (HEADS, HDP, CP) for proj; zero padded
            w_at = ch[:, None] * HDP + d[None, :]
            q = tl.dot(normed, tl.load(qkv_w + (0 * HEADS + h) * CP * HDP + w_at)) + tl.load(qkv_b + (0 * HEADS + h) * HDP + d)[None, :]
            k = tl.dot(normed, tl.load(qkv_w + (1 * HEADS + h) * CP * HDP + w_at)) + tl.load(qkv_b + (1 * HEADS + h) * HDP + d)[None, :]
            v = tl.dot(normed, tl.load(qkv_w + (2 * HEADS + h) * CP * HDP + w_at)) + tl.load(qkv_b + (2 * HEADS + h) * HDP + d)[None, :]
            scores = tl.dot((q * scale).to(DOT), tl.trans(k.to(DOT))) + tl.load(bias_ptr + h * N * N + scores_at)
            if SHIFT > 0:
                scores += shift_mask
            weights = tl.exp(scores - tl.max(scores, 1)[:, None])
            head = tl.dot(weights.to(DOT), v.to(DOT)) / tl.sum(weights, 1)[:, None]
            attended += tl.dot(head.to(DOT), tl.load(proj_w + h * HDP * CP + d[:, None] * CP + ch[None, :]))
        x += attended + tl.load(proj_b + ch)[None, :]

        # norm2, MLP (exact GELU), residual
        mean = tl.sum(x, 1) / C
        centred = tl.where(in_c[None, :], x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, 1) / C + eps)
        normed = centred * rstd[:, None] * tl.load(norm2_w + ch)[None, :] + tl.load(norm2_b + ch)[None, :]
        hid = tl.arange(0, HIDP)
        hidden = tl.dot(normed.to(DOT), tl.load(fc1_w + ch[:, None] * HIDP + hid[None, :])) + tl.load(fc1_b + hid)[None, :]
        hidden = 0.5 * hidden * (1.0 + tl.erf(hidden * 0.7071067811865476))
        x += tl.dot(hidden.to(DOT), tl.load(fc2_w + hid[:, None] * CP + ch[None, :])) + tl.load(fc2_b + ch)[None, :]
        tl.store(out_ptr + tokens[:, None] * C + ch[None, :], x.to(out_ptr.dtype.element_ty), mask=in_c[None, :])


_PACKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""``block -> (key, packed weights)``: the last packing of each Swin block."""


def _packed(block, dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    """The block's weights transposed and zero padded for the kernel, kept per block in this
    kernel's own cache (:data:`_PACKED`, whose entries go with their blocks).

    Rebuilt when a parameter changes (new tensor or in-place update), so a block that is
    trained or reloaded between calls never runs stale weights.
    """
    params = list(block.parameters())
    key = (dtype, device, tuple(p.data_ptr() for p in params), tuple(p._version for p in params))
    cached = _PACKED.get(block)
    if cached is not None and cached[0] == key:
        return cached[1]
    attn, mlp = block.attn, block.mlp
    c, heads = attn.dim, attn.num_heads
    hd, hidden = c // heads, mlp.fc1.out_features
    cp, hdp, hidp = _pow2(c), _pow2(hd), _pow2(hidden)
    f32 = dict(dtype=torch.float32, device=device)

    def vector(t: torch.Tensor, size: int) -> torch.Tensor:
        out = torch.zeros(size, **f32)
        out[: t.numel()] = t.detach().float()
        return out

    with torch.no_grad():
        qkv_w = torch.zeros(3, heads, cp, hdp, **f32)
        qkv_w[:, :, :c, :hd] = attn.qkv.weight.float().view(3, heads, hd, c).transpose(2, 3)
        qkv_b = torch.zeros(3, heads, hdp, **f32)
        qkv_b[:, :, :hd] = attn.qkv.bias.float().view(3, heads, hd)
        proj_w = torch.zeros(heads, hdp, cp, **f32)
        proj_w[:, :hd, :c] = attn.proj.weight.float().t().reshape(heads, hd, c)
        fc1_w = torch.zeros(cp, hidp, **f32)
        fc1_w[:c, :hidden] = mlp.fc1.weight.float().t()
        fc2_w = torch.zeros(hidp, cp, **f32)
        fc2_w[:hidden, :c] = mlp.fc2.weight.float().t()
        packed = {
            "bias": attn.position_bias().float().contiguous(),
            "norm1_w": vector(block.norm1.weight, cp), "norm1_b": vector(block.norm1.bias, cp),
            "qkv_w": qkv_w.to(dtype), "qkv_b": qkv_b,
            "proj_w": proj_w.to(dtype), "proj_b": vector(attn.proj.bias, cp),
            "norm2_w": vector(block.norm2.weight, cp), "norm2_b": vector(block.norm2.bias, cp),
            "fc1_w": fc1_w.to(dtype), "fc1_b": vector(mlp.fc1.bias, hidp),
            "fc2_w": fc2_w.to(dtype), "fc2_b": vector(mlp.fc2.bias, cp),
        }
    _PACKED[block] = (key, packed)
    return packed


def block_forward(
    block, x: torch.Tensor, size: tuple[int, int], keep: torch.Tensor | None, dot_dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor | None:
    """``block(x)`` for (B, H*W, C) tokens (H, W multiples of the window) as one kernel launch;
    None, with a warning once, where the kernel cannot run (the caller then takes another route).

    ``keep``: the (B * windows, N, 1) attention keep-mask in window-partition order of the
    shifted image, as the plain route draws it, or None. ``dot_dtype``: the products'
    operand type (bf16 on a GPU; fp32 for the interpreter, which has no bf16 products).
    """
    global _failed
    if _failed is not None:
        return None  # it failed once in this process: it would again
    h, w = size
    b, n_tokens, c = x.shape
    ws, shift = block.window_size, block.shift_size
    if n_tokens != h * w or h % ws or w % ws:
        raise ValueError(f"tokens {tuple(x.shape)} do not tile {h}x{w} into {ws}x{ws} windows")
    x = x.contiguous()
    p = _packed(block, dot_dtype, x.device)
    out = torch.empty_like(x)
    n_cols = w // ws
    windows = b * (h // ws) * n_cols
    keep_arg = p["bias"] if keep is None else keep.reshape(-1).float().contiguous()
    dot = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}[dot_dtype]
    try:
        _swin_block_kernel[(windows,)](
            x, out, keep_arg, p["bias"],
            p["norm1_w"], p["norm1_b"], p["qkv_w"], p["qkv_b"], p["proj_w"], p["proj_b"],
            p["norm2_w"], p["norm2_b"], p["fc1_w"], p["fc1_b"], p["fc2_w"], p["fc2_b"],
            h, w, n_cols, (h // ws) * n_cols, block.norm1.eps, block.attn.scale,
            C=c, CP=_pow2(c), HEADS=block.attn.num_heads, HDP=_pow2(c // block.attn.num_heads),
            HIDP=_pow2(block.mlp.fc1.out_features), WS=ws, SHIFT=shift, HAS_KEEP=keep is not None, DOT=dot,
            num_warps=NUM_WARPS,
        )
    except Exception as e:  # noqa: BLE001 - Triton's compile and resource errors, a GPU it doesn't support
        _failed = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        warnings.warn(f"the one-kernel Swin block cannot run here ({_failed}); using the slower fused route", RuntimeWarning)
        return None
    return out
