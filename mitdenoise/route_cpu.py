"""The CPU inference route: attention over the kept tokens only, windows gathered in place.

Same numbers as the plain route (to 1e-5, pinned by tests/test_model.py), less work:

- windows with masked tokens take the layout and maths of :mod:`mitdenoise.masked_windows`
  (shared with the training route): ``qkv`` on the kept tokens only, the masked ones in
  aggregate (:func:`masked_attention`);
- each block gathers its windows straight from the previous block's output (shift,
  partition and that layout in one copy) and works on them in place there
  (:func:`block_forward`): nothing is scattered back to token order until the end of a
  residual group;
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

from .masked_windows import (
    BlockBiases,
    biases_of,
    kept_first,
    listed_counts,
    listed_qkv,
    masked_query_attention,
    plain_attention,
    rest_key_applies,
)
from .windows import blocks_in_window_order, inverse_permutation, window_layout

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
    bias in bf16; kept until the weights change in place or are replaced, or oneDNN is switched."""
    weight, bias = layer.weight, layer.bias
    key = (weight.data_ptr(), weight._version, None if bias is None else (bias.data_ptr(), bias._version), ONEDNN_LINEAR)
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


def masked_attention(
    attn,
    x: torch.Tensor,
    keep: torch.Tensor,
    pos: torch.Tensor,
    kinds: torch.Tensor,
    n_listed: int,
    biases: BlockBiases,
    norm: nn.Module,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``x += attn(norm(x) * keep)``, in place, for windows ``x`` (bw, N, C) in the shared
    kept-first layout (:func:`~mitdenoise.masked_windows.kept_first`: ``keep`` and ``pos``
    (bw, N) of every slot, the first ``n_listed`` listed), inference only.

    ``norm`` and ``qkv`` run on the listed tokens only, the masked ones are handled in
    aggregate (:func:`~mitdenoise.masked_windows.masked_query_attention`), or where that could
    underflow every token takes the plain attention. ``qkv`` and ``proj`` take their products
    in ``dtype`` (:func:`linear`), the attention in float32.
    """
    bw, n, c = x.shape

    def qkv_linear(t: torch.Tensor) -> torch.Tensor:
        return linear(t, attn.qkv, dtype)

    qkv = listed_qkv(attn, norm, x, keep, n_listed, qkv_linear)
    out = masked_query_attention(attn, qkv, pos, kinds, biases) if n_listed < n else None
    if out is None:
        if n_listed < n:
            qkv = listed_qkv(attn, norm, x, keep, n, qkv_linear)
        out = plain_attention(attn, qkv, pos, kinds, biases).permute(1, 2, 0, 3)
    return x.view(bw * n, c).add_(linear(out.reshape(bw * n, c), attn.proj, dtype)).view(bw, n, c)


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


# --- blocks -------------------------------------------------------------------------------------


def mlp_add_to(mlp, residual: torch.Tensor, x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``residual += mlp(x)`` in place, for 2-D ``x``, products in ``dtype`` (:func:`linear`): in
    bf16 the hidden layer stays bf16 and only the residual is float32."""
    hidden = linear(x, mlp.fc1, dtype, gelu=True)
    return residual.add_(linear(hidden, mlp.fc2, dtype))


def block_forward(
    block, flat: torch.Tensor, rows: torch.Tensor | None, size: tuple[int, int], ctx
) -> tuple[torch.Tensor, torch.Tensor]:
    """A Swin block on tokens held in any row order.

    ``flat[p]`` is token ``rows[p]`` of the B*H*W tokens (``rows`` None: token order).
    Windows are gathered straight from it (shift, partition and the kept-first order of
    :func:`~mitdenoise.masked_windows.kept_first` in one copy, see :func:`~mitdenoise.windows.window_order`) into
    the output, and worked on in place there, in chunks on parallel workers. Returns the
    output and its ``rows``: the next block gathers from it as it is, so nothing is scattered
    back to token order.
    """
    h, w = size
    c = flat.shape[1]
    b = flat.shape[0] // (h * w)
    ws, shift = block.window_size, block.shift_size
    n = ws * ws
    keep = ctx.keep_mask((b * (h // ws) * (w // ws), n, 1), flat.device)
    # without a keep-mask, each window kind one run of windows, for unmasked_attention
    order, kinds = window_layout(ctx, b, h, w, ws, shift, flat.device, by_kind=keep is None)
    biases = biases_of(block, ctx, flat.device)
    step = ctx.chunk_windows or len(order)
    layout = None
    if keep is not None:
        layout = kept_first(order, kinds, keep)
        order, kinds = layout.order, layout.kinds
        n_listed = listed_counts(layout, step, rest_key_applies(block.attn))
    out_rows = order.flatten()
    source = out_rows if rows is None else inverse_permutation(rows).index_select(0, out_rows)
    out = torch.empty_like(flat)

    def run_chunk(chunk: int) -> None:
        start, stop = chunk * step, min((chunk + 1) * step, len(order))
        windows = out[start * n : stop * n]
        torch.index_select(flat, 0, source[start * n : stop * n], out=windows)
        windows = windows.view(stop - start, n, c)
        if layout is None:
            unmasked_attention(block.attn, windows, biases.bias, kinds[start:stop], block.norm1, ctx.dtype)
        else:
            part = slice(start, stop)
            masked_attention(block.attn, windows, layout.keep[part], layout.pos[part], kinds[part], n_listed[chunk],
                             biases, block.norm1, ctx.dtype)
        for token_rows in windows.view(-1, c).split(MLP_ROWS):
            mlp_add_to(block.mlp, token_rows, block.norm2(token_rows), ctx.dtype)

    map_chunks(run_chunk, list(range(-(-len(order) // step))))
    return out, out_rows


def residual_group_forward(blocks, x: torch.Tensor, size: tuple[int, int], ctx) -> torch.Tensor:
    """The Swin blocks of one RSTB on (B, H*W, C) tokens through this route; token order again after."""
    return blocks_in_window_order(blocks, x, size, ctx, block_forward)
