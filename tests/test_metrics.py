"""PSNR and SSIM agree with scikit-image (the reference implementation) on RGB, on Y, with a border crop."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mitdenoise.metrics import psnr, rgb_to_y, ssim

skimage_metrics = pytest.importorskip("skimage.metrics")
skimage_color = pytest.importorskip("skimage.color")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SK_SSIM = dict(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)


def pair(seed=0, shape=(48, 64, 3), sigma=20.0):
    """A smooth uint8 image and a noisy copy."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]] / max(shape[:2])
    clean = np.stack([128 + 80 * np.sin(5 * xx + c) * np.cos(4 * yy - c) for c in range(shape[2])], axis=-1)
    noisy = clean + rng.normal(0, sigma, clean.shape)
    return np.clip(clean, 0, 255).astype(np.uint8), np.clip(np.round(noisy), 0, 255).astype(np.uint8)


def example_pair():
    clean = np.asarray(Image.open(EXAMPLES / "kodim23-clean.png").convert("RGB"))[:96, :128]
    noisy = np.asarray(Image.open(EXAMPLES / "kodim23-noisy-poisson2.png").convert("RGB"))[:96, :128]
    return clean, noisy


@pytest.mark.parametrize("make", [pair, example_pair])
def test_rgb_psnr_and_ssim_match_scikit_image(make):
    a, b = make()
    assert psnr(a, b) == pytest.approx(skimage_metrics.peak_signal_noise_ratio(a, b, data_range=255), abs=1e-3)
    expected = skimage_metrics.structural_similarity(a, b, data_range=255, channel_axis=-1, **SK_SSIM)
    assert ssim(a, b) == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("make", [pair, example_pair])
def test_y_channel_psnr_and_ssim_match_scikit_image_bt601(make):
    a, b = make()
    ya, yb = skimage_color.rgb2ycbcr(a)[..., 0], skimage_color.rgb2ycbcr(b)[..., 0]
    assert psnr(a, b, y_channel=True) == pytest.approx(
        skimage_metrics.peak_signal_noise_ratio(ya, yb, data_range=255), abs=1e-3
    )
    assert ssim(a, b, y_channel=True) == pytest.approx(
        skimage_metrics.structural_similarity(ya, yb, data_range=255, **SK_SSIM), abs=1e-4
    )


def test_y_is_basicsr_bt601_studio_range():
    rgb = np.array([[[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [1.0, 0.0, 0.0]]])
    assert rgb_to_y(rgb) == pytest.approx(np.array([[16.0, 235.0, 16 + 65.481]]))


def test_border_crop_drops_pixels_on_every_side():
    a, b = pair(1, (60, 70, 3))
    c = 4
    ac, bc = a[c:-c, c:-c], b[c:-c, c:-c]
    assert psnr(a, b, crop_border=c) == pytest.approx(skimage_metrics.peak_signal_noise_ratio(ac, bc, data_range=255), abs=1e-3)
    assert ssim(a, b, crop_border=c) == pytest.approx(
        skimage_metrics.structural_similarity(ac, bc, data_range=255, channel_axis=-1, **SK_SSIM), abs=1e-4
    )
    # damage only the border: the cropped scores don't see it
    b2 = b.copy()
    b2[:c] = 0
    assert psnr(a, b2, crop_border=c) == psnr(a, b, crop_border=c)
    assert psnr(a, b2) < psnr(a, b)


def test_uint16_and_float_images_use_their_own_data_range():
    a, b = pair(2)
    a16, b16 = a.astype(np.uint16) * 257, b.astype(np.uint16) * 257
    assert psnr(a16, b16) == pytest.approx(psnr(a, b), abs=1e-6)
    assert ssim(a16, b16) == pytest.approx(ssim(a, b), abs=1e-6)
    af, bf = a.astype(np.float32) / 255, b.astype(np.float32) / 255
    assert psnr(af, bf) == pytest.approx(psnr(a, b), abs=1e-4)
    assert ssim(af, bf) == pytest.approx(
        skimage_metrics.structural_similarity(af, bf, data_range=1.0, channel_axis=-1, **SK_SSIM), abs=1e-4
    )
    assert psnr(af, bf, y_channel=True) == pytest.approx(psnr(a, b, y_channel=True), abs=1e-4)


def test_grey_images_and_identical_images():
    a, b = pair(3, (40, 40, 1))
    expected = skimage_metrics.peak_signal_noise_ratio(a[..., 0], b[..., 0], data_range=255)
    assert psnr(a[..., 0], b[..., 0]) == pytest.approx(expected, abs=1e-3)
    assert psnr(a, b, y_channel=True) == pytest.approx(expected, abs=1e-3)  # one channel: Y is the image
    assert psnr(a, a) == float("inf")
    assert ssim(a, a) == pytest.approx(1.0)


def test_bad_inputs_are_value_errors():
    a, b = pair()
    with pytest.raises(ValueError, match="differ in shape"):
        psnr(a, b[:-1])
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(a[:8, :8], b[:8, :8])
    with pytest.raises(ValueError, match="leaves nothing"):
        psnr(a, b, crop_border=40)


def test_the_product_does_not_import_scikit_image():
    import mitdenoise

    package = Path(mitdenoise.__file__).parent
    modules = sorted(package.rglob("*.py"))
    assert package / "metrics.py" in modules and package / "bench" / "quality.py" in modules
    for module in modules:
        source = module.read_text()
        assert "import skimage" not in source and "from skimage" not in source, module
