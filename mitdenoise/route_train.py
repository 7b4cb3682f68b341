"""The CPU training route: the plain route's loss and gradients, with less work.

Windows with masked tokens take the layout and the maths of :mod:`mitdenoise.masked_windows`,
which the inference route shares; autograd runs through them. What is training's own:

- the masked queries' backward, written by hand (:class:`MaskedQueries`): autograd through
  their forward would keep and pass over every intermediate of the GEMM's operands;
- linears through autograd (``F.linear``), and each chunk's output a new tensor;
- a training step can run the batch in parts on single-thread workers
  (:func:`backward_in_parts`): a chunk's ops are small, so splitting each op across
  threads mostly waits.

Functions here take the network's modules (``SwinTransformerBlock`` of
:mod:`mitdenoise.model`) and its ``ForwardContext``; ``SwinIR.forward`` sends a CPU
fp32 forward under autograd here (``model.train_route_applies``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .masked_windows import (
    BlockBiases,
    MaskedLayout,
    biases_of,
    kept_first,
    listed_qkv,
    listed_counts,
    masked_query_attention,
    masked_query_sums,
    plain_attention,
    rest_key_applies,
    softmax,
)
from .masking import draw_keep_mask
from .route_cpu import chunk_workers
from .windows import blocks_in_window_order, inverse_permutation, window_layout


class MaskedQueries(torch.autograd.Function):
    """:func:`~mitdenoise.masked_windows.masked_query_sums` with a backward by hand.

    Inputs as there; outputs ``(out, rest_sums, ok)``, ``ok`` a tensor autograd leaves alone.
    Autograd through the same steps keeps and passes over every intermediate of the
    (heads, N, windows, hd + 2) GEMM operands; by hand, the backward writes the GEMM's
    gradient once and runs two GEMMs, and the rest key's gradient is a weighted sum over
    the masked rows alone.
    """

    @staticmethod
    def forward(ctx, c, v, c_rest, v_bias, exp_bias, layout):
        sums = masked_query_sums(c, v, c_rest, v_bias, exp_bias, layout)
        ctx.layout = layout
        ctx.save_for_backward(v, v_bias, exp_bias, sums.values, sums.weight, sums.rest_weight, sums.out, sums.query_sums)
        ctx.mark_non_differentiable(flag := torch.tensor(sums.ok))
        return sums.out, sums.rest_sums, flag

    @staticmethod
    def backward(ctx, d_out, d_rest_sums, _):
        v, v_bias, exp_bias, values, weight, rest_weight, out, query_sums = ctx.saved_tensors
        layout = ctx.layout
        heads, bw, nk, hd = v.shape
        n = exp_bias.shape[-1]
        d_out = d_out.reshape(-1, hd)
        inverse = query_sums[:, hd].reciprocal()
        # The masked rows' gradients, then the listed rows', gathered into the sums' order.
        d_all = torch.empty(n * bw * heads, hd + 2, dtype=v.dtype, device=v.device)
        d_rows, d_listed_rows = d_all[: len(query_sums)], d_all[len(query_sums) :]
        torch.mul(d_out, inverse.unsqueeze(-1), out=d_rows[:, :hd])
        d_rows[:, hd] = -(d_out * out.reshape(-1, hd)).sum(-1) * inverse
        d_rows[:, hd + 1] = 0.0
        d_listed_rows[:, : hd + 1] = 0.0
        d_listed_rows[:, hd + 1] = d_rest_sums.reshape(-1)
        d_sums = d_all.index_select(0, layout.sum_sources).view(heads, n, bw, hd + 2)
        d_values, d_exp_bias = by_kind_backward(layout, exp_bias, values, d_sums)
        # Listed keys: values [w v, w, 0] at their positions.
        d_listed = d_values.view(heads, n * bw, hd + 2).index_select(1, layout.listed_keys).view(heads, bw, nk, hd + 2)
        d_weighted = d_listed[..., :hd]
        d_weight = (d_weighted * v).sum(-1) + d_listed[..., hd]
        d_v = d_weighted * weight.unsqueeze(-1)
        d_c = d_weight * weight
        # The rest: sum over its positions p of d_values[p] = sum over masked rows i of S_i d_sums[i].
        rest_sums = query_sums[:, hd + 1 :]
        d_rest = (d_rows[:, : hd + 1] * rest_sums).view(bw, n - nk, heads, hd + 1).sum(1).transpose(0, 1)
        d_rest_weight = (d_rest[..., :hd] * v_bias.unsqueeze(1)).sum(-1) + d_rest[..., hd]  # (heads, bw)
        d_v_bias = (d_rest[..., :hd] * rest_weight.unsqueeze(-1)).sum(1)
        d_c_rest = (d_rest_weight * rest_weight).sum(1, keepdim=True)
        return d_c, d_v, d_c_rest, d_v_bias, d_exp_bias, None


def by_kind_backward(layout: MaskedLayout, exp_bias, values, d_sums) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of :meth:`MaskedLayout.by_kind <mitdenoise.masked_windows.MaskedLayout.by_kind>`
    (``d_sums`` is overwritten)."""
    heads, n, bw, width = values.shape
    d_exp_bias = torch.zeros_like(exp_bias)
    parts = []
    if layout.edge_windows is not None:
        parts = [(kind, windows, d_sums.index_select(2, windows)) for kind, windows in layout.edges]
        d_sums.index_fill_(2, layout.edge_windows, 0.0)
    d_values = torch.matmul(exp_bias[0].mT, d_sums.view(heads, n, -1)).view(heads, n, bw, width)
    d_exp_bias[0] = torch.matmul(d_sums.view(heads, n, -1), values.view(heads, n, -1).mT)
    for kind, windows, d_part in parts:
        d_part = d_part.view(heads, n, -1)
        d_values.index_copy_(2, windows, torch.matmul(exp_bias[kind].mT, d_part).view(heads, n, -1, width))
        d_exp_bias[kind] = torch.matmul(d_part, values.index_select(2, windows).view(heads, n, -1).mT)
    return d_values, d_exp_bias


