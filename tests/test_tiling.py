"""Tiled inference equals whole-image inference, shows no seam, and holds memory flat."""

import tracemalloc

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mitdenoise.tiling import TileGrid, denoise_tiled, reflect_indices
from mitdenoise.checkpoints import load_model


def as_is(x):
    return x


def cast(x, dtype):
    return x.astype(dtype)


def whole_image(model, img, generator=None):
    with torch.no_grad():
        x = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))[None]
        return model(x, generator=generator)[0].numpy().transpose(1, 2, 0)


@pytest.fixture(scope="module")
def tiny_unmasked():
    from conftest import FIXTURES, need_shared

    need_shared(FIXTURES)
    return load_model(FIXTURES / "official_tiny_random.pth", attn_mask_ratio=(0, 0))


@pytest.mark.parametrize("tile,overlap,batch", [(128, 64, 1), (96, 64, 4), (64, 48, 3)])
def test_tiled_output_equals_whole_image_with_mask_off(tiny_unmasked, tile, overlap, batch):
    rng = np.random.default_rng(0)
    img = (rng.random((203, 261, 3), dtype=np.float32) * 0.6 + 0.2).astype(np.float32)
    whole = whole_image(tiny_unmasked, img)

    def run(b):
        with torch.no_grad():
            return tiny_unmasked(torch.from_numpy(b)).numpy()

    tiled = denoise_tiled(img, run, to_float=as_is, from_float=cast, tile=tile, overlap=overlap, window=8, batch_size=batch)
    assert tiled.shape == img.shape and tiled.dtype == np.float32
    assert np.abs(tiled - whole).max() < 1e-3


def test_no_seam_with_mask_on(fixtures_dir):
    model = load_model(fixtures_dir / "official_tiny_random.pth")  # mask 75 % on
    yy, xx = np.mgrid[0:256, 0:256] / 256.0
    img = np.stack([0.5 + 0.2 * np.sin(6 * xx + c) * np.cos(4 * yy) for c in range(3)], -1).astype(np.float32)
    g = torch.Generator().manual_seed(0)

    def run(b):
        with torch.no_grad():
            return model(torch.from_numpy(b), generator=g).numpy()

    tiled = denoise_tiled(img, run, to_float=as_is, from_float=cast, tile=96, overlap=48, window=8, batch_size=2)
    grid = TileGrid.plan(256, 96, 48, 8)
    half = grid.ramp // 2
    edges = {s + d for s in grid.starts[1:] for d in (0, half)} | {s + grid.tile - d for s in grid.starts[:-1] for d in (0, half)}
    col_jump = np.abs(np.diff(tiled, axis=1)).mean(axis=(0, 2))  # jump between column j and j+1
    at_seams = np.array([col_jump[e - 1] for e in sorted(edges) if 0 < e < 256])
    # where tiles hand over, the image changes no more than it does anywhere else
    assert at_seams.mean() < 1.3 * col_jump.mean(), (at_seams.mean(), col_jump.mean())


@settings(max_examples=200, deadline=None)
@given(size=st.integers(1, 3000), tile=st.integers(8, 512), overlap=st.integers(0, 128))
def test_tile_grid_covers_the_padded_image_on_window_multiples(size, tile, overlap):
    grid = TileGrid.plan(size, tile, overlap, 8)
    assert grid.length % 8 == 0 and grid.length >= size
    assert grid.tile % 8 == 0 and grid.tile <= grid.length
    assert all(s % 8 == 0 for s in grid.starts)
    assert grid.starts[0] == 0 and grid.starts[-1] + grid.tile == grid.length
    assert all(b - a <= grid.tile for a, b in zip(grid.starts, grid.starts[1:]))
    assert grid.coverage().min() > 0


def test_reflect_indices_mirror_without_repeating_the_edge_and_handle_tiny_sizes():
    assert reflect_indices(5, 8).tolist() == [0, 1, 2, 3, 4, 3, 2, 1]
    assert reflect_indices(1, 8).tolist() == [0] * 8
    assert reflect_indices(2, 8).tolist() == [0, 1, 0, 1, 0, 1, 0, 1]


def test_memory_beyond_input_and_output_is_one_band_not_the_image():
    h, w = 2048, 2048
    img = np.full((h, w, 3), 128, np.uint8)
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    out = denoise_tiled(
        img, lambda b: b, to_float=lambda x: x.astype(np.float32) / 255,
        from_float=lambda x, d: (x * 255 + 0.5).astype(d), tile=128, overlap=32, window=8, batch_size=4,
    )
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    assert np.array_equal(out, img)
    image_bytes = img.nbytes  # the output array
    band_bytes = 128 * w * 3 * 4
    # output + band accumulator + the strip and a few tile copies; far below a float copy of the image (48 MB)
    assert peak < image_bytes + 8 * band_bytes, peak / 1e6


def _blur(x):
    """A 3x3 box blur with a bias that depends on the tile's content: tile edges differ, so blending shows."""
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="replicate")
    blurred = torch.nn.functional.avg_pool2d(padded, 3, stride=1)
    return blurred * 1.1 - 0.05 + 0.1 * x.mean(dim=(2, 3), keepdim=True)


@pytest.mark.parametrize(
    "shape,dtype,tile,overlap,batch",
    [((203, 261, 3), np.uint8, 96, 32, 1), ((150, 97, 1), np.uint16, 64, 32, 3), ((77, 140, 3), np.float32, 512, 32, 2)],
)
def test_tiling_on_the_device_equals_tiling_in_numpy(shape, dtype, tile, overlap, batch):
    """The GPU route's tiling (run here on the CPU) gives the NumPy route's pixels exactly:
    same tiles, weights, order of sums, rounding and clipping, for 8-bit, 16-bit and float images."""
    from mitdenoise import imageio
    from mitdenoise.tiling import denoise_tiled_on_device

    rng = np.random.default_rng(1)
    if dtype == np.float32:
        pixels = rng.random(shape, dtype=np.float32) * 1.2 - 0.1  # out of range: both clip
    else:
        pixels = rng.integers(0, np.iinfo(dtype).max + 1, shape).astype(dtype)
    seen = []
    host = denoise_tiled(
        pixels, lambda b: _blur(torch.from_numpy(b)).numpy(), to_float=imageio.to_float,
        from_float=imageio.from_float, tile=tile, overlap=overlap, window=8, batch_size=batch,
    )
    device = denoise_tiled_on_device(
        pixels, _blur, device=torch.device("cpu"), tile=tile, overlap=overlap, window=8, batch_size=batch,
        on_tiles=seen.append,
    )
    assert device.shape == pixels.shape and device.dtype == pixels.dtype
    assert np.array_equal(device, host)
    assert not np.array_equal(device, pixels)
    assert sum(seen) == len(TileGrid.plan(shape[0], tile, overlap, 8).starts) * len(TileGrid.plan(shape[1], tile, overlap, 8).starts)
