"""The CPU training route: the plain route's loss and gradients, with less work.

With the attention keep-mask on, a masked token enters ``qkv`` as zeros, so its
query, key and value are all the ``qkv`` bias. Autograd runs through this route;
the one piece with a backward by hand is the masked queries' (:class:`_MaskedQueries`):

- each block gathers its windows straight from the previous block's output (shift,
  partition, and an order inside every window that lists its kept tokens first, in
  one gather) and hands them on in that order;
- windows with about as many kept tokens go together in chunks, and ``norm1`` and
  ``qkv`` run on the listed tokens only: a window's kept tokens, padded with masked
  ones to the chunk's largest count;
- the rest of a window's keys, all ``k_bias`` with value ``v_bias``, are one key whose
  position bias for query ``i`` is ``log sum_j exp(bias_ij)`` over them;
- the masked queries, all the q bias, are handled in aggregate, by one GEMM per
  window kind (:func:`masked_query_attention`); the listed queries attend to the
  listed keys and the rest key;
- where exponentials could underflow, blocks or chunks take the plain attention
  over the same gathered windows (:data:`~mitdenoise.windows.MAX_BIAS_SPREAD`, :data:`~mitdenoise.windows.REST_FLOOR`);
- a training step can run the batch in parts on single-thread workers
  (:func:`backward_in_parts`): a chunk's ops are small, so splitting each op across
  threads mostly waits.

Functions here take the network's modules (``SwinTransformerBlock`` of
:mod:`mitdenoise.model`) and its ``ForwardContext``; ``SwinIR.forward`` sends a CPU
fp32 forward under autograd here (``model.train_route_applies``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from .masking import draw_keep_mask
from .route_cpu import chunk_workers
from .windows import (
    MAX_BIAS_SPREAD,
    REST_FLOOR,
    SHORT_ROW,
    blocks_in_window_order,
    inverse_permutation,
    kind_shift_masks,
    window_layout,
)



class _ShortRowSoftmax(torch.autograd.Function):
    """``x.softmax(-1)`` for rows under 16 floats, forward and backward as separate vectorised passes."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        y = (x - x.amax(-1, keepdim=True)).exp_()
        y /= y.sum(-1, keepdim=True)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (y,) = ctx.saved_tensors
        return y * (grad - (grad * y).sum(-1, keepdim=True))


def softmax(x: torch.Tensor) -> torch.Tensor:
    """``x.softmax(-1)``; rows under :data:`SHORT_ROW` floats through :class:`_ShortRowSoftmax`, since torch's CPU
    softmax and its backward take a scalar loop there."""
    return _ShortRowSoftmax.apply(x) if x.shape[-1] < SHORT_ROW else x.softmax(-1)


class BlockBiases(NamedTuple):
    """A block's attention biases, each window kind's (4 kinds where shifted, else 1)."""

    bias: torch.Tensor
    """Position bias plus shift mask, (kinds, heads, N, N)."""
    rows: torch.Tensor
    """The same as rows to gather from, (kinds * N * N, heads)."""
    exp_bias: torch.Tensor
    """The same exponentiated, each row scaled to a largest entry of 1, zero across the shift seam."""
    row_max: torch.Tensor
    """The log of those scales, (kinds, heads, N)."""
    shift_masks: tuple[torch.Tensor, torch.Tensor] | None
    """:func:`kind_shift_masks`; None unshifted."""


def block_biases(attn, shift_masks: tuple[torch.Tensor, torch.Tensor] | None) -> BlockBiases:
    """:class:`BlockBiases` of ``attn``; ``shift_masks``: :func:`kind_shift_masks`, or None unshifted."""
    bias = attn.position_bias().unsqueeze(0)  # (1, heads, N, N)
    seam = None
    if shift_masks is not None:
        mask, seam = shift_masks
        bias = bias + mask
    heads = bias.shape[1]
    rows = bias.permute(0, 2, 3, 1).reshape(-1, heads)
    row_max = bias.detach().amax(-1)
    exp_bias = (bias - row_max.unsqueeze(-1)).exp()
    if seam is not None:
        exp_bias = exp_bias.masked_fill(seam, 0.0)
    return BlockBiases(bias, rows, exp_bias, row_max, shift_masks)