def unmasked_attention(attn, qkv, kinds, biases) -> torch.Tensor:
    """Attention of windows without a keep-mask, tokens in position order, (heads, bw, N, hd):
    every window takes the kind-0 bias by broadcasting, and the few edge windows of a shifted
    block their shift masks on top. Training's own: the inference route's
    ``F.scaled_dot_product_attention`` a window kind at a time is slower here, its backward
    dearer than these scores' (docs/experiments.md)."""
    q, k, v = qkv.unbind(0)
    scores = (q * attn.scale) @ k.transpose(-2, -1) + biases.bias[0].unsqueeze(1)
    if biases.shift_masks is not None:
        edges = (kinds > 0).nonzero().flatten()
        if len(edges):
            masks = biases.shift_masks[0].index_select(0, kinds.index_select(0, edges)).transpose(0, 1)
            scores.index_add_(1, edges, masks.expand(scores.shape[0], -1, -1, -1))
    return softmax(scores) @ v


def chunk_attention(attn, norm, x, keep, pos, kinds, n_listed: int, biases: BlockBiases) -> torch.Tensor:
    """``x + attn(norm(x) * keep)`` for windows ``x`` (bw, N, C) whose tokens come in the order
    ``pos`` (their position in the window), listed tokens first (the first ``n_listed``)."""
    bw, n, c = x.shape
    qkv = listed_qkv(attn, norm, x, keep, n_listed, lambda t: F.linear(t, attn.qkv.weight, attn.qkv.bias))
    out = None
    if pos is None:
        out = unmasked_attention(attn, qkv, kinds, biases).permute(1, 2, 0, 3)
    elif n_listed < n:
        out = masked_query_attention(attn, qkv, pos, kinds, biases, MaskedQueries.apply)
    if out is None:
        out = plain_attention(attn, qkv, pos, kinds, biases).permute(1, 2, 0, 3)
    return x.reshape(bw * n, c) + attn.proj(out.reshape(bw * n, c))


