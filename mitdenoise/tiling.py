"""Split an image into overlapping tiles, run them, blend them back, one band at a time.

Why it is exact: tiles start on multiples of the attention window and the image is
reflect-padded once (like the network pads a whole image), so every tile sees the
same window grid as the whole image would. Away from tile edges a tile's output is
then the whole-image output; near its edges a linear ramp hands over to the
neighbour, which hides the seam.

Why memory stays flat: tiles are produced band by band (one row of tiles at a
time); rows that no later tile touches are normalised and written straight into
the output array, so besides the input and output only one band of float32
accumulators (tile height x padded width) is held.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

FLUSH_ROWS = 32
"""Finished rows are normalised and converted this many at a time, so the temporaries stay small."""

RunTiles = Callable[[np.ndarray], np.ndarray]
"""Takes a float32 batch (B, C, h, w) and returns the denoised batch, same shape."""


@dataclass(frozen=True)
class TileGrid:
    """Where the tiles of one axis start, and their common length (all in padded coordinates)."""

    length: int  # padded image length (multiple of the window)
    tile: int  # tile length (multiple of the window, <= length)
    starts: tuple[int, ...]
    ramp: int  # width of the zero margin + ramp at inner tile edges (3/4 of the overlap)

    @classmethod
    def plan(cls, size: int, tile: int, overlap: int, window: int) -> "TileGrid":
        """Tiles of at most ``tile`` pixels overlapping by at least ``overlap``, starting on window multiples.

        The tile is then shrunk to the smallest one that needs no more tiles, so the
        last tile doesn't overlap its neighbour by far more than asked (wasted work).
        """
        length = -(-size // window) * window
        tile = max(window, tile // window * window)
        if tile >= length:
            return cls(length, length, (0,), 0)
        stride = max(window, (tile - overlap) // window * window)
        count = len(range(0, length - tile, stride)) + 1
        balanced = -(-(length + (count - 1) * (tile - stride)) // count // window) * window
        if window <= balanced < tile and len(range(0, length - balanced, balanced - (tile - stride))) + 1 == count:
            tile, stride = balanced, balanced - (tile - stride)
        starts = list(range(0, length - tile, stride)) + [length - tile]
        return cls(length, tile, tuple(starts), max(0, min(overlap * 3 // 4, tile - stride, tile // 2)))

    def weights(self, index: int) -> np.ndarray:
        """Blend weight along the tile; at an inner edge: 0 for ramp/2, then a linear ramp to 1.

        A tile's outermost pixels are its least exact (they miss context), so they
        get no weight at all; the neighbour covers them with full weight.
        """
        w = np.ones(self.tile, np.float32)
        r = self.ramp
        if r:
            edge = np.zeros(r, np.float32)
            edge[r // 2 :] = (np.arange(r - r // 2, dtype=np.float32) + 0.5) / (r - r // 2)
            if index > 0:
                w[:r] = edge
            if index < len(self.starts) - 1:
                w[-r:] = np.minimum(w[-r:], edge[::-1])
        return w

    def coverage(self) -> np.ndarray:
        """Sum of all tiles' weights at each position (> 0 everywhere)."""
        total = np.zeros(self.length, np.float32)
        for i, s in enumerate(self.starts):
            total[s : s + self.tile] += self.weights(i)
        return total


def reflect_indices(size: int, length: int) -> np.ndarray:
    """Source index for each of ``length`` positions: reflect padding past the end, any size."""
    idx = np.arange(length)
    if size == 1:
        return np.zeros(length, np.intp)
    period = 2 * (size - 1)
    idx = idx % period
    return np.where(idx < size, idx, period - idx).astype(np.intp)


def count_tiles(height: int, width: int, tile: int, overlap: int, window: int) -> int:
    rows = TileGrid.plan(height, tile, overlap, window)
    cols = TileGrid.plan(width, tile, overlap, window)
    return len(rows.starts) * len(cols.starts)


