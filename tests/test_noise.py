"""Noise models: their statistics for fixed seeds, clipping, determinism, and the spec parser."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mitdenoise import noise
from mitdenoise.noise import (
    NOISES,
    apply_noise,
    correlated,
    derived_rng,
    estimate_noise,
    estimate_sigma,
    gaussian,
    mixture,
    parse_noise_spec,
    poisson,
    salt_and_pepper,
    speckle,
)

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def grey(value=0.5, shape=(256, 256, 3), dtype=np.float64):
    return np.full(shape, value, dtype)


def corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def test_gaussian_adds_zero_mean_noise_of_sigma_over_255():
    x = grey()
    n = gaussian(x, 15, 0) - x
    assert abs(n.mean()) < 4 * (15 / 255) / np.sqrt(n.size)
    assert n.std() == pytest.approx(15 / 255, rel=0.01)
    assert abs(corr(n[:, :-1], n[:, 1:])) < 0.02  # white


def test_correlated_noise_has_sigma_std_and_box_filter_neighbour_correlations():
    x = grey()
    n = correlated(x, 15, 1) - x
    assert abs(n.mean()) < 0.002
    assert n.std() == pytest.approx(15 / 255, rel=0.03)
    assert corr(n[:, :-1], n[:, 1:]) == pytest.approx(6 / 9, abs=0.02)  # horizontal: 6 of 9 draws shared
    assert corr(n[:-1], n[1:]) == pytest.approx(6 / 9, abs=0.02)  # vertical
    assert corr(n[:-1, :-1], n[1:, 1:]) == pytest.approx(4 / 9, abs=0.02)  # diagonal: 4 of 9
    assert abs(corr(n[:, :-3], n[:, 3:])) < 0.03  # three apart: nothing shared
    assert abs(corr(n[..., 0], n[..., 1])) < 0.02  # channels independent


def test_speckle_noise_is_uniform_with_variance_v_times_x_squared():
    v = 0.024
    for value in (0.25, 0.5, 0.75):  # x (1 + sqrt(3v)) < 1: nothing is clipped
        x = grey(value)
        n = speckle(x, v, 2) - x
        assert abs(n.mean()) < 4 * np.sqrt(v) * value / np.sqrt(n.size)
        assert n.var() == pytest.approx(v * value**2, rel=0.02)
        assert np.abs(n).max() <= np.sqrt(3 * v) * value + 1e-12  # uniform on +-sqrt(3v) x


def test_speckle_leaves_black_pixels_black():
    x = grey(0.0, (32, 32, 3))
    assert np.array_equal(speckle(x, 0.05, 0), x)


def levels_image():
    """Half the pixels at 128/255, the rest covering all 256 levels: v = 256."""
    x = np.full((256, 256, 3), 128 / 255)
    x[:128] = (np.arange(128 * 256 * 3) % 256).reshape(128, 256, 3) / 255
    return x


def test_poisson_noise_has_variance_alpha_squared_x_over_v():
    x = levels_image()
    for alpha in (1.0, 2.0):
        n = (poisson(x, alpha, 3) - x)[128:]
        q, v = 128 / 255, 256
        assert abs(n.mean()) < 4 * alpha * np.sqrt(q / v) / np.sqrt(n.size)
        assert n.var() == pytest.approx(alpha**2 * q / v, rel=0.03)
        counts = (n / alpha + q) * v  # the Poisson draws themselves
        assert np.allclose(counts, np.round(counts), atol=1e-6) and counts.min() >= 0


def test_poisson_v_counts_the_images_distinct_levels_as_the_authors_code_does():
    # A constant image has one level, so v = 2^0 = 1: Poisson(0.5) - 0.5 scaled by 2 lands on 0 or 1.
    y = poisson(grey(0.5), 2.0, 4)
    assert set(np.unique(y)) == {0.0, 1.0}
    assert (y == 0).mean() == pytest.approx(np.exp(-0.5), abs=0.01)


def test_poisson_reproduces_the_bundled_example_pair():
    clean = np.asarray(Image.open(EXAMPLES / "kodim23-clean.png").convert("RGB"))
    noisy = np.asarray(Image.open(EXAMPLES / "kodim23-noisy-poisson2.png").convert("RGB"))
    y = poisson(clean / 255.0, 2, np.random.default_rng(0))
    assert np.array_equal(np.floor(y * 255 + 0.5).astype(np.uint8), noisy)


def test_salt_and_pepper_density_and_even_split_per_element():
    x = grey()
    d = 0.1
    y = salt_and_pepper(x, d, 5)
    changed = y != x
    assert changed.mean() == pytest.approx(d, abs=0.003)
    assert (y == 0).mean() == pytest.approx(d / 2, abs=0.002)
    assert (y == 1).mean() == pytest.approx(d / 2, abs=0.002)
    assert set(np.unique(y)) == {0.0, 0.5, 1.0}
    # per element: a pixel's channels are hit independently, as imnoise on an RGB array does
    per_pixel = changed.sum(axis=2)
    assert (per_pixel == 1).mean() == pytest.approx(3 * d * (1 - d) ** 2, abs=0.005)


@pytest.mark.parametrize("kind,level", [("gaussian", 80), ("correlated", 80), ("poisson", 4), ("speckle", 0.5),
                                        ("saltpepper", 0.3), ("mixture", 60)])
def test_every_model_clips_to_unit_range_keeps_shape_and_float_dtype(kind, level):
    rng = np.random.default_rng(0)
    x = rng.random((40, 48, 3)).astype(np.float32)
    x[:5] = 0.0
    x[-5:] = 1.0
    y = apply_noise(x, kind, level, 7)
    assert y.shape == x.shape and y.dtype == np.float32
    assert y.min() >= 0.0 and y.max() <= 1.0
    assert (y == 0).any() or (y == 1).any()  # something was clipped at these levels
    assert not np.array_equal(y, x)


@pytest.mark.parametrize("kind", list(NOISES))
def test_same_seed_same_noise_other_seed_other_noise(kind):
    x = np.random.default_rng(1).random((24, 32, 3))
    level = {"poisson": 2, "speckle": 0.05, "saltpepper": 0.2}.get(kind, 25)
    a = apply_noise(x, kind, level, 3)
    b = apply_noise(x, kind, level, np.random.default_rng(3))
    c = apply_noise(x, kind, level, 4)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_mixture_is_gaussian_then_speckle_then_salt_and_pepper_tied_to_sigma():
    x = np.random.default_rng(2).random((32, 32, 3))
    g = np.random.default_rng(9)
    expected = salt_and_pepper(speckle(gaussian(x, 30, g), 0.048, g), 0.004, g)
    assert np.array_equal(mixture(x, 30, 9), expected)


def test_noise_models_refuse_integer_images_and_wrong_shapes():
    with pytest.raises(ValueError, match="float"):
        gaussian(np.zeros((8, 8, 3), np.uint8), 15, 0)
    with pytest.raises(ValueError, match=r"\(H, W, C\)"):
        gaussian(np.zeros((8, 8)), 15, 0)


def test_one_seed_derivation_keeps_the_values_runs_were_made_with():
    """derive_seed (training's patches and masks: a resumed run must see the same batches) and
    derived_rng (bench noise) are one derivation now; their values for the keys they take are
    those of the formulas each had before."""
    from mitdenoise.noise import derive_seed, seed_sequence

    for parts in [(0, 0, 0), (7, 123456, 31), (2**33 + 5, 4, 1), (0, 5, 2, 1)]:
        state = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint32)
        assert derive_seed(*parts) == (int(state[0]) << 31) ^ int(state[1])
    import zlib

    old = np.random.default_rng(np.random.SeedSequence([3, 1, zlib.crc32(b"gaussian"), zlib.crc32(b"15")]))
    assert np.array_equal(derived_rng(3, 1, "gaussian", 15.0).random(5), old.random(5))
    assert seed_sequence(-1).entropy == [0xFFFFFFFF]
    assert derive_seed(1, 2) != derive_seed(2, 1)


def test_derived_rng_depends_on_keys_not_on_call_order():
    a1 = derived_rng(0, 1, "gaussian", 15.0).random(4)
    derived_rng(0, 2, "poisson", 2.0).random(4)
    a2 = derived_rng(0, 1, "gaussian", 15.0).random(4)
    assert np.array_equal(a1, a2)
    assert not np.array_equal(a1, derived_rng(0, 2, "gaussian", 15.0).random(4))
    assert not np.array_equal(a1, derived_rng(1, 1, "gaussian", 15.0).random(4))
    assert not np.array_equal(a1, derived_rng(0, 1, "gaussian", 25.0).random(4))


def _smooth_image():
    yy, xx = np.mgrid[0:192, 0:192] / 192
    return np.stack([0.3 + 0.4 * xx, 0.5 + 0.2 * np.sin(3 * yy), 0.6 - 0.3 * xx * yy], axis=-1)


@pytest.mark.parametrize("sigma", [1, 2, 5, 15, 30, 50])
def test_estimate_sigma_reads_white_gaussian_noise_from_1_to_50_on_a_smooth_image(sigma):
    x = _smooth_image()
    assert estimate_sigma(gaussian(x, sigma, sigma)) * 255 == pytest.approx(sigma, rel=0.03, abs=0.05)
    assert estimate_sigma(gaussian(x[..., :1], sigma, sigma)) * 255 == pytest.approx(sigma, rel=0.03, abs=0.05)


def test_estimate_sigma_counts_spatially_correlated_noise_and_reads_a_clean_image_as_near_zero():
    x = _smooth_image()
    for sigma in (5, 15):
        assert estimate_sigma(correlated(x, sigma, sigma)) * 255 == pytest.approx(sigma, rel=0.12)
    assert estimate_sigma(x) * 255 < 0.1
    with pytest.raises(ValueError, match="too small"):
        estimate_sigma(x[:15, :40])


def test_estimate_sigma_on_real_camera_noise_is_within_2_levels_of_the_true_residual(data_dir):
    """CC15: the true noise is noisy - clean (std 5.5 levels on average); white-noise estimators read ~1."""
    folder = data_dir / "test" / "cc15"
    errors = []
    for path in sorted((folder / "noisy").glob("*.png")):
        noisy = np.asarray(Image.open(path).convert("RGB"), np.float64)
        clean = np.asarray(Image.open(folder / "clean" / path.name).convert("RGB"), np.float64)
        errors.append(estimate_sigma(noisy / 255) * 255 - np.std(noisy - clean))
    assert len(errors) == 15
    assert np.mean(np.abs(errors)) < 1.8 and max(np.abs(errors)) < 3.3


def test_parse_noise_spec_reads_kinds_levels_and_aliases():
    assert parse_noise_spec("gaussian:15,poisson:2,speckle:0.024,saltpepper:0.02") == [
        ("gaussian", 15.0), ("poisson", 2.0), ("speckle", 0.024), ("saltpepper", 0.02)
    ]
    assert parse_noise_spec(" Gaussian : 25 , sp:0.002, mixture:15, correlated:10,") == [
        ("gaussian", 25.0), ("saltpepper", 0.002), ("mixture", 15.0), ("correlated", 10.0)
    ]
    assert parse_noise_spec("gaussian:15,gaussian:15") == [("gaussian", 15.0)]


@pytest.mark.parametrize(
    "spec,message",
    [
        ("", "empty noise spec"),
        ("gaussian", "expected kind:level"),
        ("gaussian:", "expected kind:level"),
        ("blur:3", "unknown noise kind 'blur'"),
        ("gaussian:abc", "'abc' is not a number"),
        ("gaussian:-5", "bad level -5 for gaussian"),
        ("saltpepper:1.5", "density in \\[0, 1\\]"),
        ("poisson:nan", "bad level nan"),
    ],
)
def test_parse_noise_spec_names_the_bad_item(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_noise_spec(spec)


def test_registry_names_match_the_issue():
    assert list(NOISES) == ["gaussian", "correlated", "poisson", "speckle", "saltpepper", "mixture", "camera",
                            "poissongaussian", "gaussianjpeg"]
    assert noise.noise_label("speckle", 0.024) == "speckle:0.024"


@pytest.mark.parametrize("sigma", [2, 5, 15, 30])
def test_estimate_noise_reads_white_noise_as_white_at_its_level(sigma):
    estimate = estimate_noise(gaussian(_smooth_image(), sigma, sigma))
    assert estimate.white_sigma * 255 == pytest.approx(sigma, rel=0.1)
    assert estimate.sigma * 255 == pytest.approx(sigma, rel=0.03, abs=0.05)
    assert abs(estimate.correlation) < 0.1


@pytest.mark.parametrize("sigma", [3, 8])
def test_estimate_noise_reads_camera_structured_noise_as_correlated_with_little_white_part(sigma):
    estimate = estimate_noise(correlated(_smooth_image(), sigma, sigma))
    assert estimate.correlation > 0.5
    assert estimate.white_sigma < 0.25 * estimate.sigma
    assert estimate.sigma * 255 == pytest.approx(sigma, rel=0.15)


def test_estimate_noise_of_a_clean_image_is_zero_and_uncorrelated():
    assert estimate_noise(np.full((64, 64, 3), 0.5)) == pytest.approx((0.0, 0.0, 0.0), abs=1e-12)


def test_white_noise_variances_read_each_channel_where_the_noise_grows_with_the_signal():
    """A red scene under noise of variance (2/255)^2 + (12/255)^2 x per value: the bright red channel
    has about three times the noise of the dark blue one. Over all channels at once the estimate reads
    one level for all three, under half the red channel's variance; channel by channel it reads each
    within a fifth."""
    yy, xx = np.mgrid[0:256, 0:256] / 256
    scene = np.stack([0.8 + 0.1 * xx, 0.3 + 0.1 * np.sin(3 * yy), 0.05 + 0.05 * xx * yy], axis=-1)
    variance = (2 / 255) ** 2 + (12 / 255) ** 2 * scene
    noisy = scene + np.random.default_rng(0).normal(size=scene.shape) * np.sqrt(variance)
    truth = variance.reshape(-1, 3).mean(0)
    read = noise.white_noise_variances(noisy)
    assert read.shape == (3,) and read == pytest.approx(truth, rel=0.2)
    assert estimate_noise(noisy).white_sigma ** 2 < 0.5 * truth[0]
    white = gaussian(_smooth_image(), 8, 1)
    assert np.sqrt(noise.white_noise_variances(white)) * 255 == pytest.approx([8, 8, 8], rel=0.1)
    assert noise.white_noise_variances(np.full((64, 64, 3), 0.5)) == pytest.approx([0, 0, 0], abs=1e-12)
    white[..., 2] = 0.5  # a channel without noise keeps none, and the others read theirs
    assert np.sqrt(noise.white_noise_variances(white)) * 255 == pytest.approx([8, 8, 0], rel=0.1, abs=1e-6)
    grey = gaussian(_smooth_image()[..., :1], 8, 2)
    assert np.sqrt(noise.white_noise_variances(grey)) * 255 == pytest.approx([8], rel=0.1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_white_noise_variances_hold_on_a_small_image(seed):
    """128x128 under Gaussian noise of sigma 15: patches at every position read it within 3 %, where
    the route's estimate, on every 4th, reads 11.5-12.5."""
    noisy = gaussian(_smooth_image()[:128, :128], 15, seed)
    assert np.sqrt(noise.white_noise_variances(noisy)) * 255 == pytest.approx([15, 15, 15], rel=0.03)
    assert estimate_noise(noisy).white_sigma * 255 < 13
