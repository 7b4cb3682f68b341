"""A 12000 x 12000 photo goes through read -> tiles -> write with memory bounded by its own buffers.

The network is replaced by the identity here: at 20-100 s per megapixel on this CPU, 144
megapixels through the transformer would take hours, and its working set is one tile's,
the same for every tile (``mitdenoise bench speed`` reports it as peak memory). What
grows with the image is everything around it (decoding, the band accumulators, the
output, encoding), and that is what this pins, through the same code the CLI runs.
"""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

RUN = r"""
import sys
from mitdenoise import Denoiser
from mitdenoise.batch import plan_jobs, run_jobs
from mitdenoise.imageio import set_max_pixels
from mitdenoise.model import ModelConfig, SwinIR

source, target = sys.argv[1:3]
set_max_pixels(200_000_000)  # what --max-pixels does: 144 MP is over Pillow's default limit
denoiser = Denoiser(SwinIR(ModelConfig(embed_dim=12, depths=(2,), num_heads=(2,))), device="cpu")
denoiser._forward = lambda x: x
summary = run_jobs(plan_jobs([source], target), lambda job, image: denoiser.denoise_image(image))
assert len(summary.done) == 1, summary.failed
# VmHWM, not getrusage: ru_maxrss survives exec, so it would count the parent's peak too
print(next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM")))
"""


def gradient(n: int) -> np.ndarray:
    y, x = np.ogrid[0:n, 0:n]
    return np.stack(np.broadcast_arrays(x * 255 // n, y * 255 // n, (x + y) * 127 // n), -1).astype(np.uint8)


def peak_rss_of_a_run(tmp_path, n: int) -> int:
    """Peak RSS in bytes of a fresh process denoising an n x n RGB BMP into a PNG; checks the output."""
    source, target = tmp_path / f"in{n}.bmp", tmp_path / f"out{n}.png"
    Image.fromarray(gradient(n)).save(source)
    done = subprocess.run([sys.executable, "-c", RUN, str(source), str(target)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    Image.MAX_IMAGE_PIXELS = None  # conftest puts Pillow's limit back after the test
    with Image.open(target) as out:
        # identity network: blending the tiles back must give every pixel back exactly
        assert out.size == (n, n) and out.mode == "RGB"
        assert np.array_equal(np.asarray(out), gradient(n))
    source.unlink()
    target.unlink()
    return int(done.stdout.split()[-1])


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads peak memory from Linux's /proc")
def test_a_12000_pixel_square_image_needs_its_buffers_and_a_fixed_budget_not_more(tmp_path):
    small = peak_rss_of_a_run(tmp_path, 2048)  # 81 tiles
    huge = peak_rss_of_a_run(tmp_path, 12000)  # 2704 tiles
    image_bytes = (12000**2 - 2048**2) * 3
    # At any moment at most: decoded pixels + Pillow's frame (4 bytes a pixel) while
    # reading, input + output arrays while denoising, output + frame while writing:
    # 2.33 image buffers. Measured: 2.36 (299 MB -> 1244 MB; default 544-pixel tiles, allocator
    # set to keep freed buffers); 2.61 before finished rows were normalised a few at a time.
    assert huge - small <= 2.5 * image_bytes, f"grew {(huge - small) / image_bytes:.2f} image buffers"
