"""Window geometry shared by the network and its CPU routes (inference and training).

Swin attention works on ``ws x ws`` windows of tokens, every other block on a
cyclically shifted image; these helpers partition and reassemble images, build the
shift mask that keeps attention from crossing the shift's seam, and give the orders
and groupings of windows that the routes gather by (:func:`window_layout`), with the
blocks of a residual group run in that order (:func:`blocks_in_window_order`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

SEAM = -50.0
"""A bias below this is the shift mask's seam (its -100): no attention across it."""


def window_partition(x: torch.Tensor, ws: int) -> torch.Tensor:
    """(B, H, W, C) -> (B * H/ws * W/ws, ws*ws, C), windows in row-major order."""
    b, h, w, c = x.shape
    x = x.view(b, h // ws, ws, w // ws, ws, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, ws * ws, c)


def window_reverse(windows: torch.Tensor, ws: int, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`window_partition`: (B * nW, ws*ws, C) -> (B, H, W, C)."""
    c = windows.shape[-1]
    b = windows.shape[0] // ((h // ws) * (w // ws))
    x = windows.view(b, h // ws, w // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h, w, c)


def relative_position_index(ws: int) -> torch.Tensor:
    """(ws*ws, ws*ws) index into the ((2ws-1)^2, heads) bias table."""
    coords = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (ws - 1)
    return rel[..., 0] * (2 * ws - 1) + rel[..., 1]


def shift_mask(h: int, w: int, ws: int, shift: int, device: torch.device | None = None) -> torch.Tensor:
    """(nW, N, N) additive mask (0 / -100) that stops attention across the cyclic-shift seam."""
    region = torch.zeros(1, h, w, 1, device=device)
    label = 0
    for hs in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
        for wsl in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
            region[:, hs, wsl, :] = label
            label += 1
    windows = window_partition(region, ws).squeeze(-1)
    diff = windows[:, None, :] - windows[:, :, None]
    return diff.masked_fill(diff != 0, -100.0).masked_fill(diff == 0, 0.0)


class EdgeShiftMask:
    """The shift mask kept only where it is not zero: the last row and column of windows.

    After the cyclic shift only windows that wrap around the image edge mix regions,
    so adding the -100 mask to those alone equals adding the full (nW, N, N) mask,
    at a fraction of the memory traffic.
    """

    def __init__(self, h: int, w: int, ws: int, shift: int, device: torch.device | None = None) -> None:
        self.grid = (h // ws, w // ws)
        full = shift_mask(h, w, ws, shift, device).view(*self.grid, ws * ws, ws * ws)
        self.last_row = full[-1].unsqueeze(1).contiguous()  # (nWw, 1, N, N): broadcast over heads
        self.last_col = full[:-1, -1].unsqueeze(1).contiguous()  # (nWh - 1, 1, N, N)
        self._edges: dict = {}

    def edges(self, rows: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The masked windows among window rows ``rows`` of one image, in partition order:
        their index there, and their masks (E, 1, N, N)."""
        cached = self._edges.get(rows)
        if cached is not None:
            return cached
        first, stop = rows
        n_rows, n_cols = self.grid
        inner_stop = min(stop, n_rows - 1)
        index, masks = [], []
        if inner_stop > first:
            index.append(torch.arange(inner_stop - first) * n_cols + (n_cols - 1))
            masks.append(self.last_col[first:inner_stop])
        if stop == n_rows:
            index.append(torch.arange(n_cols) + (n_rows - 1 - first) * n_cols)
            masks.append(self.last_row)
        cached = self._edges[rows] = (torch.cat(index).to(self.last_row.device), torch.cat(masks))
        return cached

    def add_to(self, scores: torch.Tensor, rows: tuple[int, int]) -> None:
        """In place on scores of window rows ``rows`` of some images: (images, rows, nWw, heads, N, N)."""
        first, stop = rows
        n_rows = self.grid[0]
        if stop == n_rows:
            scores[:, -1] += self.last_row
        inner_stop = min(stop, n_rows - 1)
        if inner_stop > first:
            scores[:, : inner_stop - first, -1] += self.last_col[first:inner_stop]


def window_kinds(n_rows: int, n_cols: int, images: int, shifted: bool) -> torch.Tensor:
    """Kind of every window of ``images`` images of n_rows x n_cols windows, in partition order.

    0 inner, 1 last column, 2 last row, 3 corner: after the cyclic shift only these
    edge windows mix regions, and each kind has one shift-mask pattern. Unshifted, all 0.
    """
    if not shifted:
        return torch.zeros(images * n_rows * n_cols, dtype=torch.long)
    row = torch.arange(n_rows).view(-1, 1)
    col = torch.arange(n_cols).view(1, -1)
    kinds = (col == n_cols - 1).long() + 2 * (row == n_rows - 1).long()
    return kinds.flatten().repeat(images)


def window_order(images: int, h: int, w: int, ws: int, shift: int) -> torch.Tensor:
    """Token index (into ``images`` flattened H*W images) of every token in window-partition order,
    after a cyclic shift by ``shift``: gathering with it does the roll and the partition in one copy."""
    index = torch.arange(images * h * w).view(images, h, w, 1)
    if shift:
        index = torch.roll(index, shifts=(-shift, -shift), dims=(1, 2))
    return window_partition(index, ws).flatten()


def window_chunks(images: int, n_rows: int, n_cols: int, chunk_windows: int | None):
    """(first image, stop image, first window row, stop window row) of chunks of about ``chunk_windows``.

    A chunk is either several whole images or some window rows of one image, so that
    its windows are contiguous in window-partition order.
    """
    per_image = n_rows * n_cols
    if chunk_windows is None or images * per_image <= chunk_windows:
        yield 0, images, 0, n_rows
    elif per_image <= chunk_windows:
        step = chunk_windows // per_image
        for first in range(0, images, step):
            yield first, min(first + step, images), 0, n_rows
    else:
        step = max(1, chunk_windows // n_cols)
        for image in range(images):
            for first in range(0, n_rows, step):
                yield image, image + 1, first, min(first + step, n_rows)


def inverse_permutation(index: torch.Tensor) -> torch.Tensor:
    """``inverse[index[p]] == p``."""
    return torch.empty_like(index).scatter_(0, index, torch.arange(len(index), device=index.device))


def window_layout(ctx, images: int, h: int, w: int, ws: int, shift: int, device: torch.device,
                  by_kind: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """A block's windows: the token index of each (windows, N) (:func:`window_order`) and each
    one's kind (:func:`window_kinds`), in partition order or sorted by kind; cached in ``ctx``
    (the network's layout cache: two per image size)."""

    def make() -> tuple[torch.Tensor, torch.Tensor]:
        order = window_order(images, h, w, ws, shift).view(-1, ws * ws)
        kinds = window_kinds(h // ws, w // ws, images, shift > 0)
        if by_kind:
            sort = torch.argsort(kinds, stable=True)
            order, kinds = order[sort], kinds[sort]
        return order.to(device), kinds.to(device)

    return ctx.cached(("window_layout", images, h, w, ws, shift, str(device), by_kind), make)


def kind_shift_masks(ws: int, shift: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The shift mask of each window kind (4, 1, N, N), and where it stops attention (the seam)."""
    mask = shift_mask(2 * ws, 2 * ws, ws, shift, device).unsqueeze(1)  # one window per kind
    return mask, mask < SEAM


BlockForward = Callable[..., tuple[torch.Tensor, torch.Tensor]]
"""``(block, flat, rows, size, ctx) -> (out, out_rows)``: a route's Swin block on tokens held in
any row order (``flat[p]`` is token ``rows[p]``; ``rows`` None: token order)."""


def blocks_in_window_order(blocks, x: torch.Tensor, size: tuple[int, int], ctx, block_forward: BlockForward) -> torch.Tensor:
    """The Swin blocks of one RSTB on (B, H*W, C) tokens, each block gathering its windows straight
    from the previous one's output (``block_forward``); the result in token order again."""
    flat, rows = x.reshape(-1, x.shape[-1]), None
    for block in blocks:
        flat, rows = block_forward(block, flat, rows, size, ctx)
    return flat.index_select(0, inverse_permutation(rows)).view(x.shape)
