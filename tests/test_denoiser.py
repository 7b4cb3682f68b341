"""`Denoiser`, the library API: types, depths and shapes in are types, depths and shapes out."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from mitdenoise import Denoiser
from mitdenoise.errors import DeviceError


@pytest.fixture(scope="module")
def tiny(request):
    from conftest import FIXTURES, need_shared

    need_shared(FIXTURES)
    return FIXTURES / "official_tiny_random.pth"


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
@pytest.mark.parametrize("shape", [(1, 1, 3), (3, 100, 3), (21, 13, 1), (64, 72, 3)])
def test_output_has_the_input_shape_dtype_and_range(tiny, dtype, shape):
    rng = np.random.default_rng(0)
    top = {np.uint8: 255, np.uint16: 65535, np.float32: 1.0}[dtype]
    pixels = (rng.random(shape) * top).astype(dtype)
    out = Denoiser(tiny, tile=32, tile_overlap=16)(pixels)
    assert out.shape == shape and out.dtype == dtype
    assert out.min() >= 0 and out.max() <= top


def test_tiled_and_untiled_agree_with_the_mask_off(tiny):
    rng = np.random.default_rng(1)
    pixels = rng.random((150, 170, 3)).astype(np.float32)
    whole = Denoiser(tiny, tile=1024, attn_mask_ratio=0)(pixels)
    tiled = Denoiser(tiny, tile=64, tile_overlap=48, batch_size=3, attn_mask_ratio=0)(pixels)
    assert np.abs(whole - tiled).max() < 1e-3


def test_16_bit_precision_is_kept_not_rounded_to_8_bits(tiny):
    pixels = np.full((32, 32, 3), 30000, np.uint16)
    pixels[::2] += 7
    out = Denoiser(tiny, attn_mask_ratio=0)(pixels)
    assert np.any(out % 257 != 0)  # values that an 8-bit round trip could not produce


def test_pil_images_in_and_out_keep_mode_and_alpha(tiny):
    rng = np.random.default_rng(2)
    rgba = Image.fromarray(rng.integers(0, 256, (30, 40, 4), dtype=np.uint8), "RGBA")
    out = Denoiser(tiny)(rgba)
    assert isinstance(out, Image.Image) and out.mode == "RGBA" and out.size == (40, 30)
    assert np.array_equal(np.asarray(out)[..., 3], np.asarray(rgba)[..., 3])
    gray = Image.fromarray(rng.integers(0, 256, (30, 40), dtype=np.uint8), "L")
    assert Denoiser(tiny)(gray).mode == "L"


@pytest.mark.parametrize("mode, dtype", [("I;16", np.uint16), ("I", np.int32), ("F", np.float32)])
def test_deep_gray_pil_images_keep_their_mode_and_depth(tiny, mode, dtype):
    rng = np.random.default_rng(6)
    values = rng.random((20, 24)) * (1.0 if mode == "F" else 65535)
    image = Image.fromarray(values.astype(np.uint16)) if mode == "I;16" else Image.fromarray(values.astype(dtype), mode)
    out = Denoiser(tiny, attn_mask_ratio=0)(image)
    assert out.mode == mode and out.size == (24, 20)
    expected = Denoiser(tiny, attn_mask_ratio=0)(np.asarray(image).astype(np.float32 if mode == "F" else np.uint16))
    assert np.array_equal(np.asarray(out).astype(expected.dtype), expected)


def test_palette_with_alpha_keeps_colour_and_alpha_and_empty_arrays_are_refused(tiny):
    rgba = Image.fromarray(np.random.default_rng(7).integers(0, 256, (16, 16, 4), dtype=np.uint8), "RGBA")
    pa = rgba.convert("PA")
    out = Denoiser(tiny)(pa)
    assert out.mode == "RGBA" and np.array_equal(np.asarray(out)[..., 3], np.asarray(pa.convert("RGBA"))[..., 3])
    colour = np.asarray(out)[..., :3].astype(int)
    assert np.abs(colour[..., 0] - colour[..., 1]).mean() > 5  # still colour, not gray
    with pytest.raises(ValueError, match=r"^the image has no pixels"):
        Denoiser(tiny)(np.zeros((0, 5, 3), np.uint8))


def test_a_checkpoint_with_nan_weights_is_an_error_not_a_garbage_image(tiny):
    from mitdenoise.errors import ModelLoadError
    from mitdenoise.checkpoints import load_model

    net = load_model(tiny)
    with torch.no_grad():
        net.conv_last.weight.fill_(float("nan"))
    with pytest.raises(ModelLoadError, match="output is NaN or infinite: the checkpoint's weights are broken"):
        Denoiser(net)(np.zeros((16, 16, 3), np.uint8))


@pytest.mark.slow
def test_seed_repeats_and_passes_reduce_the_variance_of_the_mask(tiny):
    rng = np.random.default_rng(3)
    pixels = rng.random((48, 48, 3)).astype(np.float32)
    a = Denoiser(tiny, seed=5)(pixels)
    assert np.array_equal(a, Denoiser(tiny, seed=5)(pixels))
    singles = [Denoiser(tiny, seed=s)(pixels) for s in range(4)]
    averaged = [Denoiser(tiny, seed=s, passes=4)(pixels) for s in range(10, 14)]
    spread_single = np.std(singles, axis=0).mean()
    spread_avg = np.std(averaged, axis=0).mean()
    assert spread_avg < 0.7 * spread_single  # ideal: 1/sqrt(4) = 0.5


def test_a_model_without_the_attention_mask_runs_one_pass_whatever_passes_says(tiny):
    pixels = np.random.default_rng(5).random((40, 40, 3)).astype(np.float32)
    masked, plain = Denoiser(tiny, passes=3), Denoiser(tiny, passes=3, attn_mask_ratio=0)
    assert (masked.passes, plain.passes) == (3, 1)
    calls = []
    plain.model.register_forward_hook(lambda module, args, output: calls.append(output.shape))
    out = plain(pixels)
    assert len(calls) == 1 and np.array_equal(out, Denoiser(tiny, attn_mask_ratio=0)(pixels))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_on_cuda_stays_close_to_fp32(tiny, precision):
    rng = np.random.default_rng(4)
    pixels = rng.random((40, 40, 3)).astype(np.float32)
    fp32 = Denoiser(tiny, attn_mask_ratio=0, device="cuda")(pixels)
    half = Denoiser(tiny, attn_mask_ratio=0, device="cuda", precision=precision)(pixels)
    assert np.abs(fp32 - half).mean() < 0.02


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_tiles_on_the_gpu_and_matches_the_cpu(tiny):
    """8-bit and 16-bit images through the GPU's tiling: the CPU's pixels up to the GPU's
    fp32 arithmetic (cuDNN convolutions in TF32); a misplaced or unblended tile is off by 10 %."""
    rng = np.random.default_rng(6)
    for dtype in (np.uint8, np.uint16):
        pixels = rng.integers(0, np.iinfo(dtype).max + 1, (150, 230, 3)).astype(dtype)
        kwargs = dict(attn_mask_ratio=0, tile=64, tile_overlap=32, batch_size=3)
        gpu = Denoiser(tiny, device="cuda", **kwargs)(pixels)
        cpu = Denoiser(tiny, device="cpu", **kwargs)(pixels)
        diff = np.abs(gpu.astype(np.int64) - cpu) / np.iinfo(dtype).max
        assert gpu.dtype == dtype and gpu.shape == pixels.shape and diff.max() < 5e-3 and diff.mean() < 5e-4


def test_auto_precision_is_fp32_on_the_cpu_and_bf16_on_a_gpu(tiny):
    pixels = np.random.default_rng(7).random((40, 48, 3)).astype(np.float32)
    auto = Denoiser(tiny, device="cpu")
    assert auto.precision == "fp32"
    assert np.array_equal(auto(pixels), Denoiser(tiny, device="cpu", precision="fp32")(pixels))
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False):
        assert Denoiser(tiny, device="cuda").precision == "bf16"


def test_fp16_on_cpu_is_refused_with_the_reason(tiny):
    with pytest.raises(DeviceError, match="on the CPU use fp32 or bf16"):
        Denoiser(tiny, device="cpu", precision="fp16")


def test_unknown_precision_and_missing_cuda_are_user_errors(tiny):
    with pytest.raises(DeviceError, match="unknown precision"):
        Denoiser(tiny, precision="fp8")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="CUDA is not available"):
            Denoiser(tiny, device="cuda:0")


FAULTS_OF_A_REUSED_BUFFER = """
import resource, sys, torch
from mitdenoise.denoiser import keep_freed_buffers_for_reuse
if sys.argv[1] == "tuned":
    assert keep_freed_buffers_for_reuse()
