"""The CPU inference route: attention over the kept tokens only, windows gathered in place.

Same numbers as the plain route (to 1e-5, pinned by tests/test_model.py), less work:

- a masked token enters ``qkv`` as zeros, so :func:`masked_attention` runs ``qkv`` on
  the kept tokens only and handles the masked ones in aggregate;
- each block gathers its windows straight from the previous block's output (shift
  and partition in one copy), in chunks of windows with about as many kept tokens,
  and hands them on in that order (:func:`block_forward`): nothing is scattered
  back to token order until the end of a residual group;
- chunks run on parallel single-thread workers (:func:`map_chunks`): a chunk's ops
  are small, so splitting each op across threads would mostly wait;
- linears take oneDNN where torch has it (:func:`cpu_linear`), and convs run
  channels-last on the tokens' own memory (see ``ForwardContext.channels_last``).

Functions here take the network's modules (``WindowAttention``, ``Mlp``,
``SwinTransformerBlock`` of :mod:`mitdenoise.model`) and a ``ForwardContext``;
``SwinIR.forward`` sends a CPU forward without autograd here.
"""

from __future__ import annotations

import weakref
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F
from torch import nn

from .windows import (
    MAX_BIAS_SPREAD,
    REST_FLOOR,
    SEAM,
    SHORT_ROW,
    blocks_in_window_order,
    inverse_permutation,
    kind_shift_masks,
    window_layout,
)

MLP_ROWS = 2048
"""Tokens per MLP call: a chunk's tokens in slices that stay in cache."""


def _has_onednn_linear() -> bool:
    """Whether oneDNN's linear is there and answers as expected (it is a private op of torch's)."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    x, weight, bias = torch.ones(2, 3), torch.ones(4, 3), torch.ones(4)
    try:
        y = torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "none")
    except (RuntimeError, TypeError):
        return False
    return y.shape == (2, 4) and bool((y == 4).all())


ONEDNN_LINEAR = _has_onednn_linear()
"""Whether :func:`cpu_linear` can take oneDNN (x86 builds of torch have it)."""


def cpu_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, gelu: bool = False
) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, then GELU if ``gelu``, for 2-D inference inputs.

    Through oneDNN's linear where torch has it: faster than ``F.linear`` for the block's
    skinny token-wise shapes, and the GELU fuses into its output pass. Same values to
    fp32 rounding.
    """
    if ONEDNN_LINEAR and x.device.type == "cpu" and x.dtype == torch.float32:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu" if gelu else "none", [], "none")
    y = F.linear(x, weight, bias)
    return F.gelu(y) if gelu else y


_BF16_WEIGHTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""``nn.Linear -> (key, weight, bias)``: its weights in bf16, prepacked for oneDNN, gone with it."""


def _bf16_weights(layer: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``layer``'s weight in bf16 (in oneDNN's blocked layout where :data:`ONEDNN_LINEAR`) and
    bias in bf16; kept until the weights change in place or are replaced."""
    weight, bias = layer.weight, layer.bias
    key = (weight.data_ptr(), weight._version, None if bias is None else (bias.data_ptr(), bias._version))
    last = _BF16_WEIGHTS.get(layer)
    if last is not None and last[0] == key:
        return last[1], last[2]
    packed = weight.detach().to(torch.bfloat16)
    if ONEDNN_LINEAR:
        packed = torch.ops.mkldnn._reorder_linear_weight(packed, MLP_ROWS)
    bias16 = None if bias is None else bias.detach().to(torch.bfloat16)
    _BF16_WEIGHTS[layer] = (key, packed, bias16)
    return packed, bias16


def linear(x: torch.Tensor, layer: nn.Linear, dtype: torch.dtype, gelu: bool = False) -> torch.Tensor:
    """``layer(x)`` (then GELU if ``gelu``) for 2-D inference inputs, products in ``dtype``.

    float32: :func:`cpu_linear`. bfloat16: ``x`` rounded to bf16 (if it is not already) against
    the layer's bf16 weights (:func:`_bf16_weights`), sums in float32 inside oneDNN, the result
    in bf16: the caller adds it into a float32 residual or hands it to the next bf16 linear.
    """
    if dtype == torch.float32:
        return cpu_linear(x, layer.weight, layer.bias, gelu=gelu)
    weight, bias = _bf16_weights(layer)
    x = x.to(dtype)
    if ONEDNN_LINEAR:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu" if gelu else "none", [], "none")
    y = F.linear(x, weight, bias)
    return F.gelu(y) if gelu else y


