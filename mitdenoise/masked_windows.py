"""Window attention with masked tokens: the layout and the maths both CPU routes share.

With the attention keep-mask on, a masked token enters ``qkv`` as zeros, so its query, key
and value are all the ``qkv`` bias. The CPU routes (:mod:`~mitdenoise.route_cpu` for
inference, :mod:`~mitdenoise.route_train` for training) use that to do less work, the same way:

- the layout (:func:`kept_first`): windows with about as many kept tokens together, and
  inside every window its kept tokens first. A route gathers windows in that order straight
  from the previous block's output and runs ``norm1`` and ``qkv`` on a chunk's first
  ``n_listed`` tokens only (the "listed" ones: a window's kept tokens, padded with masked
  ones to the chunk's largest count);
- the rest of a window's keys, all ``k_bias`` with value ``v_bias``, are one key whose
  position bias for query ``i`` is ``log sum_j exp(bias_ij)`` over them;
- the masked queries, all the q bias, score every key ``j`` as ``c_j + bias_ij`` with ``c_j``
  the same for all of them: their softmax numerators factorise as ``exp(c_j) exp(bias_ij)``,
  and one GEMM per window kind gives their outputs and the rest key's bias
  (:func:`masked_query_sums`);
- the listed queries attend to the listed keys and the rest key (:func:`masked_query_attention`);
- where exponentials could underflow (:data:`MAX_BIAS_SPREAD`,
  :data:`REST_FLOOR`), the plain attention over the same windows
  (:func:`plain_attention`).

Autograd runs through all of it; the one backward written by hand, the masked queries',
is training's (:class:`mitdenoise.route_train.MaskedQueries`), around :func:`masked_query_sums`.
Functions here take the network's modules (``WindowAttention``, ``SwinTransformerBlock``) and tensors.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .windows import inverse_permutation, kind_shift_masks

MAX_BIAS_SPREAD = 60.0
"""Above this spread of a bias row, ``exp(bias - row max)`` could underflow to 0 for keys that
count: masked keys are then not taken as one rest key, and every token is listed."""
REST_FLOOR = 1e-30
"""Smallest sum of exponentiated biases taken as it is: below it a rest key weighs nothing, and
masked queries whose weights sum below it take the plain attention."""
SHORT_ROW = 16
"""Softmax rows shorter than this take separate vectorised passes: torch's CPU softmax (and its
backward) runs a scalar loop there."""

# --- softmax ------------------------------------------------------------------------------------


class _ShortRowSoftmax(torch.autograd.Function):
    """``x.softmax(-1)`` for rows under :data:`SHORT_ROW` floats, forward and backward as separate
    vectorised passes: torch's CPU softmax (and its backward) takes a scalar loop there."""

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
    """``x.softmax(-1)``; rows under :data:`SHORT_ROW` floats through :class:`_ShortRowSoftmax`."""
    return _ShortRowSoftmax.apply(x) if x.shape[-1] < SHORT_ROW else x.softmax(-1)


# --- biases and layout --------------------------------------------------------------------------


class BlockBiases(NamedTuple):
    """A block's attention biases, each window kind's (4 kinds where shifted, else 1)."""

    bias: torch.Tensor
    """Position bias plus shift mask, (kinds, heads, N, N)."""
    per_head: torch.Tensor
    """The same as (heads, kinds * N * N), to gather from (:func:`gathered_bias`)."""
    exp_bias: torch.Tensor
    """The same exponentiated, each row scaled to a largest entry of 1, zero across the shift seam."""
    row_max: torch.Tensor
    """The log of those scales, (kinds, heads, N)."""
    shift_masks: tuple[torch.Tensor, torch.Tensor] | None
    """:func:`~mitdenoise.windows.kind_shift_masks`; None unshifted."""


def block_biases(attn, shift_masks: tuple[torch.Tensor, torch.Tensor] | None) -> BlockBiases:
    """:class:`BlockBiases` of ``attn``; ``shift_masks``: :func:`~mitdenoise.windows.kind_shift_masks`, or None unshifted."""
    bias = attn.position_bias().unsqueeze(0)  # (1, heads, N, N)
    seam = None
    if shift_masks is not None:
        mask, seam = shift_masks
        bias = bias + mask
    heads = bias.shape[1]
    per_head = bias.transpose(0, 1).reshape(heads, -1)
    row_max = bias.detach().amax(-1)
    exp_bias = (bias - row_max.unsqueeze(-1)).exp()
    if seam is not None:
        exp_bias = exp_bias.masked_fill(seam, 0.0)
    return BlockBiases(bias, per_head, exp_bias, row_max, shift_masks)