def bias_spread(attn) -> float:
    """The largest spread of a head's position-bias table, a bound on a bias row's: where it is over
    :data:`MAX_BIAS_SPREAD`, exponentiated biases could underflow and a rest key lose keys that count."""
    bias = attn.relative_position_bias_table.detach()
    return float((bias.amax(0) - bias.amin(0)).amax())


def rest_biases(exp_bias, row_max, kinds, listed_pos, n: int) -> torch.Tensor:
    """For every window, head and position ``p``: ``log sum_j exp(bias_pj)`` over the
    positions ``j`` not listed, ``(windows, heads, N)`` (``exp_bias``, ``row_max`` from
    :func:`block_biases`; ``listed_pos`` the listed positions (windows, nk))."""
    windows = listed_pos.shape[0]
    rest = torch.ones(windows, n, dtype=exp_bias.dtype, device=exp_bias.device)
    rest.scatter_(1, listed_pos, 0.0)
    kind_count, heads = exp_bias.shape[:2]
    sums = exp_bias.reshape(-1, n) @ rest.t()  # (kinds * heads * N, windows)
    sums = sums.view(kind_count, heads, n, windows).permute(3, 0, 1, 2)
    if kind_count > 1:
        sums = sums.gather(1, kinds.view(-1, 1, 1, 1).expand(-1, 1, heads, n))
        row_max = row_max.index_select(0, kinds)
    else:
        row_max = row_max.expand(windows, -1, -1)
    return sums.squeeze(1).clamp_min(REST_FLOOR).log() + row_max