def short_row_softmax(scores: torch.Tensor) -> torch.Tensor:
    """``scores.softmax(-1)`` for rows of n_kept + 1 scores; rows under :data:`SHORT_ROW` are done in
    ``scores`` itself (the caller drops it), longer ones in a new tensor.

    torch's CPU softmax takes a scalar loop for rows shorter than 16 floats; separate
    vectorised passes (max, subtract, exp, sum, divide) are faster there.
    """
    if scores.shape[-1] >= SHORT_ROW:
        return scores.softmax(dim=-1)
    scores -= scores.amax(-1, keepdim=True)
    scores.exp_()
    return scores.div_(scores.sum(-1, keepdim=True))


_CHUNK_WORKERS: dict = {}


def chunk_workers():
    """A pool of ``torch.get_num_threads()`` workers that run ops on one thread each; None for one.

    Chunks side by side on one thread each beat one chunk at a time on all threads:
    a chunk's ops are small, so splitting each op across threads mostly waits.
    Same numbers either way.
    """
    n = torch.get_num_threads()
    if n < 2 or (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None  # under torchrun (validation while training) keep to the caller's thread
    pool = _CHUNK_WORKERS.get(n)
    if pool is None:
        pool = _CHUNK_WORKERS[n] = ThreadPoolExecutor(n, initializer=torch.set_num_threads, initargs=(1,))
    return pool


def map_chunks(run, chunks: list) -> None:
    """Run ``run`` on every chunk: on CPU workers of one intra-op thread each where there are several."""
    pool = chunk_workers() if len(chunks) > 1 else None
    if pool is None:
        for chunk in chunks:
            run(chunk)
        return

    inference = torch.is_inference_mode_enabled()

    def run_without_grad(chunk):  # autograd modes are per thread: take the caller's
        with torch.inference_mode() if inference else torch.no_grad():
            run(chunk)

    for _ in pool.map(run_without_grad, chunks):
        pass


# --- attention ----------------------------------------------------------------------------------


def kind_biases(attn, shift: int) -> torch.Tensor:
    """Position bias plus shift mask of each window kind (see :func:`window_kinds`): (4, heads, N, N)."""
    inner = attn.position_bias()
    if not shift:
        return inner.expand(4, -1, -1, -1).contiguous()
    return inner + kind_shift_masks(attn.window_size, shift, inner.device)[0]


_EXP_BIASES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""``attn -> (bias, exp_biases(attn, bias))``: the last result per attention module, gone with it."""


def _same_tensor_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b)


def exp_biases(attn, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """For :func:`masked_attention`: ``exp(bias)`` with each row scaled so that its largest entry
    is 1, zero across the shift seam, and the log of that scale, (4, heads, N). None where
    the exponential could underflow a whole row.

    Kept for ``attn`` from the last call while ``bias`` is the same (it is, tile after tile), in
    this route's own cache (:data:`_EXP_BIASES`).
    """
    last = _EXP_BIASES.get(attn)
    if last is not None and _same_tensor_values(last[0], bias):
        return last[1]
    if float(bias[0].amax() - bias[0].amin()) > MAX_BIAS_SPREAD:  # kind 0 has no seam: the position bias alone
        result = None
    else:
        row_max = bias.amax(-1)
        result = (bias - row_max.unsqueeze(-1)).exp().masked_fill_(bias < SEAM, 0.0), row_max
    _EXP_BIASES[attn] = (bias, result)
    return result


def masked_attention(
    attn,
    x: torch.Tensor,
    keep: torch.Tensor,
    bias: torch.Tensor,
    exp_biases: tuple[torch.Tensor, torch.Tensor],
    kinds: torch.Tensor,
    norm: nn.Module,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor | None:
    """``x += attn(norm(x), keep)``, in place, on the kept tokens (inference only).

    A masked token enters ``qkv`` as zeros, so its query, key and value are all the
    ``qkv`` bias. So ``qkv`` runs on the kept tokens only (padded with masked ones to
    the chunk's largest count: the "listed" tokens of a window); the rest, all alike
    but for their position, are handled in aggregate:

    - masked queries score ``c_j + bias_ij`` with ``c_j`` the same for all of them, so
      their softmax numerators factorise as ``exp(c_j) * exp(bias_ij)`` and all of them
      share one GEMM per window kind;
    - a listed query sees the listed keys one by one and the rest as one key, ``k_bias``
      with value ``v_bias``, whose position bias is ``log sum_j exp(bias_ij)`` over the
      rest (a column of that same GEMM).

    ``norm`` (the block's first LayerNorm) is applied here, to the listed tokens only. ``qkv``
    and ``proj`` take their products in ``dtype`` (:func:`linear`), the attention in float32.
    Returns None, with ``x`` untouched, where weights could underflow (the caller then
    takes :func:`attention_by_kind`).
    """
    bw, n, c = x.shape
    keep = keep.view(bw, n)
    n_kept = int(keep.sum(1).max())
    # The first n_kept tokens of every window after this sort include all its kept ones.
    order = torch.argsort(keep, dim=1, descending=True, stable=True)[:, :n_kept]
    listed_rows = (order + torch.arange(0, bw * n, n, device=x.device).unsqueeze(1)).flatten()  # into (bw * N) rows
    x_kept = norm(x.view(bw * n, c).index_select(0, listed_rows).view(bw, n_kept, c))
    x_kept *= torch.gather(keep, 1, order).unsqueeze(-1)
    qkv_kept = linear(x_kept.view(bw * n_kept, c), attn.qkv, dtype).float()
    qkv_kept = qkv_kept.view(bw, n_kept, 3, attn.num_heads, -1).permute(2, 3, 0, 1, 4)  # (3, heads, bw, nk, hd)
    masked = _masked_queries(attn, qkv_kept, order, exp_biases[0], kinds)
    if masked is None:
        return None
    out, rest_sums = masked
    kept_out = _listed_queries(attn, qkv_kept, order, bias, exp_biases[1], rest_sums, kinds)
    out.view(bw * n, c).index_copy_(0, listed_rows, kept_out.permute(1, 2, 0, 3).reshape(bw * n_kept, c))
    x.view(bw * n, c).add_(linear(out.view(bw * n, c), attn.proj, dtype))
    return x


def _masked_queries(
    attn, qkv_kept: torch.Tensor, order: torch.Tensor, exp_bias: torch.Tensor, kinds: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """:func:`masked_attention`'s masked queries, in aggregate: every token's output as a masked
    query (bw, N, heads, hd) and, per head, key position and window, the sum of the rest's
    exp_bias (heads, N, bw); None where a row's weights underflowed.

    Weights ``exp(c_j - max c) * exp_bias_ij`` over all N keys, then normalised; one GEMM per
    window kind against, per window, head and key j: ``[w_j v_j, w_j, 1 if j is in the rest]``.
    """
    heads, bw, n_kept, hd = qkv_kept.shape[1:]
    n = exp_bias.shape[-1]
    q_bias, k_bias, v_bias = attn.qkv.bias.view(3, heads, 1, hd)
    listed_scores = (qkv_kept[1] @ (q_bias * attn.scale).unsqueeze(-1)).squeeze(-1)  # (heads, bw, nk)
    rest_score = (k_bias * q_bias).sum(-1) * attn.scale  # (heads, 1)
    top = torch.maximum(listed_scores.amax(-1), rest_score)  # (heads, bw)
    listed_weights = (listed_scores - top.unsqueeze(-1)).exp_()
    rest_weights = (rest_score - top).exp_()
    # Per window, head and key position j: [w_j v_j, w_j, 1 if j is in the rest], keys last.
    dtype, device = qkv_kept.dtype, qkv_kept.device
    values = torch.empty(heads, bw, hd + 2, n, dtype=dtype, device=device)
    values[:, :, :hd] = (rest_weights.unsqueeze(-1) * v_bias).unsqueeze(-1)
    values[:, :, hd] = rest_weights.unsqueeze(-1)
    values[:, :, hd + 1] = 1.0
    listed = torch.empty(heads, bw, hd + 2, n_kept, dtype=dtype, device=device)
    torch.mul(qkv_kept[2].transpose(2, 3), listed_weights.unsqueeze(2), out=listed[:, :, :hd])
    listed[:, :, hd] = listed_weights
    listed[:, :, hd + 1] = 0.0
    values.scatter_(3, order.view(1, bw, 1, n_kept).expand(heads, bw, hd + 2, n_kept), listed)
    # (heads, N, bw, hd + 2): exp_bias @ values, window by window, as one linear per head.
    sums = torch.stack([cpu_linear(exp_bias[0, h], values[h].view(-1, n)) for h in range(heads)])
    sums = sums.view(heads, n, bw, hd + 2)
    for kind in (1, 2, 3):
        windows = (kinds == kind).nonzero().flatten()
        if len(windows):
            part = torch.bmm(exp_bias[kind], values.index_select(1, windows).view(heads, -1, n).transpose(1, 2))
            sums.index_copy_(2, windows, part.view(heads, n, -1, hd + 2))
    inverse_sums = sums[..., hd].reciprocal()
    if not bool(inverse_sums.amax() < 1 / REST_FLOOR):
        return None  # a row sees only keys whose weights underflowed
    out = torch.empty(bw, n, heads, hd, dtype=dtype, device=device)
    torch.mul(sums[..., :hd], inverse_sums.unsqueeze(-1), out=out.permute(2, 1, 0, 3))
    return out, sums[..., hd + 1]


def _listed_queries(
    attn,
    qkv_kept: torch.Tensor,
    order: torch.Tensor,
    bias: torch.Tensor,
    row_max: torch.Tensor,
    rest_sums: torch.Tensor,
    kinds: torch.Tensor,
) -> torch.Tensor:
    """:func:`masked_attention`'s listed queries: each attends to the listed keys one by one and to
    the rest as one key, ``k_bias`` with value ``v_bias``, whose position bias is the log of
    its exp_bias row sum (``rest_sums``, from :func:`_masked_queries`) plus the row's scale.
    Returns (heads, bw, n_kept, hd)."""
    heads, bw, n_kept, hd = qkv_kept.shape[1:]
    n = rest_sums.shape[1]
    _, k_bias, v_bias = attn.qkv.bias.view(3, heads, 1, hd)
    dtype, device = qkv_kept.dtype, qkv_kept.device
    positions = order.unsqueeze(2) * n + order.unsqueeze(1)  # (bw, nk, nk) into an N x N bias
    positions += (kinds * (n * n)).view(bw, 1, 1)
    scores = torch.empty(heads, bw, n_kept, n_kept + 1, dtype=dtype, device=device)
    per_head = bias.transpose(0, 1).reshape(heads, -1)
    scores[..., :n_kept] = per_head.index_select(1, positions.flatten()).view(heads, bw, n_kept, n_kept)
    rest_bias = rest_sums.gather(1, order.t().unsqueeze(0).expand(heads, n_kept, bw)).log_().transpose(1, 2)
    query_rows = (order + (kinds * n).unsqueeze(1)).flatten()
    rest_bias += row_max.transpose(0, 1).reshape(heads, -1).index_select(1, query_rows).view(heads, bw, n_kept)
    scores[..., n_kept] = rest_bias
    keys = torch.empty(heads, bw, n_kept + 1, hd, dtype=dtype, device=device)
    keys[:, :, :n_kept] = qkv_kept[1]
    keys[:, :, n_kept] = k_bias
    vals = torch.empty(heads, bw, n_kept + 1, hd, dtype=dtype, device=device)
    vals[:, :, :n_kept] = qkv_kept[2]
    vals[:, :, n_kept] = v_bias
    scores = scores.view(heads * bw, n_kept, n_kept + 1)
    q = qkv_kept[0].reshape(heads * bw, n_kept, hd)
    scores.baddbmm_(q, keys.view(heads * bw, n_kept + 1, hd).transpose(1, 2), alpha=attn.scale)
    scores = short_row_softmax(scores)
    return torch.bmm(scores, vals.view(heads * bw, n_kept + 1, hd)).view(heads, bw, n_kept, hd)


def unmasked_attention(
    attn, x: torch.Tensor, bias: torch.Tensor, kinds: torch.Tensor, norm: nn.Module, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``x += attn(norm(x))``, in place, for windows without a keep-mask (inference only); ``qkv``
    and ``proj`` take their products in ``dtype`` (:func:`linear`), the attention float32.

    ``kinds`` must be sorted (:func:`block_forward` sorts the windows by kind), so each
    kind is one run of windows and takes its bias in ``F.scaled_dot_product_attention``
    as a broadcast mask: no per-window copy of the bias, and the (windows, heads, N, N)
    scores stay inside torch's CPU flash kernel.
    """
    bw, n, c = x.shape
    heads, hd = attn.num_heads, c // attn.num_heads
    qkv = linear(norm(x).view(bw * n, c), attn.qkv, dtype).float()
    q, k, v = qkv.view(bw, n, 3, heads, hd).permute(2, 0, 3, 1, 4)  # (bw, heads, N, hd) each
    out = torch.empty(bw, n, heads, hd, dtype=x.dtype, device=x.device)
    start = 0
    for kind, count in enumerate(torch.bincount(kinds, minlength=len(bias)).tolist()):
        if count:
            part = slice(start, start + count)
            attended = F.scaled_dot_product_attention(
                q[part], k[part], v[part], attn_mask=bias[kind].unsqueeze(0), scale=attn.scale
            )
            out[part] = attended.transpose(1, 2)
            start += count
    return x.view(bw * n, c).add_(linear(out.view(bw * n, c), attn.proj, dtype)).view(bw, n, c)


def attention_by_kind(attn, x: torch.Tensor, keep: torch.Tensor | None, bias: torch.Tensor, kinds: torch.Tensor) -> torch.Tensor:
    """The plain attention for windows in any order: window ``i`` takes ``bias[kinds[i]]``, its
    position bias plus shift mask (see :func:`kind_biases`)."""
    scores, v = attn.scores(x, keep)
    scores += bias.index_select(0, kinds)
    return attn.mix(scores, v)


# --- blocks -------------------------------------------------------------------------------------


def mlp_add_to(mlp, residual: torch.Tensor, x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``residual += mlp(x)`` in place, for 2-D ``x``, products in ``dtype`` (:func:`linear`): in
    bf16 the hidden layer stays bf16 and only the residual is float32."""
    hidden = linear(x, mlp.fc1, dtype, gelu=True)
    return residual.add_(linear(hidden, mlp.fc2, dtype))


def window_step(
    block,
    windows: torch.Tensor,
    keep: torch.Tensor | None,
    bias: torch.Tensor,
    exp_biases: tuple[torch.Tensor, torch.Tensor] | None,
    kinds: torch.Tensor,
    dtype: torch.dtype = torch.float32,
) -> None:
    """The block on windows in any order (sorted by kind where there is no ``keep``), in
    place: without a keep-mask through :func:`unmasked_attention`, with one through
    :func:`masked_attention` where ``exp_biases`` allow and its weights do not underflow.
    Linears take their products in ``dtype``; the residual stream stays float32."""
    attn = block.attn
    if keep is None:
        unmasked_attention(attn, windows, bias, kinds, block.norm1, dtype)
    elif exp_biases is None or masked_attention(attn, windows, keep, bias, exp_biases, kinds, block.norm1, dtype) is None:
        windows += attention_by_kind(attn, block.norm1(windows), keep, bias, kinds)
    for rows in windows.view(-1, windows.shape[-1]).split(MLP_ROWS):
        mlp_add_to(block.mlp, rows, block.norm2(rows), dtype)


def block_forward(
    block, flat: torch.Tensor, rows: torch.Tensor | None, size: tuple[int, int], ctx
) -> tuple[torch.Tensor, torch.Tensor]:
    """A Swin block on tokens held in any row order.

    ``flat[p]`` is token ``rows[p]`` of the B*H*W tokens (``rows`` None: token order).
    Windows are gathered straight from it (shift and partition in one copy, see
    :func:`window_order`) into the output, in chunks of windows with about as many
    kept tokens, and worked on in place there. Returns the output and its ``rows``:
    the next block gathers from it as it is, so nothing is scattered back to token order.
    """
    h, w = size
    c = flat.shape[1]
    b = flat.shape[0] // (h * w)
    ws, shift = block.window_size, block.shift_size
    n_rows, n_cols, n = h // ws, w // ws, ws * ws
    keep = ctx.keep_mask((b * n_rows * n_cols, n, 1), flat.device)
    # without a keep-mask, each window kind one run of windows, for unmasked_attention
    order, kinds = window_layout(ctx, b, h, w, ws, shift, flat.device, by_kind=keep is None)
    bias = kind_biases(block.attn, shift)
    exps = None if keep is None else exp_biases(block.attn, bias)
    if keep is not None:  # windows with about as many kept tokens together: little padding in masked_attention
        by_count = torch.argsort(keep.view(len(order), -1).sum(1), stable=True)
        order, kinds, keep = order[by_count], kinds[by_count], keep[by_count]
    out_rows = order.flatten()
    source = out_rows if rows is None else inverse_permutation(rows).index_select(0, out_rows)
    out = torch.empty_like(flat)
    step = ctx.chunk_windows or len(order)

    def run_chunk(start: int) -> None:
        stop = min(start + step, len(order))
        windows = out[start * n : stop * n]
        torch.index_select(flat, 0, source[start * n : stop * n], out=windows)
        part_keep = None if keep is None else keep[start:stop]
        window_step(block, windows.view(stop - start, n, c), part_keep, bias, exps, kinds[start:stop], ctx.dtype)

    map_chunks(run_chunk, list(range(0, len(order), step)))
    return out, out_rows


def residual_group_forward(blocks, x: torch.Tensor, size: tuple[int, int], ctx) -> torch.Tensor:
    """The Swin blocks of one RSTB on (B, H*W, C) tokens through this route; token order again after."""
    return blocks_in_window_order(blocks, x, size, ctx, block_forward)