def biases_of(block, ctx, device: torch.device) -> BlockBiases:
    """:func:`block_biases` of a Swin block, its kinds' shift masks kept in ``ctx``'s layout cache."""
    ws, shift = block.window_size, block.shift_size
    if not shift:
        return block_biases(block.attn, None)
    masks = ctx.cached(("shift_masks", ws, shift, str(device)), lambda: kind_shift_masks(ws, shift, device))
    return block_biases(block.attn, masks)


def rest_key_applies(attn) -> bool:
    """Whether masked keys can be one rest key: not where a head's position-bias table spreads over
    :data:`MAX_BIAS_SPREAD` (a bound on a bias row's spread), since ``exp(bias - row max)`` could
    then underflow for keys that count. Where it does not apply, every token is listed."""
    table = attn.relative_position_bias_table.detach()
    return float((table.amax(0) - table.amin(0)).amax()) <= MAX_BIAS_SPREAD


class KeptFirst(NamedTuple):
    """Windows with masked tokens in the order both CPU routes take them (:func:`kept_first`)."""

    order: torch.Tensor
    """Token index of every (window, slot), (windows, N): gather the windows with it."""
    kinds: torch.Tensor
    """Each window's kind (:func:`~mitdenoise.windows.window_kinds`)."""
    keep: torch.Tensor
    """Keep-mask of every (window, slot), (windows, N): ones, then zeros."""
    pos: torch.Tensor
    """Position in its window of every (window, slot), (windows, N)."""
    counts: torch.Tensor
    """Kept tokens of every window, ascending."""


def kept_first(order: torch.Tensor, kinds: torch.Tensor, keep: torch.Tensor) -> KeptFirst:
    """Windows (``order``, ``kinds``: :func:`~mitdenoise.windows.window_layout`, partition order)
    with keep-mask ``keep`` (windows, N, 1) in the shared layout: windows sorted by their kept
    count (chunks of them need little padding to their largest), each window's kept tokens first."""
    keep = keep.view(len(order), -1)
    counts = keep.sum(1)
    by_count = torch.argsort(counts, stable=True)
    order, kinds, keep, counts = order[by_count], kinds[by_count], keep[by_count], counts[by_count]
    pos = torch.argsort(keep, dim=1, descending=True, stable=True)
    return KeptFirst(order.gather(1, pos), kinds, keep.gather(1, pos), pos, counts)


def listed_counts(layout: KeptFirst, step: int, rest_key: bool) -> list[int]:
    """Listed tokens of each chunk of ``step`` windows: the largest kept count in it, or every token
    where there is no rest key (:func:`rest_key_applies`)."""
    n = layout.pos.shape[1]
    starts = range(0, len(layout.order), step)
    if not rest_key:
        return [n] * len(starts)
    return [int(layout.counts[s : s + step].max()) for s in starts]


def gathered_bias(per_head: torch.Tensor, kinds, pos, n_queries: int, n_keys: int) -> torch.Tensor:
    """Position bias (plus shift mask) between the first ``n_queries`` and the first ``n_keys``
    tokens of every window, (heads, bw, n_queries, n_keys), from :attr:`BlockBiases.per_head`."""
    n = pos.shape[1]
    index = (kinds.view(-1, 1, 1) * n + pos[:, :n_queries, None]) * n + pos[:, None, :n_keys]
    heads = per_head.shape[0]
    return per_head.index_select(1, index.flatten()).view(heads, len(pos), n_queries, n_keys)


