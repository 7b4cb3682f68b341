"""Read and write images without losing what the denoiser should not touch.

What comes through a read -> denoise -> write: bit depth (8-bit stays 8-bit, 16-bit
stays 16-bit, 32-bit float TIFF stays float), grayscale stays one channel, alpha is
split off and written back untouched, the ICC profile and the EXIF block are kept.
EXIF orientation is applied on read (pixels come upright) and reset to 1 on write,
so viewers don't rotate a second time.

Who decodes what, and why:
- Pillow reads everything it can hold: all 8-bit data, 16-bit grayscale (``I;16``),
  32-bit float grayscale (``F``). It also supplies the metadata (ICC, EXIF) for
  every file it can open, and its lazy ``open`` gives the size for the pixel limit
  before any decoding.
- OpenCV decodes 16-bit-per-channel colour PNG and TIFF (RGB, RGBA, gray + alpha):
  Pillow identifies those files but can only hand them over as 8-bit.
- tifffile reads the TIFFs Pillow cannot even identify (16-bit gray + alpha, float
  colour) and writes every TIFF, because it is the one writer that stores 16-bit and
  float colour together with an ICC profile.
- 16-bit PNG is written by the small encoder of :mod:`mitdenoise.png16`: neither Pillow (no 16-bit
  colour) nor OpenCV (no gray + alpha, no ICC) can write all four layouts.

Only the first frame of a multi-frame file (GIF, TIFF pages, animated PNG/WebP,
MPO) is read.
"""

from __future__ import annotations

import io
import os
import re
import struct
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image as PILImage
from PIL import ImageCms

from .errors import ImageReadError, ImageWriteError, first_line
from .files import write_atomically
from .png16 import write_png16

SUPPORTED_SUFFIXES: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp"})
"""Formats we write (and find in folders); reading goes by content and also takes GIF."""


def image_files(folder: str | os.PathLike, recursive: bool = False) -> list[Path]:
    """The files under ``folder`` with a suffix we read (:data:`SUPPORTED_SUFFIXES`), sorted by path:
    its own files, or with ``recursive`` those of every folder below it too."""
    found = Path(folder).rglob("*") if recursive else Path(folder).iterdir()
    return sorted(p for p in found if p.suffix.lower() in SUPPORTED_SUFFIXES and p.is_file())

_READABLE_FORMATS = ("PNG", "JPEG", "TIFF", "BMP", "WEBP", "GIF")  # JPEG includes MPO
_READABLE_NAMES = "PNG, JPEG, TIFF, BMP, WebP or GIF"
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")

JPEG_QUALITY = 95
WEBP_QUALITY = 95
# 4:2:0, what cameras and most encoders use; Pillow's number for it
JPEG_SUBSAMPLING = 2

_ORIENTATION_TAG = 0x0112
_ICC_TAG = 34675
_TIFFFILE_CODECS = ("NONE", "ADOBE_DEFLATE", "DEFLATE", "PACKBITS")
"""TIFF compressions tifffile decodes without imagecodecs; Pillow (libtiff) reads the rest."""

# mkstemp makes 0600 files; outputs should get the permissions any new file would get


@dataclass
class Image:
    """An image as the denoiser sees it, plus what must survive it untouched."""

    pixels: np.ndarray  # (H, W, C), C in {1, 3}; uint8, uint16 or float32; upright (EXIF orientation applied)
    alpha: np.ndarray | None = None  # (H, W), same dtype as pixels
    icc_profile: bytes | None = None
    exif: bytes | None = None  # the source's EXIF block, orientation already reset to 1


def set_max_pixels(n: int | None) -> None:
    """Raise or lower the decompression-bomb limit for every reader (None: no limit)."""
    if n is not None and n <= 0:
        raise ValueError(f"the pixel limit must be positive, got {n}")
    PILImage.MAX_IMAGE_PIXELS = n


# ---------------------------------------------------------------- pixel conversions


