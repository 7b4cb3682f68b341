"""Image I/O: what survives a round trip, what is converted, and how failures read."""

import errno
import tempfile
from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image as PILImage
from PIL import ImageCms, ImageOps

from mitdenoise import imageio
from mitdenoise.errors import ImageReadError, ImageWriteError
from mitdenoise.imageio import Image, from_float, read_image, set_max_pixels, to_float, write_image

SRGB_ICC = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
LAYOUTS = {"gray": (1, False), "RGB": (3, False), "RGBA": (3, True), "LA": (1, True)}


def smooth(h: int, w: int, channels: int, dtype, seed: int = 0) -> np.ndarray:
    """A smooth gradient with a little texture: what lossy codecs are judged on."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    planes = [0.5 + 0.4 * np.sin(x / 9 + 2 * c + seed) * np.cos(y / 13 + c) for c in range(channels)]
    return from_float(np.stack(planes, axis=2), dtype)


def noise(h: int, w: int, channels: int, dtype, seed: int = 0) -> np.ndarray:
    """Every value possible, no structure: lossless paths must give back every bit."""
    rng = np.random.default_rng(seed)
    if dtype == np.float32:
        return rng.random((h, w, channels), dtype=np.float32)
    return rng.integers(0, np.iinfo(dtype).max, (h, w, channels), dtype=dtype, endpoint=True)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((to_float(a).astype(np.float64) - to_float(b)) ** 2)
    return float(10 * np.log10(1 / max(mse, 1e-12)))


def layout_image(layout: str, dtype, make=noise) -> Image:
    channels, has_alpha = LAYOUTS[layout]
    pixels = make(12, 17, channels, dtype)
    alpha = make(12, 17, 1, dtype, seed=7)[..., 0] if has_alpha else None
    return Image(pixels, alpha, SRGB_ICC if channels == 3 else None)


def exif_with(orientation: int) -> bytes:
    exif = PILImage.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("suffix", [".png", ".tif", ".tiff"])
def test_lossless_formats_give_back_every_bit_depth_channel_alpha_and_profile(tmp_path, suffix, layout, dtype):
    image = layout_image(layout, dtype)
    write_image(tmp_path / f"x{suffix}", image)
    back = read_image(tmp_path / f"x{suffix}")
    assert back.pixels.dtype == dtype and back.pixels.shape == image.pixels.shape
    assert np.array_equal(back.pixels, image.pixels)
    if image.alpha is None:
        assert back.alpha is None
    else:
        assert back.alpha.dtype == dtype and np.array_equal(back.alpha, image.alpha)
    assert back.icc_profile == image.icc_profile


@pytest.mark.parametrize("layout", ["gray", "RGB"])
def test_bmp_gives_back_8bit_gray_and_rgb_exactly(tmp_path, layout):
    image = layout_image(layout, np.uint8)
    write_image(tmp_path / "x.bmp", image)
    back = read_image(tmp_path / "x.bmp")
    assert back.pixels.dtype == np.uint8 and np.array_equal(back.pixels, image.pixels)


@pytest.mark.parametrize("suffix", [".jpg", ".jpeg"])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
@pytest.mark.parametrize("layout", ["gray", "RGB"])
def test_jpeg_is_8bit_and_close_on_a_smooth_image(tmp_path, suffix, layout, dtype):
    image = layout_image(layout, dtype, make=smooth)
    write_image(tmp_path / f"x{suffix}", image)
    back = read_image(tmp_path / f"x{suffix}")
    assert back.pixels.dtype == np.uint8 and back.pixels.shape == image.pixels.shape
    assert psnr(back.pixels, image.pixels) > 35
    assert back.icc_profile == image.icc_profile


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_webp_is_8bit_rgb_close_on_a_smooth_image_with_exact_alpha(tmp_path, layout, dtype):
    image = layout_image(layout, dtype, make=smooth)
    write_image(tmp_path / "x.webp", image)
    back = read_image(tmp_path / "x.webp")
    # WebP has no grayscale: gray comes back as RGB
    assert back.pixels.dtype == np.uint8 and back.pixels.shape == (12, 17, 3)
    assert psnr(back.pixels, np.broadcast_to(image.pixels, (12, 17, 3))) > 35
    if image.alpha is None:
        assert back.alpha is None
    else:
        assert np.array_equal(back.alpha, from_float(to_float(image.alpha), np.uint8))
    assert back.icc_profile == image.icc_profile


def test_16bit_is_rounded_to_nearest_8bit_where_the_format_holds_only_8(tmp_path):
    image = layout_image("RGB", np.uint16)
    write_image(tmp_path / "x.bmp", image)
    back = read_image(tmp_path / "x.bmp")
    expected = ((image.pixels.astype(np.float64) * 255 / 65535) + 0.5).astype(np.uint8)
    assert back.pixels.dtype == np.uint8 and np.array_equal(back.pixels, expected)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_float_tiff_keeps_float32_values_as_stored(tmp_path, layout):
    image = layout_image(layout, np.float32)
    image.pixels[0, 0] = -0.25  # out of [0, 1] on purpose: a TIFF of floats is read as it is
    image.pixels[0, 1] = 3.5
    write_image(tmp_path / "x.tif", image)
    back = read_image(tmp_path / "x.tif")
    assert back.pixels.dtype == np.float32 and np.array_equal(back.pixels, image.pixels)
    assert image.alpha is None or np.array_equal(back.alpha, image.alpha)


def test_float_tiff_from_pillow_reads_as_one_float_channel(tmp_path):
    values = np.linspace(-1, 5, 30, dtype=np.float32).reshape(5, 6)
    PILImage.fromarray(values).save(tmp_path / "f.tif")
    back = read_image(tmp_path / "f.tif")
    assert back.pixels.dtype == np.float32 and back.pixels.shape == (5, 6, 1)
    assert np.array_equal(back.pixels[..., 0], values)


def test_float_to_png_is_clipped_and_stored_as_16bit(tmp_path):
    pixels = np.array([[[-0.5], [0.0], [0.5], [1.0], [2.0]]], np.float32)
    write_image(tmp_path / "x.png", Image(pixels))
    back = read_image(tmp_path / "x.png")
    assert back.pixels.dtype == np.uint16
    assert back.pixels.ravel().tolist() == [0, 0, 32768, 65535, 65535]


def test_16bit_gray_png_saved_by_pillow_reads_as_uint16(tmp_path):
    values = np.arange(0, 65536, 4099, dtype=np.uint16).reshape(2, 8)
    PILImage.fromarray(values).save(tmp_path / "g.png")
    assert PILImage.open(tmp_path / "g.png").mode == "I;16"
    back = read_image(tmp_path / "g.png")
    assert back.pixels.dtype == np.uint16 and np.array_equal(back.pixels[..., 0], values)


@pytest.mark.parametrize("suffix", [".png", ".tif"])
@pytest.mark.parametrize("channels", [3, 4])
def test_16bit_colour_from_opencv_reads_as_uint16_in_rgb_order(tmp_path, suffix, channels):
    rgba = noise(9, 11, channels, np.uint16)
    bgra = rgba[..., [2, 1, 0, 3][:channels]]
    assert cv2.imwrite(str(tmp_path / f"c{suffix}"), bgra)
    back = read_image(tmp_path / f"c{suffix}")
    assert back.pixels.dtype == np.uint16 and np.array_equal(back.pixels, rgba[..., :3])
    assert channels == 3 or np.array_equal(back.alpha, rgba[..., 3])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_16bit_pngs_we_write_decode_the_same_in_opencv(tmp_path, layout):
    image = layout_image(layout, np.uint16)
    write_image(tmp_path / "x.png", image)
    decoded = cv2.imread(str(tmp_path / "x.png"), cv2.IMREAD_UNCHANGED)
    if decoded.ndim == 2:
        decoded = decoded[..., None]
    channels, has_alpha = LAYOUTS[layout]
    assert decoded.dtype == np.uint16
    assert np.array_equal(decoded[..., :channels][..., ::-1] if channels == 3 else decoded[..., :1], image.pixels)
    assert not has_alpha or np.array_equal(decoded[..., -1], image.alpha)


# ---------------------------------------------------------------- orientation and EXIF


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_like_pillows_exif_transpose(tmp_path, orientation):
    rgba = noise(5, 8, 4, np.uint8)
    PILImage.fromarray(rgba).save(tmp_path / "o.png", exif=exif_with(orientation=orientation))
    expected = np.asarray(ImageOps.exif_transpose(PILImage.open(tmp_path / "o.png")))
    back = read_image(tmp_path / "o.png")
    assert np.array_equal(back.pixels, expected[..., :3]) and np.array_equal(back.alpha, expected[..., 3])


def test_orientation_6_turns_the_image_clockwise(tmp_path):
    pixels = noise(4, 7, 3, np.uint8)
    PILImage.fromarray(pixels).save(tmp_path / "o.jpg", exif=exif_with(orientation=6), quality=100)
    stored = np.asarray(PILImage.open(tmp_path / "o.jpg"))
    back = read_image(tmp_path / "o.jpg")
    assert back.pixels.shape == (7, 4, 3)
    # the stored bottom-left pixel is shown top-left
    assert np.array_equal(back.pixels, np.rot90(stored, -1))
    assert np.array_equal(back.pixels[0, 0], stored[-1, 0])


def test_orientation_is_applied_to_16bit_colour_decoded_by_opencv(tmp_path):
    image = layout_image("RGBA", np.uint16)
    write_image(tmp_path / "o.png", Image(image.pixels, image.alpha, exif=exif_with(orientation=6)))
    back = read_image(tmp_path / "o.png")
    assert back.pixels.dtype == np.uint16
    assert np.array_equal(back.pixels, np.rot90(image.pixels, -1))
    assert np.array_equal(back.alpha, np.rot90(image.alpha, -1))


@pytest.mark.parametrize("orientation", [3, 6, 8])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
@pytest.mark.parametrize("channels", [1, 3])
def test_tiff_orientation_is_applied_once_for_every_depth_and_layout(tmp_path, orientation, dtype, channels):
    import tifffile

    stored = noise(6, 10, channels, dtype)
    tifffile.imwrite(
        tmp_path / "o.tif", stored[..., 0] if channels == 1 else stored,
        photometric="minisblack" if channels == 1 else "rgb", extratags=[(274, 3, 1, orientation, True)],
    )
    turn = {3: lambda a: a[::-1, ::-1], 6: lambda a: np.rot90(a, -1), 8: lambda a: np.rot90(a, 1)}[orientation]
    back = read_image(tmp_path / "o.tif")
    assert back.pixels.dtype == dtype and np.array_equal(back.pixels, turn(stored))


@pytest.mark.parametrize("samples", [3, 4])
def test_a_planar_16bit_colour_tiff_reads_as_16bit_with_its_own_pixels(tmp_path, samples):
    import tifffile

    stored = noise(12, 9, samples, np.uint16)
    tifffile.imwrite(
        tmp_path / "p.tif", np.moveaxis(stored, -1, 0), photometric="rgb", planarconfig="separate",
        extrasamples=["unassalpha"] if samples == 4 else None,
    )
    back = read_image(tmp_path / "p.tif")
    assert back.pixels.dtype == np.uint16 and np.array_equal(back.pixels, stored[..., :3])
    assert (back.alpha is None) if samples == 3 else np.array_equal(back.alpha, stored[..., 3])


def test_a_16bit_colour_tiff_taller_than_opencv_allows_is_read(tmp_path):
    import tifffile

    stored = noise(1_100_000, 2, 3, np.uint16)
    tifffile.imwrite(tmp_path / "tall.tif", stored, photometric="rgb")
    assert np.array_equal(read_image(tmp_path / "tall.tif").pixels, stored)


def test_an_lzw_16bit_colour_tiff_still_reads_through_pillow_and_opencv_upright(tmp_path):
    stored = noise(6, 10, 3, np.uint16)
    ok, encoded = cv2.imencode(".tif", stored[..., ::-1], [cv2.IMWRITE_TIFF_COMPRESSION, 5])
    assert ok
    (tmp_path / "lzw.tif").write_bytes(encoded.tobytes())
    back = read_image(tmp_path / "lzw.tif")
    assert back.pixels.dtype == np.uint16 and np.array_equal(back.pixels, stored)


def test_nan_or_infinite_float_samples_are_refused_naming_the_count(tmp_path):
    import tifffile

    stored = noise(8, 8, 3, np.float32)
    stored[3, 3, 0], stored[4, 5, 2] = np.nan, np.inf
    tifffile.imwrite(tmp_path / "nan.tif", stored, photometric="rgb")
    with pytest.raises(ImageReadError, match=r"^cannot read .*nan.tif: 2 sample\(s\) are NaN or infinite$"):
        read_image(tmp_path / "nan.tif")


@pytest.mark.parametrize("tag", ["ImageWidth", "ImageLength"])
def test_a_tiff_of_zero_width_or_height_is_refused(tmp_path, tag):
    import struct

    import tifffile

    tifffile.imwrite(tmp_path / "z.tif", noise(16, 16, 3, np.uint8), photometric="rgb")
    with tifffile.TiffFile(tmp_path / "z.tif") as tif:
        offset = tif.pages[0].tags[tag].valueoffset
    data = bytearray((tmp_path / "z.tif").read_bytes())
    data[offset : offset + 4] = struct.pack("<I", 0)
    (tmp_path / "z.tif").write_bytes(bytes(data))
    with pytest.raises(ImageReadError, match=r"^cannot read .*z.tif: "):
        read_image(tmp_path / "z.tif")


@pytest.mark.parametrize("orientation", [0, 9])
def test_an_invalid_orientation_is_read_as_upright(tmp_path, orientation):
    pixels = noise(4, 7, 3, np.uint8)
    PILImage.fromarray(pixels).save(tmp_path / "o.png", exif=exif_with(orientation=orientation))
    assert np.array_equal(read_image(tmp_path / "o.png").pixels, pixels)


def test_written_exif_says_upright_and_keeps_the_other_tags(tmp_path):
    exif = PILImage.Exif()
    exif[0x0112], exif[0x010F] = 6, "TestCam"
    PILImage.fromarray(smooth(8, 12, 3, np.uint8)).save(tmp_path / "cam.jpg", exif=exif.tobytes())
    image = read_image(tmp_path / "cam.jpg")
    for suffix in (".jpg", ".png", ".webp"):
        write_image(tmp_path / f"out{suffix}", image)
        written = PILImage.open(tmp_path / f"out{suffix}").getexif()
        assert written[0x0112] == 1 and written[0x010F] == "TestCam"
        assert read_image(tmp_path / f"out{suffix}").pixels.shape == (12, 8, 3)


# ---------------------------------------------------------------- colour models and frames


def test_palette_with_transparency_becomes_rgb_plus_alpha(tmp_path):
    indices = np.array([[0, 1, 2], [2, 1, 0]], np.uint8)
    palette = [255, 0, 0, 0, 255, 0, 0, 0, 255]
    im = PILImage.fromarray(indices, "L").convert("P")
    im.putpalette(palette)
    im.save(tmp_path / "p.png", transparency=1)
    back = read_image(tmp_path / "p.png")
    colours = np.array(palette).reshape(-1, 3)
    assert back.pixels.dtype == np.uint8 and np.array_equal(back.pixels, colours[indices])
    assert np.array_equal(back.alpha, np.where(indices == 1, 0, 255))


def test_gray_with_a_transparent_colour_key_gets_an_alpha_plane(tmp_path):
    gray = np.array([[5, 6], [7, 5]], np.uint8)
    PILImage.fromarray(gray).save(tmp_path / "k.png", transparency=5)
    back = read_image(tmp_path / "k.png")
    assert back.pixels.shape == (2, 2, 1) and np.array_equal(back.alpha, [[0, 255], [255, 0]])


def test_cmyk_jpeg_reads_as_rgb(tmp_path):
    rgb = smooth(16, 16, 3, np.uint8)
    PILImage.fromarray(rgb).convert("CMYK").save(tmp_path / "c.jpg", quality=100)
    back = read_image(tmp_path / "c.jpg")
    expected = np.asarray(PILImage.open(tmp_path / "c.jpg").convert("RGB"))
    assert back.pixels.dtype == np.uint8 and back.pixels.shape == (16, 16, 3)
    assert np.array_equal(back.pixels, expected) and back.icc_profile is None
    assert psnr(back.pixels, rgb) > 30


def test_one_bit_image_reads_as_8bit_gray(tmp_path):
    bits = np.array([[0, 255, 0], [255, 255, 0]], np.uint8)
    PILImage.fromarray(bits).convert("1").save(tmp_path / "b.png")
    back = read_image(tmp_path / "b.png")
    assert back.pixels.dtype == np.uint8 and np.array_equal(back.pixels[..., 0], bits)


def test_multi_frame_gif_and_tiff_give_their_first_frame(tmp_path):
    first, second = (PILImage.new("RGB", (6, 4), colour) for colour in ((255, 0, 0), (0, 0, 255)))
    first.save(tmp_path / "a.gif", save_all=True, append_images=[second])
    first.save(tmp_path / "a.tif", save_all=True, append_images=[second])
    for name in ("a.gif", "a.tif"):
        back = read_image(tmp_path / name)
        assert back.pixels.shape == (4, 6, 3) and np.all(back.pixels == [255, 0, 0]), name


def test_32bit_integer_tiff_is_read_as_16bit_only_when_it_fits(tmp_path):
    fits = np.array([[0, 1000], [65535, 7]], np.int32)
    PILImage.fromarray(fits, "I").save(tmp_path / "fits.tif")
    back = read_image(tmp_path / "fits.tif")
    assert back.pixels.dtype == np.uint16 and np.array_equal(back.pixels[..., 0], fits)
    PILImage.fromarray(fits * 2, "I").save(tmp_path / "big.tif")
    with pytest.raises(ImageReadError, match=r"big\.tif: integer pixels \(range 0\.\.131070\) do not fit unsigned 16 bits"):
        read_image(tmp_path / "big.tif")


def test_signed_16bit_tiff_below_zero_is_refused_with_its_range(tmp_path):
    import tifffile

    tifffile.imwrite(tmp_path / "s.tif", np.array([[-5, 1000], [7, 0]], np.int16))
    with pytest.raises(ImageReadError, match=r"s\.tif: integer pixels \(range -5\.\.1000\) do not fit unsigned 16 bits"):
        read_image(tmp_path / "s.tif")


@pytest.mark.parametrize("photometric, samples", [("rgb", 5), ("minisblack", 3)])
def test_a_tiff_with_more_than_one_extra_sample_is_refused_not_cut_down(tmp_path, photometric, samples):
    """Read as RGBA (or gray + alpha) the rest would vanish from the output without a word."""
    import tifffile

    data = noise(8, 8, samples, np.uint8)
    extras = samples - (3 if photometric == "rgb" else 1)
    tifffile.imwrite(tmp_path / "x.tif", data, photometric=photometric, extrasamples=["unassalpha"] + ["unspecified"] * (extras - 1))
    with pytest.raises(ImageReadError, match=rf"x\.tif: {samples} samples per pixel \({photometric.upper()} and {extras} extra\)"):
        read_image(tmp_path / "x.tif")


# ---------------------------------------------------------------- read errors


def _cut_in_half(path: Path) -> None:
    """A valid image, in the format the name says, with its second half missing."""
    PILImage.fromarray(noise(40, 40, 3, np.uint8)).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _16bit_colour_cut_in_half(path: Path) -> None:
    """The same for a file Pillow opens but OpenCV decodes."""
    write_image(path, Image(noise(40, 40, 3, np.uint16)))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
    "name, make, reason",
    [
        ("missing.png", lambda p: None, "no such file"),
        ("folder.png", lambda p: p.mkdir(), "it is a folder"),
        ("empty.png", lambda p: p.write_bytes(b""), "the file is empty"),
        ("cut.png", _cut_in_half, "truncated image file"),
        ("cut.jpg", _cut_in_half, "truncated image file"),
        ("cut16.png", _16bit_colour_cut_in_half, "truncated or corrupt 16-bit image data"),
        ("notes.png", lambda p: p.write_text("these are my notes, not a picture"), "not a PNG, JPEG, TIFF, BMP, WebP or GIF image"),
        ("photo.png", lambda p: PILImage.new("RGB", (4, 4)).save(p, "PPM"), "not a PNG, JPEG, TIFF, BMP, WebP or GIF image"),
    ],
)
def test_unreadable_inputs_give_one_line_naming_the_file_and_the_reason(tmp_path, name, make, reason):
    make(tmp_path / name)
    with pytest.raises(ImageReadError) as caught:
        read_image(tmp_path / name)
    message = str(caught.value)
    assert message == f"cannot read {tmp_path / name}: {message.split(': ', 1)[1]}"
    assert reason in message and "\n" not in message


def test_an_image_over_the_pixel_limit_is_refused_with_its_size(tmp_path):  # conftest restores the limit
    PILImage.new("RGB", (15, 10)).save(tmp_path / "a.png")
    set_max_pixels(100)  # 150 pixels: Pillow's warning range
    with pytest.raises(ImageReadError, match=r"a\.png: image has 150 pixels, over the limit of 100; pass --max-pixels"):
        read_image(tmp_path / "a.png")
    set_max_pixels(50)  # 150 pixels: Pillow's error range
    with pytest.raises(ImageReadError, match=r"image has 150 pixels, over the limit of 50"):
        read_image(tmp_path / "a.png")
    set_max_pixels(None)
    assert read_image(tmp_path / "a.png").pixels.shape == (10, 15, 3)


@pytest.mark.parametrize("suffix, layout", [(".png", "RGB"), (".tif", "LA")])
def test_the_pixel_limit_also_guards_opencv_and_tifffile_decoding(tmp_path, suffix, layout):
    write_image(tmp_path / f"deep{suffix}", layout_image(layout, np.uint16))  # 12 x 17 = 204 pixels
    set_max_pixels(200)
    with pytest.raises(ImageReadError, match=r"image has 204 pixels, over the limit of 200"):
        read_image(tmp_path / f"deep{suffix}")


# ---------------------------------------------------------------- write errors and atomicity


def test_unknown_extension_is_refused_naming_the_supported_ones(tmp_path):
    with pytest.raises(ImageWriteError, match=r"x\.gif: unknown image format \.gif; use one of \.bmp, \.jpeg, \.jpg, \.png"):
        write_image(tmp_path / "x.gif", layout_image("RGB", np.uint8))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("suffix, name", [(".jpg", "JPEG"), (".bmp", "BMP")])
def test_alpha_is_refused_where_the_format_cannot_store_it(tmp_path, suffix, name):
    with pytest.raises(ImageWriteError, match=f"{name} cannot store the alpha channel; write .png or .tif"):
        write_image(tmp_path / f"x{suffix}", layout_image("RGBA", np.uint8))
    assert list(tmp_path.iterdir()) == []


def test_overwrite_false_refuses_an_existing_target_and_leaves_it(tmp_path):
    (tmp_path / "x.png").write_bytes(b"keep me")
    with pytest.raises(ImageWriteError, match=r"x\.png: it already exists"):
        write_image(tmp_path / "x.png", layout_image("RGB", np.uint8), overwrite=False)
    assert (tmp_path / "x.png").read_bytes() == b"keep me"
    write_image(tmp_path / "new.png", layout_image("RGB", np.uint8), overwrite=False)
    assert read_image(tmp_path / "new.png").pixels.shape == (12, 17, 3)


def test_a_missing_output_folder_is_a_one_line_error(tmp_path):
    with pytest.raises(ImageWriteError, match=r"out\.png: folder .*nope does not exist"):
        write_image(tmp_path / "nope" / "out.png", layout_image("RGB", np.uint8))


def test_a_folder_we_may_not_write_is_a_one_line_error(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    from mitdenoise import files

    monkeypatch.setattr(files.tempfile, "mkstemp", refuse)
    with pytest.raises(ImageWriteError, match=r"out\.png: permission denied$"):
        write_image(tmp_path / "out.png", layout_image("RGB", np.uint8))


def test_an_encoder_failure_leaves_the_old_target_and_no_temp_file(tmp_path, monkeypatch):
    (tmp_path / "x.png").write_bytes(b"old")

    def explode(path, image, f):
        f.write(b"half an image")
        raise OSError("encoder exploded")

    monkeypatch.setitem(imageio._ENCODERS, ".png", explode)
    with pytest.raises(ImageWriteError, match=r"x\.png: encoder exploded"):
        write_image(tmp_path / "x.png", layout_image("RGB", np.uint8))
    assert [p.name for p in tmp_path.iterdir()] == ["x.png"] and (tmp_path / "x.png").read_bytes() == b"old"


def test_a_failure_after_the_temp_file_is_written_removes_it_and_leaves_the_target(tmp_path, monkeypatch):
    (tmp_path / "x.tif").write_bytes(b"old")
    seen = []

    def disk_full(src, dst):
        seen.append(Path(src).name)
        assert Path(src).read_bytes()[:2] == b"II"  # the whole new file was there, beside the target
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(imageio.os, "replace", disk_full)
    with pytest.raises(ImageWriteError, match=r"x\.tif: no space left on device"):
        write_image(tmp_path / "x.tif", layout_image("RGB", np.uint8))
    assert seen[0].startswith(".x.tif.") and seen[0].endswith(".tmp")
    assert [p.name for p in tmp_path.iterdir()] == ["x.tif"] and (tmp_path / "x.tif").read_bytes() == b"old"


def test_written_files_get_the_usual_permissions_not_the_temp_files(tmp_path):
    write_image(tmp_path / "x.png", layout_image("RGB", np.uint8))
    from mitdenoise import files

    assert (tmp_path / "x.png").stat().st_mode & 0o777 == 0o666 & ~files._UMASK


# ---------------------------------------------------------------- float conversion


def test_to_float_and_back_is_exact_for_every_8_and_16bit_value():
    for dtype in (np.uint8, np.uint16):
        values = np.arange(np.iinfo(dtype).max + 1, dtype=dtype)
        as_float = to_float(values)
        assert as_float.dtype == np.float32 and as_float.min() == 0 and as_float.max() == 1
        assert np.array_equal(from_float(as_float, dtype), values)


def test_from_float_clips_and_rounds_to_nearest():
    x = np.array([-1.0, 0.0, 0.5 / 255 - 1e-4, 0.5 / 255 + 1e-4, 0.5, 1.0, 7.0], np.float32)
    assert from_float(x, np.uint8).tolist() == [0, 0, 0, 1, 128, 255, 255]
    assert from_float(x, np.float32).tolist() == pytest.approx([0, 0, 0.5 / 255 - 1e-4, 0.5 / 255 + 1e-4, 0.5, 1, 1])
    floats = np.array([-3.0, 2.0], np.float32)
    assert to_float(floats) is floats  # floats are the caller's business, not rescaled


# ---------------------------------------------------------------- property


LOSSLESS = {  # suffix -> (dtypes, alpha allowed)
    ".png": ((np.uint8, np.uint16), True),
    ".tif": ((np.uint8, np.uint16), True),
    ".bmp": ((np.uint8,), False),
}


@st.composite
def lossless_cases(draw):
    suffix = draw(st.sampled_from(sorted(LOSSLESS)))
    dtypes, alpha_allowed = LOSSLESS[suffix]
    dtype = draw(st.sampled_from(dtypes))
    h, w = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    channels = draw(st.sampled_from([1, 3]))
    seed = draw(st.integers(0, 2**32 - 1))
    pixels = noise(h, w, channels, dtype, seed)
    alpha = noise(h, w, 1, dtype, seed + 1)[..., 0] if alpha_allowed and draw(st.booleans()) else None
    return suffix, Image(pixels, alpha)


@settings(max_examples=60, deadline=None)
@given(lossless_cases())
def test_lossless_round_trip_is_exact_for_any_shape_depth_and_alpha(case):
    suffix, image = case
    with tempfile.TemporaryDirectory() as folder:
        write_image(Path(folder) / f"x{suffix}", image)
        back = read_image(Path(folder) / f"x{suffix}")
    assert back.pixels.dtype == image.pixels.dtype and np.array_equal(back.pixels, image.pixels)
    assert (back.alpha is None) == (image.alpha is None)
    assert image.alpha is None or np.array_equal(back.alpha, image.alpha)


# Source files as other programs write them (Pillow modes), then read -> denoise -> write -> read.
# mode: (how to make it, the file suffix, channels, dtype and alpha expected after reading)
FOREIGN_MODES = {
    "L": (lambda a, rng: PILImage.fromarray(a[..., 0]), ".png", 1, np.uint8, False),
    "LA": (lambda a, rng: PILImage.fromarray(a[..., :2], "LA"), ".png", 1, np.uint8, True),
    "RGB": (lambda a, rng: PILImage.fromarray(a[..., :3]), ".png", 3, np.uint8, False),
    "RGBA": (lambda a, rng: PILImage.fromarray(a), ".tif", 3, np.uint8, True),
    "P": (lambda a, rng: PILImage.fromarray(a[..., :3]).quantize(16), ".png", 3, np.uint8, False),
    "CMYK": (lambda a, rng: PILImage.fromarray(a, "CMYK"), ".tif", 3, np.uint8, False),
    "I;16": (lambda a, rng: PILImage.fromarray(rng.integers(0, 65536, a.shape[:2], dtype=np.uint16)), ".png", 1, np.uint16, False),
    "F": (lambda a, rng: PILImage.fromarray(rng.random(a.shape[:2], dtype=np.float32)), ".tif", 1, np.float32, False),
}


@pytest.fixture(scope="module")
def tiny_denoiser():
    from mitdenoise import Denoiser
    from mitdenoise.model import ModelConfig, SwinIR

    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    return Denoiser(SwinIR(ModelConfig(embed_dim=12, depths=(2,), num_heads=(2,))), device="cpu")


@settings(max_examples=40, deadline=None)
@given(
    mode=st.sampled_from(sorted(FOREIGN_MODES)),
    h=st.integers(1, 40),
    w=st.integers(1, 40),
    out_suffix=st.sampled_from([".png", ".tif"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_any_mode_and_depth_survives_read_denoise_write(tiny_denoiser, mode, h, w, out_suffix, seed):
    make, suffix, channels, dtype, has_alpha = FOREIGN_MODES[mode]
    rng = np.random.default_rng(seed)
    source = make(rng.integers(0, 256, (h, w, 4), dtype=np.uint8), rng)
    with tempfile.TemporaryDirectory() as folder:
        src, dst = Path(folder) / f"in{suffix}", Path(folder) / f"out{out_suffix}"
        source.save(src)
        image = read_image(src)
        write_image(dst, tiny_denoiser.denoise_image(image))
        back = read_image(dst)
    # float is kept by TIFF; PNG holds it as 16-bit
    want = np.uint16 if dtype == np.float32 and out_suffix == ".png" else dtype
    assert image.pixels.shape == (h, w, channels) and image.pixels.dtype == dtype
    assert back.pixels.shape == (h, w, channels) and back.pixels.dtype == want
    assert (back.alpha is not None) == has_alpha
    if has_alpha:
        assert np.array_equal(back.alpha, image.alpha)


def test_image_files_lists_one_folder_or_a_tree_sorted_by_path_and_by_suffix_only(tmp_path):
    from mitdenoise.imageio import image_files

    for name in ("b.PNG", "a.jpg", "notes.txt", "sub/c.tif", "sub/deeper/d.webp"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "folder.png").mkdir()  # a folder with an image's name is not an image
    assert [p.relative_to(tmp_path).as_posix() for p in image_files(tmp_path)] == ["a.jpg", "b.PNG"]
    assert [p.relative_to(tmp_path).as_posix() for p in image_files(tmp_path, recursive=True)] == [
        "a.jpg", "b.PNG", "sub/c.tif", "sub/deeper/d.webp"]