def block_forward(block, flat: torch.Tensor, rows: torch.Tensor | None, size: tuple[int, int], ctx):
    """A Swin block on tokens held in any row order (``flat[p]`` is token ``rows[p]``; ``rows``
    None: token order). Returns the output and its rows, for the next block to gather from."""
    h, w = size
    c = flat.shape[1]
    b = flat.shape[0] // (h * w)
    ws, shift = block.window_size, block.shift_size
    n = ws * ws
    order, kinds = window_layout(ctx, b, h, w, ws, shift, flat.device)
    keep = ctx.keep_mask((len(order), n, 1), flat.device)
    step = ctx.chunk_windows or len(order)
    layout = None
    if keep is None:
        n_listed = [n] * len(range(0, len(order), step))
    else:
        layout = kept_first(order, kinds, keep)
        order, kinds = layout.order, layout.kinds
        n_listed = listed_counts(layout, step, rest_key_applies(block.attn))
    out_rows = order.flatten()
    source = out_rows if rows is None else inverse_permutation(rows).index_select(0, out_rows)
    windows = flat.index_select(0, source).view(len(order), n, c)
    biases = biases_of(block, ctx, flat.device)
    outs = []
    for start, part, nk in zip(range(0, len(order), step), windows.split(step), n_listed):
        part_keep, part_pos = (None, None) if layout is None else (layout.keep[start : start + step], layout.pos[start : start + step])
        y = chunk_attention(block.attn, block.norm1, part, part_keep, part_pos, kinds[start : start + step], nk, biases)
        outs.append(y + block.mlp(block.norm2(y)))
    return torch.cat(outs) if len(outs) > 1 else outs[0], out_rows


def residual_group_forward(blocks, x: torch.Tensor, size: tuple[int, int], ctx) -> torch.Tensor:
    """The Swin blocks of one RSTB on (B, H*W, C) tokens through this route; token order again after."""
    return blocks_in_window_order(blocks, x, size, ctx, block_forward)


def draw_keep_masks(model, x: torch.Tensor, ratio: tuple[int, int], generator) -> list[torch.Tensor | None]:
    """The keep-masks a forward of ``model`` on ``x`` draws, block after block, drawn up front:
    same shapes, same order, so the same masks from the same generator."""
    config = model.config
    ws = config.window_size
    h, w = (-(-size // ws) * ws for size in x.shape[-2:])
    shape = (x.shape[0] * (h // ws) * (w // ws), ws * ws, 1)
    return [draw_keep_mask(shape, ratio, generator, x.device) for _ in range(sum(config.depths))]


def part_drawer(masks: list, part: slice):
    """A ``draw_mask`` for ``SwinIR.forward`` that hands out ``masks[k][part]`` on its k-th call."""
    calls = iter(masks)

    def draw(shape, ratio_range, generator, device):
        mask = next(calls)
        if mask is None:
            return None
        mask = mask[part]
        if mask.shape != tuple(shape):
            raise RuntimeError(f"keep-mask drawn for {tuple(mask.shape)}, the network asked for {tuple(shape)}")
        return mask

    return draw


def backward_in_parts(model, x, target, loss_fn, generator, ratio: tuple[int, int]) -> torch.Tensor | None:
    """``loss_fn(model(x), target).backward()`` with the batch in parts side by side on the CPU's
    single-thread workers (:func:`~mitdenoise.route_cpu.chunk_workers`); returns the (detached) loss,
    or None with nothing done where there are no workers or fewer than two images.

    ``loss_fn`` must be a mean over the batch: each part's loss is weighted by its share. The
    keep-masks are drawn up front for the whole batch (:func:`draw_keep_masks`), so the parts see
    the masks one forward would; each part's gradients come back from ``torch.autograd.grad`` and
    are summed in a fixed order, so the result does not depend on which worker ends first.
    """
    pool = chunk_workers()
    if pool is None or len(x) < 2:
        return None
    n_parts = min(torch.get_num_threads(), len(x))
    bounds = [round(i * len(x) / n_parts) for i in range(n_parts + 1)]
    masks = draw_keep_masks(model, x, ratio, generator)
    windows = next((len(m) for m in masks if m is not None), 0) // len(x)
    params = [p for p in model.parameters() if p.requires_grad]

    def run(part: int):
        first, stop = bounds[part], bounds[part + 1]
        draw = part_drawer(masks, slice(first * windows, stop * windows))
        with torch.enable_grad():
            out = model(x[first:stop], draw_mask=draw, mask_ratio=ratio)
            loss = loss_fn(out, target[first:stop]) * ((stop - first) / len(x))
            return loss.detach(), torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True)

    results = list(pool.map(run, range(n_parts)))
    for i, p in enumerate(params):
        grad = results[0][1][i]
        for _, grads in results[1:]:
            grad = grad + grads[i]
        p.grad = grad if p.grad is None else p.grad + grad
    total = results[0][0]
    for loss, _ in results[1:]:
        total = total + loss
    return total
