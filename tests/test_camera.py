"""The camera pipeline: its inverse and forward steps, the sensor noise's statistics, the clean twin."""

import dataclasses

import numpy as np
import pytest

from mitdenoise import camera, noise
from mitdenoise.camera import (
    RAW_REFERENCE,
    add_sensor_noise,
    demosaic_bilinear,
    demosaic_mhc,
    develop,
    draw_camera,
    shot_read,
    unprocess,
)


def mosaic(x: np.ndarray) -> np.ndarray:
    raw = np.empty(x.shape[:2])
    raw[0::2, 0::2], raw[0::2, 1::2] = x[0::2, 0::2, 0], x[0::2, 1::2, 1]
    raw[1::2, 0::2], raw[1::2, 1::2] = x[1::2, 0::2, 1], x[1::2, 1::2, 2]
    return raw


def smooth_image(size=64, seed=0) -> np.ndarray:
    """Gentle colour gradients, away from black and white."""
    yy, xx = np.mgrid[:size, :size] / size
    return np.stack([0.3 + 0.3 * yy, 0.4 + 0.2 * xx, 0.5 - 0.2 * yy * xx], axis=-1)


def psnr(a, b) -> float:
    return float(10 * np.log10(1 / np.mean((a - b) ** 2)))


def test_level_is_the_raw_noise_std_at_mid_grey_and_read_noise_follows_shot_noise():
    for level in (0.5, 2.0, 8.0, 30.0):
        shot, read = shot_read(level)
        assert np.sqrt(shot * RAW_REFERENCE + read) * 255 == pytest.approx(level, rel=1e-6)
        a, b, _ = camera.READ_FROM_SHOT
        assert np.log(read) == pytest.approx(a * np.log(shot) + b)
    assert shot_read(8.0)[0] > shot_read(2.0)[0]
    assert shot_read(0.0) == (0.0, 0.0)


def test_sensor_noise_variance_is_shot_times_signal_plus_read():
    model = dataclasses.replace(draw_camera(6.0, np.random.default_rng(0)), read=1e-5)
    rng = np.random.default_rng(1)
    for value in (0.05, 0.2, 0.6):
        raw = np.full((256, 256), value)
        n = add_sensor_noise(raw, model, rng) - raw
        assert n.var() == pytest.approx(model.shot * value + model.read, rel=0.03)
        assert abs(n.mean()) < 4 * n.std() / 256


@pytest.mark.parametrize("demosaic", [demosaic_bilinear, demosaic_mhc])
def test_demosaicking_gives_back_a_constant_colour_and_mhc_a_linear_ramp(demosaic):
    flat = np.broadcast_to(np.array([0.7, 0.4, 0.2]), (16, 16, 3))
    assert np.allclose(demosaic(mosaic(flat)), flat, atol=2e-5)
    ramp = smooth_image(32)
    interior = (slice(4, -4), slice(4, -4))
    error = np.abs(demosaic_mhc(mosaic(ramp)) - ramp)[interior].max()
    assert error < 0.01


def test_mhc_is_sharper_than_bilinear_on_fine_detail():
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[:96, :96]
    x = np.clip(0.5 + 0.35 * np.sin(xx / 2.3)[..., None] * np.array([1.0, 0.9, 0.8]) + rng.normal(0, 0.01, (96, 96, 3)), 0, 1)
    assert psnr(demosaic_mhc(mosaic(x)), x) > psnr(demosaic_bilinear(mosaic(x)), x) + 3


def test_unprocess_then_develop_gives_a_smooth_image_back():
    x = smooth_image()
    for seed in range(4):
        model = dataclasses.replace(draw_camera(0.0, np.random.default_rng(seed)), demosaic="mhc", jpeg_quality=None)
        out = develop(unprocess(x, model), model)
        assert np.abs(out - x)[4:-4, 4:-4].max() < 0.01, seed


def test_camera_noise_is_correlated_like_a_camera_s_and_heavier_in_the_shadows():
    for trial in range(3):
        g = np.random.default_rng(trial)
        model = dataclasses.replace(draw_camera(4.0, g), demosaic="mhc", jpeg_quality=None)
        grey = np.full((128, 128, 3), 0.5)
        noisy, twin = camera.camera_pair(grey, model, g)
        r = (noisy - twin)[8:-8, 8:-8]
        horizontal = np.corrcoef(r[:, :-1].ravel(), r[:, 1:].ravel())[0, 1]
        assert horizontal > 0.2  # demosaicked: neighbours share samples
        across = np.corrcoef(r.reshape(-1, 3).T)[np.triu_indices(3, 1)]
        assert np.abs(across).max() > 0.1  # the colour matrix mixes channels
    dark, bright = np.full((96, 96, 3), 0.15), np.full((96, 96, 3), 0.85)
    g = np.random.default_rng(5)
    model = dataclasses.replace(draw_camera(4.0, g), jpeg_quality=None)
    std = [np.std(np.subtract(*camera.camera_pair(v, model, np.random.default_rng(6)))) for v in (dark, bright)]
    assert std[0] > std[1]  # the tone curve stretches the shadows' noise


