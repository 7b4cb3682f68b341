"""A small 16-bit PNG encoder: gray, gray + alpha, RGB and RGBA, with ICC profile and EXIF.

Neither Pillow (no 16-bit colour) nor OpenCV (no gray + alpha, no ICC) writes all four
layouts, so :mod:`mitdenoise.imageio` writes 16-bit PNG through this.
"""

from __future__ import annotations

import struct
import zlib
from typing import BinaryIO

import numpy as np


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def write_png16(
    f: BinaryIO, pixels: np.ndarray, alpha: np.ndarray | None, icc: bytes | None, exif: bytes | None
) -> None:
    """A 16-bit PNG of any of the four layouts, with iCCP and eXIf before the image data.

    Filtered and compressed in bands of rows, so memory stays at a band, not a copy of the image.
    """
    height, width, channels = pixels.shape[0], pixels.shape[1], pixels.shape[2] + (alpha is not None)
    colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    f.write(b"\x89PNG\r\n\x1a\n")
    f.write(_png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)))
    if icc:
        f.write(_png_chunk(b"iCCP", b"ICC Profile\0\0" + zlib.compress(icc)))
    if exif:
        f.write(_png_chunk(b"eXIf", exif.removeprefix(b"Exif\x00\x00")))
    compressor = zlib.compressobj(6)
    above = np.zeros(width * channels * 2, np.uint8)
    band = max(1, (8 << 20) // (width * channels * 2))
    for top in range(0, height, band):
        part = pixels[top : top + band]
        if alpha is not None:
            part = np.concatenate([part, alpha[top : top + band, :, None]], axis=2)
        rows = part.astype(">u2").view(np.uint8).reshape(len(part), width * channels * 2)
        # filter 2 ("Up", each byte minus the byte above): one numpy subtraction, and close
        # to libpng's adaptive filtering on photographs
        scanlines = np.empty((len(rows), rows.shape[1] + 1), np.uint8)
        scanlines[:, 0] = 2
        np.subtract(rows, np.concatenate([above[None], rows[:-1]]), out=scanlines[:, 1:])
        above = rows[-1].copy()
        _write_idat(f, compressor.compress(scanlines.tobytes()))
    _write_idat(f, compressor.flush())
    f.write(_png_chunk(b"IEND", b""))


def _write_idat(f: BinaryIO, data: bytes) -> None:
    if data:
        f.write(_png_chunk(b"IDAT", data))