faults = []
for _ in range(6):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(12 << 20).fill_(1.0)  # 48 MB (a 448x448 tile's activations), freed at once
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(min(faults[1:]))  # glibc may still move the heap now and then: the best round
"""


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's mallopt: Linux only")
@pytest.mark.slow
def test_freed_tile_buffers_are_reused_instead_of_faulted_in_again():
    """48 MB freed and allocated again: glibc's default gives it back to the kernel and
    faults in all 12,288 pages anew; after the Denoiser's setting, almost none."""
    counts = {}
    for mode in ("default", "tuned"):
        run = subprocess.run([sys.executable, "-c", FAULTS_OF_A_REUSED_BUFFER, mode], capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        counts[mode] = int(run.stdout)
    assert counts["default"] > 12_000  # every round faults all pages in again
    assert counts["tuned"] < 500  # reused without faults


def test_a_cpu_denoiser_applies_the_allocator_setting(monkeypatch, tiny):
    import mitdenoise.denoiser as denoiser_module

    calls = []
    monkeypatch.setattr(denoiser_module, "keep_freed_buffers_for_reuse", lambda: calls.append(1) or True)
    Denoiser(tiny, device="cpu")
    assert calls == [1]


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
@pytest.mark.parametrize("channels", [1, 3])
def test_strength_0_returns_the_input_bit_for_bit(tiny, dtype, channels):
    rng = np.random.default_rng(4)
    top = {np.uint8: 255, np.uint16: 65535, np.float32: 1.0}[dtype]
    pixels = (rng.random((37, 45, channels)) * top).astype(dtype)
    out = Denoiser(tiny, strength=0)(pixels)
    assert out.dtype == dtype and np.array_equal(out, pixels) and out is not pixels


def test_strength_is_monotone_and_1_is_the_full_effect(tiny):
    rng = np.random.default_rng(5)
    pixels = rng.random((48, 64, 3)).astype(np.float32)
    full = Denoiser(tiny, attn_mask_ratio=0)(pixels)
    assert np.array_equal(Denoiser(tiny, attn_mask_ratio=0, strength=1)(pixels), full)
    changes = []
    for strength in (0.2, 0.5, 0.8):
        out = Denoiser(tiny, attn_mask_ratio=0, strength=strength)(pixels)
        np.testing.assert_allclose(out, pixels + strength * (full - pixels), atol=1e-5)
        changes.append(np.abs(out - pixels).mean())
    assert changes[0] < changes[1] < changes[2] < np.abs(full - pixels).mean()


def test_bf16_on_the_cpu_only_where_it_is_native(monkeypatch):
    from mitdenoise import devices

    cpu = torch.device("cpu")
    monkeypatch.setattr(devices, "cpu_computes_bf16", lambda: False)
    with pytest.raises(DeviceError, match="^this CPU has no native bf16 .*use --precision fp32$"):
        devices.pick_precision("bf16", cpu)
    monkeypatch.setattr(devices, "cpu_computes_bf16", lambda: True)
    assert devices.pick_precision("bf16", cpu) == "bf16" and devices.pick_precision("auto", cpu) == "fp32"


def test_bf16_denoiser_on_the_cpu_stays_close_to_fp32(tiny, monkeypatch):
    from mitdenoise import devices

    monkeypatch.setattr(devices, "cpu_computes_bf16", lambda: True)  # emulated where not native: slow, same values
    image = np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    fp32 = Denoiser(tiny, device="cpu", precision="fp32", seed=0)(image)
    bf16 = Denoiser(tiny, device="cpu", precision="bf16", seed=0)(image)
    assert bf16.dtype == np.uint8 and bf16.shape == image.shape
    diff = np.abs(bf16.astype(int) - fp32.astype(int))
    assert diff.max() <= 8 and diff.mean() < 1.0


@pytest.mark.parametrize("strength", [-0.1, 1.5, float("nan"), "1"])
def test_strength_outside_0_to_1_is_refused(tiny, strength):
    with pytest.raises(ValueError, match="strength must be a number from 0 to 1"):
        Denoiser(tiny, strength=strength)


def test_one_precision_decision_for_inference_and_training_on_the_cpu():
    from mitdenoise.devices import pick_precision

    cpu = torch.device("cpu")
    assert pick_precision("auto", cpu) == "fp32" and pick_precision("auto", cpu, training=True) == "fp32"
    assert pick_precision("bf16", cpu, training=True) == "bf16"  # CPU bf16 autocast is a training option
    with pytest.raises(DeviceError, match="^--precision fp16 is for CUDA; on the CPU use fp32 or bf16$"):
        pick_precision("fp16", cpu)
    with pytest.raises(DeviceError, match="unknown precision 'fp16': use one of auto, fp32, bf16$"):
        pick_precision("fp16", cpu, training=True)
    with pytest.raises(DeviceError, match="unknown precision 'int8'"):
        Denoiser(precision="int8", offline=True)


def test_the_resolver_names_what_runs_and_gives_a_route_its_networks():
    from mitdenoise.registry import PIPELINES, resolve, shipped_checkpoint

    route = resolve("mitdenoise-auto")
    assert route.path is None and route.notice is None
    assert route.networks == {role: shipped_checkpoint(name) for role, name in PIPELINES["mitdenoise-auto"].items()}
    one = resolve("mitdenoise-mild")
    assert (one.name, one.path, one.networks) == ("mitdenoise-mild", shipped_checkpoint("mitdenoise-mild"), {})
    fallback = resolve(None, offline=True)
    assert fallback.name == "mitdenoise-auto" and "mitdenoise download masked-denoising" in fallback.notice
    assert Denoiser(offline=True).model_name == fallback.name