def to_float(pixels: np.ndarray, dtype=np.float32) -> np.ndarray:
    """uint8/uint16 -> floats in [0, 1] of ``dtype`` (float32 or float64); float pixels as they
    are, or cast to ``dtype`` (their range is the caller's business)."""
    if pixels.dtype == np.uint8:
        return np.divide(pixels, 255, dtype=dtype)
    if pixels.dtype == np.uint16:
        return np.divide(pixels, 65535, dtype=dtype)
    if pixels.dtype in (np.float32, np.float64):
        return pixels if pixels.dtype == dtype else pixels.astype(dtype)
    raise ValueError(f"expected uint8, uint16, float32 or float64 pixels, got {pixels.dtype}")


def from_float(x: np.ndarray, dtype) -> np.ndarray:
    """float in [0, 1] -> ``dtype``, clipped and rounded half up (``floor(x * max + 0.5)`` in the
    precision of ``x``); float32 is only clipped."""
    dtype = np.dtype(dtype)
    x = np.clip(x, 0.0, 1.0)
    if dtype == np.float32:
        return x.astype(np.float32, copy=False)
    if dtype == np.uint8 or dtype == np.uint16:
        scale = np.float32(np.iinfo(dtype).max)
        return np.floor(x * scale + np.float32(0.5)).astype(dtype)
    raise ValueError(f"expected uint8, uint16 or float32 as target dtype, got {dtype}")


def round_to_uint8(x: np.ndarray) -> np.ndarray:
    """float in [0, 1] -> uint8 with NumPy's rounding (half to even), as the authors' evaluation
    quantises; :func:`from_float` rounds half up, as the writers do."""
    return np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8)


def to_rgb8(pixels: np.ndarray) -> np.ndarray:
    """Any (H, W[, C]) image -> (H, W, 3) uint8 (grey repeated, alpha dropped, 16-bit and float rounded)."""
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    if pixels.shape[2] in (2, 4):
        pixels = pixels[..., :-1]
    if pixels.shape[2] == 1:
        pixels = np.repeat(pixels, 3, axis=2)
    if pixels.dtype != np.uint8:
        pixels = from_float(to_float(pixels, np.float64), np.uint8)
    return np.ascontiguousarray(pixels)


def read_rgb8(path: str | os.PathLike) -> np.ndarray:
    """An image file as (H, W, 3) uint8 RGB (see :func:`to_rgb8`), for scoring and training."""
    return to_rgb8(read_image(path).pixels)