def listed_qkv(attn, norm, x, keep, n_listed: int, qkv_linear) -> torch.Tensor:
    """``qkv(norm(x) * keep)`` of the first ``n_listed`` tokens of windows ``x`` (bw, N, C), as
    (3, heads, bw, nk, hd) float32; ``keep`` (bw, N) or None; ``qkv_linear`` maps (rows, C) to
    (rows, 3C) (the route's own linear)."""
    bw, n, c = x.shape
    heads = attn.num_heads
    normed = norm(x[:, :n_listed])
    if keep is not None:
        normed = normed * keep[:, :n_listed, None]
    qkv = qkv_linear(normed.reshape(bw * n_listed, c)).float()
    return qkv.view(bw, n_listed, 3, heads, c // heads).permute(2, 3, 0, 1, 4)


# --- attention ----------------------------------------------------------------------------------


def attend(attn, q, k, v, bias) -> torch.Tensor:
    """softmax(scale q k^T + bias) v over (heads, bw, rows, hd) queries; returns (heads, bw, rows, hd)."""
    heads, bw, rows, hd = q.shape
    m = k.shape[2]
    scores = torch.baddbmm(
        bias.reshape(heads * bw, rows, m), q.reshape(heads * bw, rows, hd), k.reshape(heads * bw, m, hd).transpose(1, 2),
        alpha=attn.scale,
    )
    return torch.bmm(softmax(scores), v.reshape(heads * bw, m, hd)).view(heads, bw, rows, hd)


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


def plain_attention(attn, qkv, pos, kinds, biases: BlockBiases) -> torch.Tensor:
    """Attention of every token of the windows, (heads, bw, N, hd), from the listed tokens'
    ``qkv`` (3, heads, bw, nk, hd) (every token listed: the attention as it is): the masked
    ones' queries are the q bias, and their keys one rest key (:func:`rest_biases`)."""
    q, k, v = qkv.unbind(0)
    heads, bw, n_listed, hd = q.shape
    n = pos.shape[1]
    bias = gathered_bias(biases.per_head, kinds, pos, n, n_listed)
    if n_listed < n:
        q_bias, k_bias, v_bias = attn.qkv.bias.view(3, heads, 1, 1, hd)
        q = torch.cat([q, q_bias.expand(-1, bw, n - n_listed, -1)], 2)
        k = torch.cat([k, k_bias.expand(-1, bw, -1, -1)], 2)
        v = torch.cat([v, v_bias.expand(-1, bw, -1, -1)], 2)
        rest = rest_biases(biases.exp_bias, biases.row_max, kinds, pos[:, :n_listed], n)  # (bw, heads, N) by position
        rest = rest.gather(2, pos.unsqueeze(1).expand(-1, heads, -1)).transpose(0, 1)
        bias = torch.cat([bias, rest.unsqueeze(-1)], -1)
    return attend(attn, q, k, v, bias)


class MaskedLayout:
    """Where a chunk's tokens sit in the masked queries' (heads, N, windows, hd + 2) sums
    (:func:`masked_query_sums`): rows of the listed keys by position, rows of the masked
    queries and of the listed ones in the windows' token order, and the windows of each
    kind (all one kind unshifted).

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
        key_rows = torch.arange(bw * n_listed, device=pos.device).view(bw, n_listed)
        sources = (bw * n_listed + window).view(bw, 1).expand(-1, n).clone()  # rest rows after the listed
        sources.scatter_(1, pos[:, :n_listed], key_rows)  # (bw, N) by position
        self.key_sources = sources.t().flatten()  # (N, bw): where each (position, window) row comes from
        self.edges = [(k, w) for k in range(1, kind_count) if len(w := (kinds == k).nonzero().flatten())]
        self.edge_windows = torch.cat([w for _, w in self.edges]) if self.edges else None

    @property
    def sum_sources(self) -> torch.Tensor:
        """Rows of the masked rows then the listed rows, in the sums' order (for the backward only)."""
        return inverse_permutation(torch.cat([self.masked_rows, self.listed_rows]))

    def by_kind(self, exp_bias: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """``exp_bias[kind] @ values`` for the windows of each kind; values (heads, N, bw, hd + 2)."""
        heads, n, bw, width = values.shape
        out = torch.matmul(exp_bias[0], values.view(heads, n, -1)).view(heads, n, bw, width)
        for kind, windows in self.edges:
            part = torch.matmul(exp_bias[kind], values.index_select(2, windows).view(heads, n, -1))
            out.index_copy_(2, windows, part.view(heads, n, -1, width))
        return out


class MaskedSums(NamedTuple):
    """:func:`masked_query_sums`' results, and what a backward needs of its steps."""

    out: torch.Tensor
    """The masked queries' attention, (bw, N - nk, heads * hd), tokens in the windows' order."""
    rest_sums: torch.Tensor
    """The sums of ``exp_bias`` over the rest at the listed positions (heads, bw, nk): the rest key's bias."""
    ok: bool
    """Whether every masked query's weights summed to more than :data:`REST_FLOOR` (if not, the
    results are not to be used)."""
    values: torch.Tensor
    """The GEMM's operand, (heads, N, bw, hd + 2)."""
    weight: torch.Tensor
    rest_weight: torch.Tensor
    query_sums: torch.Tensor
    """The masked queries' rows of the sums, (bw * (N - nk) * heads, hd + 2)."""


def masked_query_sums(c, v, c_rest, v_bias, exp_bias, layout: MaskedLayout) -> MaskedSums:
    """The masked queries' attention of a chunk of windows, in aggregate.

    ``c`` (heads, bw, nk): the masked query's scores (scaled, no bias) of the listed keys;
    ``v`` (heads, bw, nk, hd): the listed values; ``c_rest`` (heads, 1) and ``v_bias``
    (heads, hd): the same for the rest key; ``exp_bias`` (kinds, heads, N, N) from
    :func:`block_biases`. Weights ``exp(c_j - max c) * exp_bias_ij`` over all N keys, then
    normalised; one GEMM per window kind against, per window, head and key j:
    ``[w_j v_j, w_j, 1 if j is in the rest]``.
    """
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
    flat = layout.by_kind(exp_bias, values).view(-1, hd + 2)
    query_sums = flat.index_select(0, layout.masked_rows)  # (bw * (N - nk) * heads, hd + 2)
    denominator = query_sums[:, hd]
    ok = bool(denominator.amin() > REST_FLOOR)
    masked_out = query_sums[:, :hd] / denominator.unsqueeze(-1)
    rest_sums = flat[:, hd + 1].index_select(0, layout.listed_rows).view(heads, bw, nk)
    out = masked_out.view(bw, n - nk, heads * hd)
    return MaskedSums(out, rest_sums, ok, values, weight, rest_weight, query_sums)


def masked_queries(c, v, c_rest, v_bias, exp_bias, layout: MaskedLayout) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """``(out, rest_sums, ok)`` of :func:`masked_query_sums`, without gradients."""
    sums = masked_query_sums(c, v, c_rest, v_bias, exp_bias, layout)
    return sums.out, sums.rest_sums, sums.ok


def masked_query_attention(attn, qkv, pos, kinds, biases: BlockBiases, queries=masked_queries) -> torch.Tensor | None:
    """:func:`plain_attention` for windows with masked tokens, the masked queries in aggregate
    (``queries``: :func:`masked_queries`, or training's with its backward); (bw, N, C), tokens in
    the windows' order. None where the masked queries' sums could underflow (the caller then
    takes :func:`plain_attention`)."""
    q, k, v = qkv.unbind(0)
    heads, bw, n_listed, hd = q.shape
    q_bias, k_bias, v_bias = attn.qkv.bias.view(3, heads, hd)
    c = (k * q_bias.view(heads, 1, 1, hd)).sum(-1) * attn.scale  # (heads, bw, nk)
    c_rest = (k_bias * q_bias).sum(-1, keepdim=True) * attn.scale  # (heads, 1)
    layout = MaskedLayout(pos, kinds, n_listed, heads, len(biases.exp_bias))
    masked_out, rest_sums, ok = queries(c, v, c_rest, v_bias, biases.exp_bias, layout)
    if not bool(ok):
        return None
    listed_max = biases.row_max.index_select(0, kinds).gather(2, pos[:, None, :n_listed].expand(-1, heads, -1))
    rest_bias = rest_sums.clamp_min(REST_FLOOR).log() + listed_max.transpose(0, 1)
    bias = torch.cat([gathered_bias(biases.per_head, kinds, pos, n_listed, n_listed), rest_bias.unsqueeze(-1)], -1)
    k = torch.cat([k, k_bias.view(heads, 1, 1, hd).expand(-1, bw, -1, -1)], 2)
    v = torch.cat([v, v_bias.view(heads, 1, 1, hd).expand(-1, bw, -1, -1)], 2)
    listed_out = attend(attn, q, k, v, bias).permute(1, 2, 0, 3).reshape(bw, n_listed, heads * hd)
    return torch.cat([listed_out, masked_out], 1)