def test_camera_pair_is_seeded_level_zero_is_its_twin_and_levels_order_the_damage():
    x = smooth_image(96) + 0.1 * np.sin(np.mgrid[:96, :96][1] / 1.7)[..., None]
    x = np.clip(x, 0, 1)
    a = noise.noisy_pair(x, "camera", 3.0, 7)
    b = noise.noisy_pair(x, "camera", 3.0, 7)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], noise.noisy_pair(x, "camera", 3.0, 8)[0])
    noisy, twin = noise.noisy_pair(x, "camera", 0.0, 7)
    assert np.array_equal(noisy, twin)
    assert np.array_equal(np.round(twin * 255), twin * 255)  # 8-bit levels, as a camera's file
    scores = [psnr(*noise.noisy_pair(x, "camera", level, 7)) for level in (0.5, 2, 8)]
    assert scores[0] > scores[1] + 3 > scores[2] + 6


def test_jpeg_is_part_of_both_images_when_drawn():
    x = np.clip(smooth_image(64) + np.random.default_rng(0).normal(0, 0.05, (64, 64, 3)), 0, 1)
    model = dataclasses.replace(draw_camera(0.0, np.random.default_rng(0)), jpeg_quality=60)
    noisy, twin = camera.camera_pair(x, model, np.random.default_rng(1))
    assert np.array_equal(noisy, twin)
    plain = dataclasses.replace(model, jpeg_quality=None)
    assert not np.array_equal(camera.camera_pair(x, plain, np.random.default_rng(1))[1], twin)
    assert draw_camera(1.0, np.random.default_rng(0), jpeg=False).jpeg_quality is None
    quality = draw_camera(1.0, np.random.default_rng(0), jpeg=True).jpeg_quality
    assert camera.JPEG_QUALITY[0] <= quality <= camera.JPEG_QUALITY[1]


def test_grey_and_alpha_images_take_the_camera_kinds():
    rng = np.random.default_rng(0)
    grey = np.clip(smooth_image(48)[..., :1] + rng.normal(0, 0.02, (48, 48, 1)), 0, 1).astype(np.float32)
    noisy, twin = noise.noisy_pair(grey, "camera", 3.0, 0)
    assert noisy.shape == twin.shape == (48, 48, 1) and noisy.dtype == np.float32
    rgba = np.concatenate([smooth_image(48), np.full((48, 48, 1), 0.25)], axis=2)
    for kind in ("camera", "gaussianjpeg"):
        out = noise.apply_noise(rgba, kind, 5.0, 0)
        assert out.shape == rgba.shape and np.array_equal(out[..., 3], rgba[..., 3])
    with pytest.raises(ValueError, match="1, 3 or 4 channels"):
        noise.apply_noise(np.zeros((16, 16, 2)), "camera", 2.0, 0)


def test_poisson_gaussian_std_grows_with_the_value_and_is_the_level_at_mid_grey():
    for value, share in ((0.5, 1.0), (0.0, noise.POISSON_GAUSSIAN_READ_SHARE), (1.0, 2 - noise.POISSON_GAUSSIAN_READ_SHARE)):
        x = np.full((256, 256, 3), value)
        std = noise.poisson_gaussian_std(x, 10.0)
        assert std.mean() == pytest.approx(10 / 255 * np.sqrt(share))
    x = np.full((256, 256, 3), 0.5)
    n = noise.poisson_gaussian(x, 10.0, 0) - x
    assert n.std() == pytest.approx(10 / 255, rel=0.02)


def test_gaussian_jpeg_is_gaussian_noise_compressed_to_8_bits():
    x = smooth_image(64)
    g = noise.gaussian(x, 10, 0)
    j = noise.gaussian_jpeg(x, 10, 0)
    assert np.array_equal(np.round(j * 255), j * 255)
    assert 25 < psnr(j, g) < 45  # close to the noisy image, but not it
    assert psnr(j, x) > psnr(g, x)  # JPEG drops some of the finest noise


def test_noisy_pair_references_the_input_for_all_but_the_camera_and_the_spec_knows_the_kinds():
    x = smooth_image(32)
    for kind in ("gaussian", "poissongaussian", "gaussianjpeg", "speckle"):
        noisy, reference = noise.noisy_pair(x, kind, 0.02 if kind == "speckle" else 5.0, 0)
        assert reference is x and not np.array_equal(noisy, x)
    assert noise.parse_noise_spec("camera:2,pg:5,jpeg:10") == [("camera", 2.0), ("poissongaussian", 5.0), ("gaussianjpeg", 10.0)]
    with pytest.raises(ValueError, match="raw noise std"):
        noise.parse_noise_spec("camera:-1")