def listed_qkv(attn, norm, x, keep, n_listed: int) -> torch.Tensor:
    """``qkv(norm(x) * keep)`` of the first ``n_listed`` tokens of windows ``x`` (bw, N, C), as
    (3, heads, bw, nk, hd)."""
    bw, n, c = x.shape
    heads = attn.num_heads
    normed = norm(x[:, :n_listed])
    if keep is not None:
        normed = normed * keep[:, :n_listed, None]
    qkv = F.linear(normed, attn.qkv.weight, attn.qkv.bias)
    return qkv.view(bw, n_listed, 3, heads, c // heads).permute(2, 3, 0, 1, 4)


def gathered_bias(rows, kinds, pos, n_queries: int, n_keys: int, n: int) -> torch.Tensor:
    """Position bias (plus shift mask) between the first ``n_queries`` and the first ``n_keys``
    tokens of every window, (heads, bw, n_queries, n_keys), from ``rows`` of :func:`block_biases`."""
    index = (kinds.view(-1, 1, 1) * n + pos[:, :n_queries, None]) * n + pos[:, None, :n_keys]
    bw, heads = len(pos), rows.shape[1]
    return rows.index_select(0, index.flatten()).view(bw, n_queries, n_keys, heads).permute(3, 0, 1, 2)


def attend(attn, q, k, v, bias) -> torch.Tensor:
    """softmax(scale q k^T + bias) v over (heads, bw, rows, hd) queries; returns (heads, bw, rows, hd)."""
    heads, bw, rows, hd = q.shape
    m = k.shape[2]
    scores = torch.baddbmm(
        bias.reshape(heads * bw, rows, m), q.reshape(heads * bw, rows, hd), k.reshape(heads * bw, m, hd).transpose(1, 2),
        alpha=attn.scale,
    )
    return torch.bmm(softmax(scores), v.reshape(heads * bw, m, hd)).view(heads, bw, rows, hd)


def plain_attention(attn, qkv, pos, kinds, biases, n: int) -> torch.Tensor:
    """Attention of every token of the windows, (heads, bw, N, hd), from the listed tokens'
    ``qkv`` (:func:`listed_qkv`): the masked ones' queries are the q bias, and their keys one
    rest key (:func:`rest_biases`)."""
    q, k, v = qkv.unbind(0)
    heads, bw, n_listed, hd = q.shape
    rows, exp_bias, row_max = biases.rows, biases.exp_bias, biases.row_max
    bias = gathered_bias(rows, kinds, pos, n, n_listed, n)
    if n_listed < n:
        q_bias, k_bias, v_bias = attn.qkv.bias.view(3, heads, 1, 1, hd)
        q = torch.cat([q, q_bias.expand(-1, bw, n - n_listed, -1)], 2)
        k = torch.cat([k, k_bias.expand(-1, bw, -1, -1)], 2)
        v = torch.cat([v, v_bias.expand(-1, bw, -1, -1)], 2)
        rest = rest_biases(exp_bias, row_max, kinds, pos[:, :n_listed], n)  # (bw, heads, N) by position
        rest = rest.gather(2, pos.unsqueeze(1).expand(-1, heads, -1)).transpose(0, 1)
        bias = torch.cat([bias, rest.unsqueeze(-1)], -1)
    return attend(attn, q, k, v, bias)


class _MaskedQueries(torch.autograd.Function):
    """The masked queries' attention of a chunk of windows, with a backward by hand.

    Inputs: ``c`` (heads, bw, nk), the masked query's scores (scaled, no bias) of the
    listed keys; ``v`` (heads, bw, nk, hd), the listed values; ``c_rest`` (heads, 1) and
    ``v_bias`` (heads, hd), the same for the rest key; ``exp_bias`` (kinds, heads, N, N)
    from :func:`block_biases`; ``layout`` (:class:`MaskedLayout`).

    Outputs: the masked queries' attention (bw, N - nk, heads * hd), tokens in the
    windows' order; the sums of ``exp_bias`` over the rest at the listed positions
    (heads, bw, nk), for the rest key's bias; and whether every masked query's weights
    summed to more than :data:`REST_FLOOR` (if not, the outputs are not to be used).

    Autograd through the same steps keeps and passes over every intermediate of the
    (heads, N, windows, hd + 2) GEMM operands; by hand, the backward writes the GEMM's
    gradient once and runs two GEMMs, and the rest key's gradient is a weighted sum over
    the masked rows alone.
    """

    @staticmethod
    def forward(ctx, c, v, c_rest, v_bias, exp_bias, layout):
        heads, bw, nk, hd = v.shape
        n = exp_bias.shape[-1]
        top = torch.maximum(c.amax(-1), c_rest)  # (heads, bw): any shift leaves the results as they are
        weight = (c - top.unsqueeze(-1)).exp_()
        rest_weight = (c_rest - top).exp_()
        # Per head, key position and window: [w_j v_j, w_j, 1 if j is in the rest]; the listed keys'
        # rows, then each window's rest row, gathered into position order.
        rows = torch.empty(heads, bw * (nk + 1), hd + 2, dtype=v.dtype, device=v.device)
        listed, rest = rows[:, : bw * nk].view(heads, bw, nk, hd + 2), rows[:, bw * nk :]
        torch.mul(v, weight.unsqueeze(-1), out=listed[..., :hd])
        listed[..., hd] = weight
        listed[..., hd + 1] = 0.0
        torch.mul(rest_weight.unsqueeze(-1), v_bias.unsqueeze(1), out=rest[..., :hd])
        rest[..., hd] = rest_weight
        rest[..., hd + 1] = 1.0
        values = rows.index_select(1, layout.key_sources).view(heads, n, bw, hd + 2)
        sums = layout.by_kind(exp_bias, values)
        flat = sums.view(-1, hd + 2)
        rest_rows = flat.index_select(0, layout.masked_rows)  # (bw * (N - nk) * heads, hd + 2)
        denominator = rest_rows[:, hd]
        ok = bool(denominator.amin() > REST_FLOOR)
        out = rest_rows[:, :hd] / denominator.unsqueeze(-1)
        rest_sums = flat[:, hd + 1].index_select(0, layout.listed_rows).view(heads, bw, nk)
        ctx.layout = layout
        ctx.save_for_backward(v, v_bias, exp_bias, values, weight, rest_weight, out, rest_rows)
        ctx.mark_non_differentiable(flag := torch.tensor(ok))
        return out.view(bw, n - nk, heads * hd), rest_sums, flag

    @staticmethod
    def backward(ctx, d_out, d_rest_sums, _):
        v, v_bias, exp_bias, values, weight, rest_weight, out, rest_rows = ctx.saved_tensors
        layout = ctx.layout
        heads, bw, nk, hd = v.shape
        n = exp_bias.shape[-1]
        d_out = d_out.reshape(-1, hd)
        inverse = rest_rows[:, hd].reciprocal()
        # The masked rows' gradients, then the listed rows', gathered into the sums' order.
        d_all = torch.empty(n * bw * heads, hd + 2, dtype=v.dtype, device=v.device)
        d_rows, d_listed_rows = d_all[: len(rest_rows)], d_all[len(rest_rows) :]
        torch.mul(d_out, inverse.unsqueeze(-1), out=d_rows[:, :hd])
        d_rows[:, hd] = -(d_out * out).sum(-1) * inverse
        d_rows[:, hd + 1] = 0.0
        d_listed_rows[:, : hd + 1] = 0.0
        d_listed_rows[:, hd + 1] = d_rest_sums.reshape(-1)
        d_sums = d_all.index_select(0, layout.sum_sources).view(heads, n, bw, hd + 2)
        d_values, d_exp_bias = layout.by_kind_backward(exp_bias, values, d_sums)
        # Listed keys: values [w v, w, 0] at their positions.
        d_listed = d_values.view(heads, n * bw, hd + 2).index_select(1, layout.listed_keys).view(heads, bw, nk, hd + 2)
        d_weighted = d_listed[..., :hd]
        d_weight = (d_weighted * v).sum(-1) + d_listed[..., hd]
        d_v = d_weighted * weight.unsqueeze(-1)
        d_c = d_weight * weight
        # The rest: sum over its positions p of d_values[p] = sum over masked rows i of S_i d_sums[i].
        rest_sums = rest_rows[:, hd + 1 :]
        d_rest = (d_rows[:, : hd + 1] * rest_sums).view(bw, n - nk, heads, hd + 1).sum(1).transpose(0, 1)
        d_rest_weight = (d_rest[..., :hd] * v_bias.unsqueeze(1)).sum(-1) + d_rest[..., hd]  # (heads, bw)
        d_v_bias = (d_rest[..., :hd] * rest_weight.unsqueeze(-1)).sum(1)
        d_c_rest = (d_rest_weight * rest_weight).sum(1, keepdim=True)
        return d_c, d_v, d_c_rest, d_v_bias, d_exp_bias, None


class MaskedLayout:
    """Where a chunk's tokens sit in :class:`_MaskedQueries`' (heads, N, windows, hd + 2) sums:
    rows of the listed keys by position, rows of the masked queries and of the listed ones in
    the windows' token order, and the windows of each kind (all one kind unshifted).

    Also the gathers that put rows written side by side into position order (one
    ``index_select`` copies rows of a few floats faster than ``index_copy_`` writes them):
    ``key_sources`` for the GEMM's operand (the listed keys' rows, then one rest row a
    window) and ``sum_sources`` for the sums' gradient (the masked rows, then the listed)."""

    def __init__(self, pos: torch.Tensor, kinds: torch.Tensor, n_listed: int, heads: int, kind_count: int) -> None:
        bw, n = pos.shape
        window = torch.arange(bw, device=pos.device)
        by_position = pos * bw + window.unsqueeze(1)  # (bw, N): row of (position, window) in (N, bw)
        self.listed_keys = by_position[:, :n_listed].flatten()
        head = torch.arange(heads, device=pos.device) * (n * bw)
        self.masked_rows = (by_position[:, n_listed:, None] + head).flatten()  # (bw, N - nk, heads)
        self.listed_rows = (by_position[None, :, :n_listed] + head.view(-1, 1, 1)).flatten()  # (heads, bw, nk)
        self.sum_sources = inverse_permutation(torch.cat([self.masked_rows, self.listed_rows]))
        key_rows = torch.arange(bw * n_listed, device=pos.device).view(bw, n_listed)
        sources = (bw * n_listed + window).view(bw, 1).expand(-1, n).clone()  # rest rows after the listed
        sources.scatter_(1, pos[:, :n_listed], key_rows)  # (bw, N) by position
        self.key_sources = sources.t().flatten()  # (N, bw): where each (position, window) row comes from
        self.edges = [(k, w) for k in range(1, kind_count) if len(w := (kinds == k).nonzero().flatten())]
        self.edge_windows = torch.cat([w for _, w in self.edges]) if self.edges else None

    def by_kind(self, exp_bias: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """``exp_bias[kind] @ values`` for the windows of each kind; values (heads, N, bw, hd + 2)."""
        heads, n, bw, width = values.shape
        out = torch.matmul(exp_bias[0], values.view(heads, n, -1)).view(heads, n, bw, width)
        for kind, windows in self.edges:
            part = torch.matmul(exp_bias[kind], values.index_select(2, windows).view(heads, n, -1))
            out.index_copy_(2, windows, part.view(heads, n, -1, width))
        return out

    def by_kind_backward(self, exp_bias, values, d_sums) -> tuple[torch.Tensor, torch.Tensor]:
        """Gradients of :meth:`by_kind` (``d_sums`` is overwritten)."""
        heads, n, bw, width = values.shape
        d_exp_bias = torch.zeros_like(exp_bias)
        parts = []
        if self.edge_windows is not None:
            parts = [(kind, windows, d_sums.index_select(2, windows)) for kind, windows in self.edges]
            d_sums.index_fill_(2, self.edge_windows, 0.0)
        d_values = torch.matmul(exp_bias[0].mT, d_sums.view(heads, n, -1)).view(heads, n, bw, width)
        d_exp_bias[0] = torch.matmul(d_sums.view(heads, n, -1), values.view(heads, n, -1).mT)
        for kind, windows, d_part in parts:
            d_part = d_part.view(heads, n, -1)
            d_values.index_copy_(2, windows, torch.matmul(exp_bias[kind].mT, d_part).view(heads, n, -1, width))
            d_exp_bias[kind] = torch.matmul(d_part, values.index_select(2, windows).view(heads, n, -1).mT)
        return d_values, d_exp_bias


def masked_query_attention(attn, qkv, pos, kinds, biases, n: int) -> torch.Tensor | None:
    """:func:`plain_attention` for windows with masked tokens, the masked queries in aggregate;
    (bw, N, C).

    A masked query is the q bias, so it scores every key ``j`` as ``c_j + bias_ij`` with
    ``c_j`` the same for all masked queries of a window: their softmax numerators factorise
    as ``exp(c_j) * exp(bias_ij)``, and one GEMM per window kind of the exponentiated
    biases with ``[exp(c_j) v_j, exp(c_j), 1 if j is in the rest]`` over all windows gives
    their outputs and, in its last column, the rest key's bias of the listed queries
    (:class:`_MaskedQueries`). None where those sums could underflow (the caller then takes
    :func:`plain_attention`).
    """
    q, k, v = qkv.unbind(0)
    heads, bw, n_listed, hd = q.shape
    rows, exp_bias, row_max = biases.rows, biases.exp_bias, biases.row_max
    q_bias, k_bias, v_bias = attn.qkv.bias.view(3, heads, hd)
    c = (k * q_bias.view(heads, 1, 1, hd)).sum(-1) * attn.scale  # (heads, bw, nk)
    c_rest = (k_bias * q_bias).sum(-1, keepdim=True) * attn.scale  # (heads, 1)
    layout = MaskedLayout(pos, kinds, n_listed, heads, len(exp_bias))
    masked_out, rest_sums, ok = _MaskedQueries.apply(c, v, c_rest, v_bias, exp_bias, layout)
    if not bool(ok):
        return None
    listed_max = row_max.index_select(0, kinds).gather(2, pos[:, None, :n_listed].expand(-1, heads, -1))
    rest_bias = rest_sums.clamp_min(REST_FLOOR).log() + listed_max.transpose(0, 1)
    bias = torch.cat([gathered_bias(rows, kinds, pos, n_listed, n_listed, n), rest_bias.unsqueeze(-1)], -1)
    k = torch.cat([k, k_bias.view(heads, 1, 1, hd).expand(-1, bw, -1, -1)], 2)
    v = torch.cat([v, v_bias.view(heads, 1, 1, hd).expand(-1, bw, -1, -1)], 2)
    listed_out = attend(attn, q, k, v, bias).permute(1, 2, 0, 3).reshape(bw, n_listed, heads * hd)
    return torch.cat([listed_out, masked_out], 1)


def unmasked_attention(attn, qkv, kinds, biases) -> torch.Tensor:
    """Attention of windows without a keep-mask, tokens in position order, (heads, bw, N, hd):
    every window takes the kind-0 bias by broadcasting, and the few edge windows of a shifted
    block their shift masks on top."""
    q, k, v = qkv.unbind(0)
    scores = (q * attn.scale) @ k.transpose(-2, -1) + biases.bias[0].unsqueeze(1)
    if biases.shift_masks is not None:
        edges = (kinds > 0).nonzero().flatten()
        if len(edges):
            masks = biases.shift_masks[0].index_select(0, kinds.index_select(0, edges)).transpose(0, 1)
            scores.index_add_(1, edges, masks.expand(scores.shape[0], -1, -1, -1))
    return softmax(scores) @ v


def chunk_attention(attn, norm, x, keep, pos, kinds, n_listed: int, biases) -> torch.Tensor:
    """``x + attn(norm(x) * keep)`` for windows ``x`` (bw, N, C) whose tokens come in the order
    ``pos`` (their position in the window), listed tokens first (the first ``n_listed``)."""
    bw, n, c = x.shape
    qkv = listed_qkv(attn, norm, x, keep, n_listed)
    out = None
    if pos is None:
        out = unmasked_attention(attn, qkv, kinds, biases).permute(1, 2, 0, 3)
    elif n_listed < n:
        out = masked_query_attention(attn, qkv, pos, kinds, biases, n)
    if out is None:
        out = plain_attention(attn, qkv, pos, kinds, biases, n).permute(1, 2, 0, 3)
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
    if keep is None:
        pos = counts = None
    else:
        keep = keep.view(len(order), n)
        counts = keep.sum(1)
        by_count = torch.argsort(counts, stable=True)  # windows with as many kept tokens together
        order, kinds, keep, counts = order[by_count], kinds[by_count], keep[by_count], counts[by_count]
        pos = torch.argsort(keep, dim=1, descending=True, stable=True)  # kept tokens first
        keep = keep.gather(1, pos)
        order = order.gather(1, pos)
    out_rows = order.flatten()
    source = out_rows if rows is None else inverse_permutation(rows).index_select(0, out_rows)
    windows = flat.index_select(0, source).view(len(order), n, c)
    masks = ctx.cached(("shift_masks", ws, shift, str(flat.device)), lambda: kind_shift_masks(ws, shift, flat.device))
    biases = block_biases(block.attn, masks if shift else None)
    step = ctx.chunk_windows or len(order)
    starts = range(0, len(order), step)
    if counts is None or bias_spread(block.attn) > MAX_BIAS_SPREAD:
        n_listed = [n] * len(starts)  # every token listed: no rest key, the plain attention
    else:
        n_listed = [int(counts[s : s + step].max()) for s in starts]
    outs = []
    for start, part, nk in zip(starts, windows.split(step), n_listed):
        stop = start + len(part)
        part_keep, part_pos = (None, None) if keep is None else (keep[start:stop], pos[start:stop])
        y = chunk_attention(block.attn, block.norm1, part, part_keep, part_pos, kinds[start:stop], nk, biases)
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