def denoise_tiled(
    pixels: np.ndarray,
    run: RunTiles,
    *,
    to_float: Callable[[np.ndarray], np.ndarray],
    from_float: Callable[[np.ndarray, np.dtype], np.ndarray],
    tile: int,
    overlap: int,
    window: int,
    batch_size: int,
    on_tiles: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Denoise an (H, W, C) array through ``run`` tile by tile; returns the same shape and dtype.

    ``on_tiles(n)`` is called after every batch with the number of tiles just done.
    """
    height, width, channels = pixels.shape
    rows = TileGrid.plan(height, tile, overlap, window)
    cols = TileGrid.plan(width, tile, overlap, window)
    row_src = reflect_indices(height, rows.length)
    col_src = reflect_indices(width, cols.length)
    col_weight = [cols.weights(j) for j in range(len(cols.starts))]
    norm_rows = 1.0 / rows.coverage()
    norm_cols = 1.0 / cols.coverage()

    out = np.empty_like(pixels)
    band = np.zeros((rows.tile, cols.length, channels), np.float32)
    band_top = 0

    def flush(upto: int) -> None:
        """Normalise band rows [band_top, upto) and write the part inside the image."""
        n = upto - band_top
        stop = min(upto, height)
        for first in range(band_top, stop, FLUSH_ROWS):  # a few rows at a time: small temporaries
            last = min(first + FLUSH_ROWS, stop)
            done = band[first - band_top : last - band_top, :width]
            done *= norm_rows[first:last, None, None]  # in place: these band rows are done with
            done *= norm_cols[None, :width, None]
            out[first:last] = from_float(done, pixels.dtype)
        band[: rows.tile - n] = band[n:]
        band[rows.tile - n :] = 0

    for i, top in enumerate(rows.starts):
        if top > band_top:
            flush(top)
            band_top = top
        row_weight = rows.weights(i)
        strip = pixels[row_src[top : top + rows.tile]]
        for batch in _batches(range(len(cols.starts)), batch_size):
            tiles = np.stack(
                [to_float(strip[:, col_src[cols.starts[j] : cols.starts[j] + cols.tile]]) for j in batch]
            )
            result = run(np.ascontiguousarray(tiles.transpose(0, 3, 1, 2)))
            for j, res in zip(batch, result):
                left = cols.starts[j]
                weight = row_weight[:, None, None] * col_weight[j][None, :, None]
                band[:, left : left + cols.tile] += res.transpose(1, 2, 0) * weight
            if on_tiles:
                on_tiles(len(batch))
    flush(rows.length)
    return out


def denoise_tiled_on_device(
    pixels: np.ndarray,
    run: Callable[[torch.Tensor], torch.Tensor],
    *,
    device: torch.device,
    tile: int,
    overlap: int,
    window: int,
    batch_size: int,
    on_tiles: Callable[[int], None] | None = None,
) -> np.ndarray:
    """:func:`denoise_tiled` with the tiles cut, blended and converted on ``device`` (a GPU).

    The same tiles, weights and order, so the same sums; but only each tile row's input
    rows go to the device (in the image's own integers) and only finished rows come back:
    on a GPU the host's NumPy work per tile (converting, stacking, blending) would outlast
    the network's forward. ``run`` takes and returns (B, C, h, w) float32 tensors on ``device``.

    The CPU keeps the NumPy loop, which there takes less memory and time than this one.
    """
    import torch

    height, width, channels = pixels.shape
    rows = TileGrid.plan(height, tile, overlap, window)
    cols = TileGrid.plan(width, tile, overlap, window)
    row_src = reflect_indices(height, rows.length)

    def on_device(array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(array).to(device)

    col_src = on_device(reflect_indices(width, cols.length))
    col_weight = [on_device(cols.weights(j)) for j in range(len(cols.starts))]
    norm_rows = on_device(1.0 / rows.coverage())
    norm_cols = on_device(1.0 / cols.coverage())[:width]
    scale = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0, np.dtype(np.float32): None}[pixels.dtype]

    out = np.empty_like(pixels)
    band = torch.zeros((rows.tile, cols.length, channels), dtype=torch.float32, device=device)
    band_top = 0

    def flush(upto: int) -> None:
        """As in :func:`denoise_tiled`: normalise, clip, round to the output type, copy to the host."""
        n, stop = upto - band_top, min(upto, height)
        if stop > band_top:
            done = band[: stop - band_top, :width] * norm_rows[band_top:stop, None, None]
            done = (done * norm_cols[None, :, None]).clamp_(0.0, 1.0)
            if scale is not None:  # floor(x * max + 0.5) in float32, as imageio.from_float
                done = torch.floor(done * scale + 0.5).to(torch.int32)
            out[band_top:stop] = done.cpu().numpy().astype(pixels.dtype, copy=False)
        band[: rows.tile - n] = band[n:].clone()  # torch refuses an overlapping copy
        band[rows.tile - n :] = 0

    for i, top in enumerate(rows.starts):
        if top > band_top:
            flush(top)
            band_top = top
        row_weight = on_device(rows.weights(i))
        strip = pixels[row_src[top : top + rows.tile]]
        strip = on_device(strip.astype(np.int32) if strip.dtype == np.uint16 else strip)
        strip = strip.float() if scale is None else strip.float() / scale
        for batch in _batches(range(len(cols.starts)), batch_size):
            tiles = torch.stack([strip.index_select(1, col_src[cols.starts[j] : cols.starts[j] + cols.tile]) for j in batch])
            result = run(tiles.permute(0, 3, 1, 2).contiguous())
            for j, res in zip(batch, result):
                left = cols.starts[j]
                weight = row_weight[:, None, None] * col_weight[j][None, :, None]
                band[:, left : left + cols.tile] += res.permute(1, 2, 0) * weight
            if on_tiles:
                on_tiles(len(batch))
    flush(rows.length)
    return out


def _batches(items: range, size: int) -> Iterator[list[int]]:
    items = list(items)
    for i in range(0, len(items), max(1, size)):
        yield items[i : i + size]