def center_crop(pixels: np.ndarray, size: int | None) -> np.ndarray:
    """The central ``size`` x ``size`` part (or less, where the image is smaller); all of it for None."""
    if not size:
        return pixels
    h, w = pixels.shape[:2]
    top, left = max(0, (h - size) // 2), max(0, (w - size) // 2)
    return pixels[top : top + size, left : left + size]


# ---------------------------------------------------------------- reading


def read_image(path: str | os.PathLike) -> Image:
    """Decode the first frame fully (so truncation shows up here), upright, with its metadata.

    Colour models other than RGB and gray are converted: palette -> RGB (RGBA with
    transparency), 1-bit -> gray, CMYK -> RGB (through the embedded CMYK profile when
    there is one, then tagged sRGB; otherwise Pillow's plain formula, untagged).
    32-bit integer gray is accepted only when its values fit 16 bits.
    """
    path = Path(path)
    _check_is_readable_file(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", PILImage.DecompressionBombWarning)
            # Pillow checks the pixel limit in open(), from the header, before any decoding
            with PILImage.open(path, formats=_READABLE_FORMATS) as im:
                image = _read_tiff_with_tifffile(path, fallback=True) if im.format == "TIFF" else None
                image = image or _read_opened(path, im)
    except (PILImage.DecompressionBombError, PILImage.DecompressionBombWarning) as e:
        found = re.search(r"(\d+) pixels", str(e))
        raise ImageReadError(_too_many_pixels(path, int(found.group(1)) if found else None)) from None
    except PILImage.UnidentifiedImageError:
        if _starts_like_tiff(path):
            return _checked(path, _read_tiff_with_tifffile(path))
        raise ImageReadError(f"cannot read {path}: not a {_READABLE_NAMES} image") from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error) as e:
        raise ImageReadError(f"cannot read {path}: {_decode_failure(e)}") from None
    return _checked(path, image)


def _checked(path: Path, image: Image) -> Image:
    """Refuse what would crash the network or poison every output pixel (one NaN spreads through attention)."""
    height, width = image.pixels.shape[:2]
    if height == 0 or width == 0:
        raise ImageReadError(f"cannot read {path}: the image has no pixels ({width}x{height})")
    if image.pixels.dtype == np.float32:
        bad = int(np.count_nonzero(~np.isfinite(image.pixels)))
        if bad:
            raise ImageReadError(f"cannot read {path}: {bad} sample(s) are NaN or infinite")
    return image


def _check_is_readable_file(path: Path) -> None:
    if not path.exists():
        raise ImageReadError(f"cannot read {path}: no such file")
    if path.is_dir():
        raise ImageReadError(f"cannot read {path}: it is a folder, not an image file")
    if not path.is_file():
        raise ImageReadError(f"cannot read {path}: not a regular file")
    if path.stat().st_size == 0:
        raise ImageReadError(f"cannot read {path}: the file is empty")


def _check_pixel_limit(path: Path, width: int, height: int) -> None:
    limit = PILImage.MAX_IMAGE_PIXELS
    if limit is not None and width * height > limit:
        raise ImageReadError(_too_many_pixels(path, width * height))


def _too_many_pixels(path: Path, pixels: int | None) -> str:
    size = f"{pixels} pixels" if pixels is not None else "too many pixels"
    return f"cannot read {path}: image has {size}, over the limit of {PILImage.MAX_IMAGE_PIXELS}; pass --max-pixels to raise it"


def _decode_failure(e: Exception) -> str:
    message = first_line(e)
    if "truncated" in message.lower():
        return "truncated image file"
    return f"corrupt image data ({message})"


def _starts_like_tiff(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) in _TIFF_MAGIC


def _read_opened(path: Path, im: PILImage.Image) -> Image:
    # decide before touching EXIF: a PNG whose eXIf chunk follows the image data is
    # decoded by getexif(), which also drops the raw-mode information looked at here
    deep_colour = _is_16bit_colour(im)
    if deep_colour:
        pixels, alpha = _decode_16bit_colour_with_cv2(path, im)
    else:
        im.load()
    # OpenCV has already turned a TIFF upright (tifffile reads TIFFs first; this is one whose codec it lacks)
    orientation = 1 if deep_colour and im.format == "TIFF" else _orientation(im)
    icc = im.info.get("icc_profile") or None
    exif = _exif_upright(im.info.get("exif"))
    if not deep_colour:
        pixels, alpha, icc = _pixels_from_pillow(path, im, icc)
    pixels, alpha = _apply_orientation(pixels, alpha, orientation)
    return Image(pixels, alpha, icc, exif)


def _rawmode(im: PILImage.Image) -> str:
    """How the file stores its samples, e.g. 'RGB;16B' (PNG keeps it as a string, TIFF first in a tuple)."""
    if not im.tile:
        return ""
    args = im.tile[0][3]
    rawmode = args if isinstance(args, str) else args[0] if args else ""
    return rawmode if isinstance(rawmode, str) else ""


def _is_16bit_colour(im: PILImage.Image) -> bool:
    """Pillow reports 16-bit colour PNG/TIFF as RGB(A) with a ';16' raw mode (gray + alpha as 'LA;16')."""
    return im.mode in ("RGB", "RGBA", "LA") and ";16" in _rawmode(im)


def _decode_16bit_colour_with_cv2(path: Path, im: PILImage.Image) -> tuple[np.ndarray, np.ndarray | None]:
    import cv2

    gray = _rawmode(im).startswith("LA")
    try:
        decoded = cv2.imdecode(np.fromfile(path, np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error:  # e.g. a header over OpenCV's size limits
        decoded = None
    width, height = im.size
    if decoded is None or decoded.dtype != np.uint16 or decoded.ndim != 3 or decoded.shape[:2] != (height, width):
        raise ImageReadError(f"cannot read {path}: truncated or corrupt 16-bit image data")
    alpha = decoded[..., 3].copy() if decoded.shape[2] == 4 else None
    if gray:  # OpenCV expands gray + alpha to BGRA
        return decoded[..., :1].copy(), alpha
    return np.ascontiguousarray(decoded[..., 2::-1]), alpha


def _pixels_from_pillow(path: Path, im: PILImage.Image, icc: bytes | None):
    """Pillow's decoded frame -> (pixels, alpha, icc), in the layouts the denoiser takes."""
    mode = im.mode
    if mode in ("P", "PA"):
        im = im.convert("RGBA" if mode == "PA" or "transparency" in im.info else "RGB")
    elif mode == "1":
        im = im.convert("L")
    elif mode == "CMYK":
        im, icc = _cmyk_to_rgb(im, icc)
    elif mode in ("La", "RGBa"):  # premultiplied; the denoiser wants straight alpha
        im = im.convert(mode.upper())
    elif mode == "RGBX":
        im = im.convert("RGB")
    elif mode in ("YCbCr", "LAB", "HSV"):
        im, icc = im.convert("RGB"), None  # the profile described the old colour space

    array = _as_array(im)
    if im.mode.startswith("I"):
        array = _as_uint16(path, array)
    elif im.mode == "F":
        array = array.astype(np.float32, copy=False)
    elif array.dtype != np.uint8:
        raise ImageReadError(f"cannot read {path}: unsupported pixel layout {im.mode}")
    if array.ndim == 2:
        array = array[..., None]

    if array.shape[2] in (2, 4):
        return np.ascontiguousarray(array[..., :-1]), array[..., -1].copy(), icc
    transparency = im.info.get("transparency")
    if im.mode in ("L", "RGB") or im.mode.startswith("I"):
        return array, _alpha_from_colour_key(array, transparency), icc
    return array, None, icc


def _as_array(im: PILImage.Image, band_bytes: int = 16 << 20) -> np.ndarray:
    """``np.asarray(im)``, copied band by band.

    Pillow's own conversion goes through one ``tobytes()`` of the whole frame, a
    transient second copy of the image (432 MB more at 12000x12000 RGB).
    """
    width, height = im.size
    rows = max(1, band_bytes // max(1, width * 4 * len(im.getbands())))
    first = np.asarray(im.crop((0, 0, width, min(rows, height))))
    if rows >= height:
        return first
    array = np.empty((height, *first.shape[1:]), first.dtype)
    array[:rows] = first
    for top in range(rows, height, rows):
        array[top : top + rows] = np.asarray(im.crop((0, top, width, min(top + rows, height))))
    return array


def _as_uint16(path: Path, array: np.ndarray) -> np.ndarray:
    if array.dtype.kind == "u" and array.dtype.itemsize == 2:  # I;16 in either byte order
        return array.astype(np.uint16)
    if array.size and (array.min() < 0 or array.max() > 65535):
        raise ImageReadError(  # Pillow widens 16-bit signed and 32-bit samples alike to int32
            f"cannot read {path}: integer pixels (range {array.min()}..{array.max()}) do not fit unsigned "
            "16 bits (0..65535); convert them to unsigned 16-bit or float32 first"
        )
    return array.astype(np.uint16)


def _alpha_from_colour_key(array: np.ndarray, transparency) -> np.ndarray | None:
    """PNG/GIF 'this colour is transparent' (tRNS without a palette) -> an explicit alpha plane."""
    if transparency is None or isinstance(transparency, bytes):
        return None
    key = np.atleast_1d(np.asarray(transparency))
    if key.size != array.shape[2]:
        return None
    opaque = np.iinfo(array.dtype).max
    return np.where(np.all(array == key, axis=2), 0, opaque).astype(array.dtype)


def _cmyk_to_rgb(im: PILImage.Image, icc: bytes | None):
    if icc:
        try:
            srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
            source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            converted = ImageCms.profileToProfile(im, source, srgb, outputMode="RGB")
            return converted, srgb.tobytes()
        except (ImageCms.PyCMSError, OSError, ValueError):
            pass  # a broken profile: fall back to the plain conversion below
    return im.convert("RGB"), None


def _orientation(im: PILImage.Image) -> int:
    """EXIF orientation 1..8; anything unreadable or out of range counts as 1 (upright)."""
    try:
        value = im.getexif().get(_ORIENTATION_TAG, 1)
    except Exception:  # Pillow raises many kinds on broken EXIF; an upright image is the safe reading
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _exif_upright(raw: bytes | None) -> bytes | None:
    """The EXIF block with orientation set to 1 (the pixels we return are already upright)."""
    if not raw:
        return None
    try:
        exif = PILImage.Exif()
        exif.load(raw)
        if _ORIENTATION_TAG in exif:
            exif[_ORIENTATION_TAG] = 1
        return exif.tobytes()
    except Exception:  # unparseable EXIF is dropped rather than failing the read
        return None


def _apply_orientation(pixels: np.ndarray, alpha: np.ndarray | None, orientation: int):
    """Same transforms as PIL.ImageOps.exif_transpose, on (H, W, ...) arrays."""

    def upright(a: np.ndarray) -> np.ndarray:
        if orientation == 2:
            a = a[:, ::-1]
        elif orientation == 3:
            a = a[::-1, ::-1]
        elif orientation == 4:
            a = a[::-1]
        elif orientation == 5:
            a = a.swapaxes(0, 1)
        elif orientation == 6:
            a = np.rot90(a, -1)
        elif orientation == 7:
            a = a[::-1, ::-1].swapaxes(0, 1)
        elif orientation == 8:
            a = np.rot90(a, 1)
        return np.ascontiguousarray(a)

    if orientation == 1:
        return pixels, alpha
    return upright(pixels), None if alpha is None else upright(alpha)


def _read_tiff_with_tifffile(path: Path, fallback: bool = False) -> Image | None:
    """Gray or RGB TIFFs of 8, 16 or float32 samples, any + alpha, chunky or planar.

    Pillow can't open some of these (16-bit gray + alpha, float colour) and misreads
    others (planar 16-bit colour, 8- and 16-bit gray with a rotating orientation), and
    OpenCV applies a TIFF's orientation itself. With ``fallback``, None for what this
    doesn't read (other colour models, codecs tifffile lacks) so that Pillow gets it.
    """
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            height, width = page.imagelength, page.imagewidth
            _check_pixel_limit(path, width, height)
            samples = page.samplesperpixel
            colour = {tifffile.PHOTOMETRIC.MINISBLACK: 1, tifffile.PHOTOMETRIC.RGB: 3}.get(page.photometric)
            if colour is not None and samples > colour + 1:  # Pillow would drop the extra samples unsaid
                raise ImageReadError(
                    f"cannot read {path}: {samples} samples per pixel ({page.photometric.name} and "
                    f"{samples - colour} extra); gray or RGB with at most one alpha are supported"
                )
            if colour is None or samples not in (colour, colour + 1) or page.dtype not in (np.uint8, np.uint16, np.float32):
                if fallback:
                    return None
                raise ImageReadError(
                    f"cannot read {path}: unsupported TIFF layout ({page.photometric.name}, "
                    f"{samples} samples of {page.dtype})"
                )
            if fallback and page.compression.name not in _TIFFFILE_CODECS:
                return None
            array = page.asarray()
            if page.planarconfig == tifffile.PLANARCONFIG.SEPARATE and array.ndim == 3:
                array = np.moveaxis(array, 0, -1)
            array = array.reshape(height, width, samples)
            orientation = page.tags.valueof(274, 1)
            icc = page.tags.valueof(_ICC_TAG)
    except ImageReadError:
        raise
    except Exception as e:  # tifffile's errors have no common base; every one of them means "can't decode"
        raise ImageReadError(f"cannot read {path}: {_decode_failure(e)}") from None
    orientation = orientation if isinstance(orientation, int) and 1 <= orientation <= 8 else 1
    pixels = np.ascontiguousarray(array[..., :colour])
    alpha = array[..., colour].copy() if samples > colour else None
    pixels, alpha = _apply_orientation(pixels, alpha, orientation)
    return Image(pixels, alpha, bytes(icc) if icc else None)


# ---------------------------------------------------------------- writing


def write_image(path: str | os.PathLike, image: Image, *, overwrite: bool = True) -> None:
    """Encode by the file extension, then replace the target in one step (never a partial file).

    Per format: PNG lossless (8- or 16-bit; float -> 16-bit); TIFF lossless (deflate),
    keeps 8-bit, 16-bit and float32; JPEG quality 95, 4:2:0 chroma; WebP lossy quality
    95 with exact alpha; BMP plain. JPEG, WebP and BMP hold 8 bits only, so deeper
    images are rounded to 8 bits there. JPEG and BMP cannot hold alpha: refused rather
    than silently dropped. WebP has no grayscale, so gray is stored as RGB. BMP
    keeps no ICC profile, TIFF no EXIF.
    """
    path = Path(path)
    check_writable(path, image)
    encode = _ENCODERS[path.suffix.lower()]
    _check_layout(image)
    if not overwrite and path.exists():
        raise ImageWriteError(f"cannot write {path}: it already exists")
    _write_atomically(path, lambda f: encode(path, image, f))


def check_writable(path: str | os.PathLike, image: Image) -> None:
    """What :func:`write_image` would refuse for this path and image, found before any work on it."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in _ENCODERS:
        raise ImageWriteError(
            f"cannot write {path}: unknown image format {suffix or '(no extension)'}; "
            f"use one of {', '.join(sorted(SUPPORTED_SUFFIXES))}"
        )
    if image.alpha is not None and suffix in _NO_ALPHA:
        raise ImageWriteError(
            f"cannot write {path}: {_NO_ALPHA[suffix]} cannot store the alpha channel; write .png or .tif"
        )


def _check_layout(image: Image) -> None:
    """Programming errors, not user errors: the denoiser never builds such an image."""
    pixels, alpha = image.pixels, image.alpha
    if pixels.ndim != 3 or pixels.shape[2] not in (1, 3):
        raise ValueError(f"expected (H, W, 1|3) pixels, got shape {pixels.shape}")
    if pixels.dtype not in (np.uint8, np.uint16, np.float32):
        raise ValueError(f"expected uint8, uint16 or float32 pixels, got {pixels.dtype}")
    if alpha is not None and (alpha.shape != pixels.shape[:2] or alpha.dtype != pixels.dtype):
        raise ValueError(f"alpha must be {pixels.shape[:2]} {pixels.dtype}, got {alpha.shape} {alpha.dtype}")


def _write_atomically(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """:func:`mitdenoise.files.write_atomically` with the encoder writing straight into the
    temporary file (no second copy of the encoded image in memory); failures as
    :class:`ImageWriteError`."""

    def encode(temp: Path) -> None:
        with open(temp, "wb") as f:  # by name, not fd: tifffile wants f.name to be a path
            write(f)

    try:
        write_atomically(path, encode)
    except FileNotFoundError:
        if not path.parent.is_dir():
            raise ImageWriteError(f"cannot write {path}: folder {path.parent} does not exist") from None
        raise ImageWriteError(f"cannot write {path}: no such file or directory") from None
    except (OSError, ValueError) as e:
        if isinstance(e, OSError) and e.errno is not None:
            raise ImageWriteError(f"cannot write {path}: {_os_reason(e)}") from None
        raise ImageWriteError(f"cannot write {path}: {first_line(e)}") from None  # the encoder's complaint


def blocked_folder(folder: str | os.PathLike) -> Path | None:
    """Where making or writing into ``folder`` would fail: its nearest existing ancestor (or itself)
    when that is not a folder we may write to; None when the way is clear."""
    folder = Path(folder).absolute()
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    return None if existing.is_dir() and os.access(existing, os.W_OK | os.X_OK) else existing


def _os_reason(e: OSError) -> str:
    return (e.strerror or str(e)).lower()


def _pil_frame(pixels: np.ndarray, alpha: np.ndarray | None) -> PILImage.Image:
    """uint8 (H, W, 1|3) + alpha -> a Pillow L, LA, RGB or RGBA image."""
    planes = pixels if alpha is None else np.concatenate([pixels, alpha[..., None]], axis=2)
    return PILImage.fromarray(planes[..., 0] if planes.shape[2] == 1 else planes)


def _to_8bit(image: Image) -> tuple[np.ndarray, np.ndarray | None]:
    def convert(a: np.ndarray) -> np.ndarray:
        return a if a.dtype == np.uint8 else from_float(to_float(a), np.uint8)

    return convert(image.pixels), None if image.alpha is None else convert(image.alpha)


def _pil_save(f: BinaryIO, frame: PILImage.Image, format_name: str, **options) -> None:
    frame.save(_CheckedWrites(f), format_name, **{k: v for k, v in options.items() if v is not None})


class _CheckedWrites:
    """A file that hides its descriptor from Pillow.

    Given a descriptor, Pillow's JPEG encoder writes to it from C and misses a short
    write: on a full disk it left a truncated JPEG and reported success (measured,
    RLIMIT_FSIZE of 4 KiB). Without one, every byte goes through Python's writes,
    which raise on a full disk.
    """

    def __init__(self, f: BinaryIO) -> None:
        self._f = f

    def write(self, data) -> int:
        return self._f.write(data)

    def tell(self) -> int:
        return self._f.tell()

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._f.seek(offset, whence)

    def flush(self) -> None:
        self._f.flush()

    def fileno(self) -> int:
        raise io.UnsupportedOperation("fileno")


def _encode_png(path: Path, image: Image, f: BinaryIO) -> None:
    if image.pixels.dtype == np.uint8:
        frame = _pil_frame(image.pixels, image.alpha)
        _pil_save(f, frame, "PNG", icc_profile=image.icc_profile, exif=image.exif)
        return
    pixels, alpha = image.pixels, image.alpha
    if pixels.dtype == np.float32:
        pixels = from_float(pixels, np.uint16)
        alpha = None if alpha is None else from_float(alpha, np.uint16)
    write_png16(f, pixels, alpha, image.icc_profile, image.exif)


def _encode_jpeg(path: Path, image: Image, f: BinaryIO) -> None:
    pixels, _ = _to_8bit(image)
    _pil_save(
        f, _pil_frame(pixels, None), "JPEG",
        quality=JPEG_QUALITY, subsampling=JPEG_SUBSAMPLING, icc_profile=image.icc_profile, exif=image.exif,
    )


def _encode_webp(path: Path, image: Image, f: BinaryIO) -> None:
    pixels, alpha = _to_8bit(image)
    icc = image.icc_profile
    if pixels.shape[2] == 1:  # WebP has no grayscale
        pixels = np.repeat(pixels, 3, axis=2)
        if icc and icc[16:20] == b"GRAY":
            icc = None  # a gray profile is invalid on RGB data
    _pil_save(
        f, _pil_frame(pixels, alpha), "WEBP",
        quality=WEBP_QUALITY, exact=True, icc_profile=icc, exif=image.exif,
    )


def _encode_bmp(path: Path, image: Image, f: BinaryIO) -> None:
    pixels, _ = _to_8bit(image)
    _pil_save(f, _pil_frame(pixels, None), "BMP")


def _encode_tiff(path: Path, image: Image, f: BinaryIO) -> None:
    import tifffile

    pixels, alpha = image.pixels, image.alpha
    planes = pixels if alpha is None else np.concatenate([pixels, alpha[..., None]], axis=2)
    if planes.shape[2] == 1:
        planes = planes[..., 0]
    tifffile.imwrite(
        f,
        planes,
        photometric="minisblack" if pixels.shape[2] == 1 else "rgb",
        extrasamples=["unassalpha"] if alpha is not None else None,
        compression="zlib",
        # horizontal differencing shrinks integer photos a lot; the float predictor needs imagecodecs
        predictor=pixels.dtype != np.float32,
        iccprofile=image.icc_profile,
        metadata=None,
    )


_NO_ALPHA = {".jpg": "JPEG", ".jpeg": "JPEG", ".bmp": "BMP"}

_ENCODERS = {
    ".png": _encode_png,
    ".jpg": _encode_jpeg,
    ".jpeg": _encode_jpeg,
    ".tif": _encode_tiff,
    ".tiff": _encode_tiff,
    ".bmp": _encode_bmp,
    ".webp": _encode_webp,
}
