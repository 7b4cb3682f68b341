"""The library entry point: ``Denoiser`` turns a checkpoint into a function on images."""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
import torch

from . import imageio
from .adaptive import keep_share_of_change
from .checkpoints import load_model, read_validation
from .defaults import DEFAULT_OVERLAP, DEFAULT_TILE
from .devices import pick_device, pick_precision
from .errors import ModelLoadError
from .model import SwinIR
from .registry import DownloadProgress, resolve
from .tiling import count_tiles, denoise_tiled, denoise_tiled_on_device

FLOAT_ROWS_AT_ONCE = 256
"""Rows converted from float at a time where a whole image is converted."""

MALLOC_KEEP_BYTES = 192 << 20
MALLOC_HEAP_UP_TO_BYTES = 96 << 20


def keep_freed_buffers_for_reuse() -> bool:
    """On glibc, stop malloc from handing freed tile-sized buffers back to the kernel.

    By default glibc returns freed blocks above its adaptive mmap threshold to the
    OS, so each layer's next output page-faults in afresh. Blocks up to 96 MB (a
    576x576 tile's activations) now come from the heap and up to 192 MB of free heap
    is kept, so the next layer and tile reuse them; image-sized buffers still go
    straight back. Process-wide. True where applied.
    """
    import ctypes
    import ctypes.util

    if os.name != "posix" or not (ctypes.util.find_library("c") or "").startswith("libc.so"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_trim_threshold, MALLOC_KEEP_BYTES)) and bool(
            libc.mallopt(m_mmap_threshold, MALLOC_HEAP_UP_TO_BYTES)
        )
    except (OSError, AttributeError):
        return False


def _with_config(model: SwinIR, **changes) -> SwinIR:
    """A copy of ``model`` with config fields changed (run-time ones, such as the attention mask)."""
    net = SwinIR(type(model.config)(**{**model.config.__dict__, **changes}))
    net.load_state_dict(model.state_dict())
    return net


class Denoiser:
    """Denoise images with a SwinIR checkpoint (masked-training or baseline), tile by tile.

    >>> d = Denoiser()        # or a registry name, an hf:// file, a path, or a SwinIR
    >>> clean = d(noisy)      # NumPy (H, W[, C]) uint8/uint16/float32, or a PIL image
    >>> d.model_name, d.notice

    Without a model it runs the default, the authors' masked checkpoint (from the cache, else
    downloaded now); where that can't be had it runs the shipped fallback, ``mitdenoise-auto``, and
    says so in ``notice`` (None otherwise). ``mitdenoise-auto`` is a route over two shipped
    networks (:mod:`mitdenoise.adaptive`): each image's noise is read first, and ``last_plan``
    says what was read and what ran. ``offline=True`` never opens a connection: the cache or the
    fallback, and a named model that is not here already is an error. ``model_name`` is the
    registry name, hf:// address or path that ran (None for a network passed in).

    A masked model keeps its attention mask on (the method needs it at inference); ``seed``
    makes its draws reproducible, ``passes`` averages that many independent draws. A model
    without the mask is deterministic, so it runs one pass whatever ``passes`` says.
    ``attn_mask_ratio`` overrides the checkpoint's ratio (percent; 0 switches it off).
    ``strength`` scales the change the model (or route) makes: ``input + strength * (denoised - input)``;
    0 returns the input unchanged, 1 the model's full effect. Below 1 it keeps some of the
    input's grain and detail, which suits light noise (camera photos at low ISO) that a model
    trained at one noise level over-smooths.
    ``validation`` is what training recorded about the checkpoint's quality, if anything
    (see :func:`mitdenoise.checkpoints.read_validation`). ``on_download`` hears how a download
    of the model goes (:data:`mitdenoise.registry.DownloadProgress`); the library itself
    shows nothing and logs the finished download (logger ``mitdenoise.registry``).
    """

    def __init__(
        self,
        model: str | os.PathLike | SwinIR | None = None,
        *,
        offline: bool = False,
        device: str = "auto",
        precision: str = "auto",
        tile: int = DEFAULT_TILE,
        tile_overlap: int = DEFAULT_OVERLAP,
        batch_size: int = 1,
        passes: int = 1,
        seed: int = 0,
        attn_mask_ratio: int | None = None,
        strength: float = 1.0,
        on_download: DownloadProgress | None = None,
    ) -> None:
        if tile < 8 or tile_overlap < 0 or batch_size < 1 or passes < 1:
            raise ValueError("tile must be >= 8, tile_overlap >= 0, batch_size >= 1, passes >= 1")
        if not isinstance(strength, (int, float)) or not 0 <= strength <= 1:
            raise ValueError(f"strength must be a number from 0 to 1, not {strength!r}")
        self.device = pick_device(device)
        precision = pick_precision(precision, self.device)
        if self.device.type == "cpu":
            keep_freed_buffers_for_reuse()
        overrides = {} if attn_mask_ratio is None else {"attn_mask_ratio": (attn_mask_ratio, attn_mask_ratio)}
        roles = None  # the networks of a route over several (registry.PIPELINES), by role
        self.validation = None
        if isinstance(model, SwinIR):
            net = model if not overrides else _with_config(model, **overrides)
            self.model_name, self.notice = None, None
        else:
            resolved = resolve(model, offline=offline, on_download=on_download)
            self.model_name, self.notice = resolved.name, resolved.notice
            if resolved.path is None:
                roles = {role: load_model(path) for role, path in resolved.networks.items()}
                net = roles["camera"]  # what config, count_tiles and the tile plan describe
            else:
                net = load_model(resolved.path, **overrides)
                self.validation = read_validation(resolved.path)
        self.model = net.to(self.device).eval()
        self.config = net.config
        self.precision = precision
        self.tile = tile
        self.tile_overlap = tile_overlap
        self.batch_size = batch_size
        self.passes = passes if net.config.mask_enabled else 1
        self.strength = float(strength)
        self.seed = seed
        self._generator = torch.Generator(device=self.device)
        self.last_plan = None
        self._networks = None
        if roles is not None:
            options = dict(device=device, precision=precision, tile=tile, tile_overlap=tile_overlap,
                           batch_size=batch_size, seed=seed)
            self._networks = {role: Denoiser(role_net, **options) for role, role_net in roles.items()}

    def __call__(self, image):
        """Denoise a NumPy array or a PIL image; returns the same kind, size and depth."""
        try:
            from PIL import Image as PILImage
        except ImportError:  # pragma: no cover - pillow is a dependency
            PILImage = None
        if PILImage is not None and isinstance(image, PILImage.Image):
            return self._denoise_pil(image)
        array = np.asarray(image)
        if array.ndim == 2:
            return self.denoise_array(array[..., None])[..., 0]
        return self.denoise_array(array)

    def count_tiles(self, height: int, width: int) -> int:
        return count_tiles(height, width, self.tile, self.tile_overlap, self.config.window_size)

    def denoise_array(self, pixels: np.ndarray, on_tiles: Callable[[int], None] | None = None) -> np.ndarray:
        """(H, W, C) uint8, uint16 or float32 (C = 1 or 3) -> same shape and dtype, in range."""
        if pixels.ndim != 3 or pixels.shape[2] not in (1, 3):
            raise ValueError(f"expected an (H, W, 1|3) array, got shape {pixels.shape}")
        if pixels.dtype not in (np.uint8, np.uint16, np.float32):
            raise ValueError(f"expected uint8, uint16 or float32 pixels, got {pixels.dtype}")
        if pixels.shape[0] == 0 or pixels.shape[1] == 0:
            raise ValueError(f"the image has no pixels (shape {pixels.shape})")
        if self.strength == 0:
            return pixels.copy()
        if self._networks is not None:
            return self._denoise_adaptive(pixels, on_tiles)
        self._generator.manual_seed(self.seed)
        grid = dict(tile=self.tile, overlap=self.tile_overlap, window=self.config.window_size,
                    batch_size=self.batch_size, on_tiles=on_tiles)
        if self.device.type == "cuda":
            return denoise_tiled_on_device(pixels, self._run_tensor, device=self.device, **grid)
        return denoise_tiled(pixels, self._run_tiles, to_float=imageio.to_float, from_float=imageio.from_float, **grid)

    def _denoise_adaptive(self, pixels: np.ndarray, on_tiles: Callable[[int], None] | None) -> np.ndarray:
        """A route over several networks (:mod:`mitdenoise.adaptive`): read the noise, then run the plan."""
        from .adaptive import plan_image, run_plan

        x = imageio.to_float(pixels, np.float32)
        self.last_plan = plan = plan_image(x, {role: d.denoise_array for role, d in self._networks.items()})
        networks = {role: (lambda p, d=d: d.denoise_array(p, on_tiles)) for role, d in self._networks.items()}
        y = keep_share_of_change(x, run_plan(plan, x, networks, self.device), self.strength)
        out = np.empty(pixels.shape, pixels.dtype)
        for top in range(0, len(y), FLOAT_ROWS_AT_ONCE):  # the conversion's temporaries stay small
            out[top : top + FLOAT_ROWS_AT_ONCE] = imageio.from_float(y[top : top + FLOAT_ROWS_AT_ONCE], pixels.dtype)
        return out

    def denoise_image(self, image: imageio.Image, on_tiles: Callable[[int], None] | None = None) -> imageio.Image:
        """Denoise the colour channels; alpha and colour profile pass through untouched."""
        import dataclasses

        return dataclasses.replace(image, pixels=self.denoise_array(image.pixels, on_tiles))

    def _denoise_pil(self, image):
        """PIL in, PIL out: deep gray (I;16, I, F) keeps its depth; palette and CMYK become RGB(A)."""
        from PIL import Image as PILImage

        mode = image.mode
        if mode.startswith("I;16") or mode in ("I", "F"):
            array = np.asarray(image)
            if mode == "F":
                return PILImage.fromarray(self(array.astype(np.float32)), "F")
            if array.size and (array.min() < 0 or array.max() > 65535):
                raise ValueError(f"{mode} pixels outside 0..65535 are not supported")
            out = self(array.astype(np.uint16))
            return PILImage.fromarray(out) if mode.startswith("I;16") else PILImage.fromarray(out.astype(np.int32), "I")
        if mode in ("P", "PA"):
            image = image.convert("RGBA" if mode == "PA" or "transparency" in image.info else "RGB")
        has_alpha = image.mode in ("RGBA", "LA", "RGBa", "La")
        base = image.convert("L" if image.mode in ("L", "LA", "La", "1") else "RGB")
        result = PILImage.fromarray(self(np.asarray(base)), base.mode)
        if has_alpha:
            result.putalpha(image.getchannel("A"))
        return result

    def _run_tiles(self, batch: np.ndarray) -> np.ndarray:
        """(B, C, h, w) float32 in [0, 1] -> denoised, averaged over ``passes`` mask draws."""
        return self._run_tensor(torch.from_numpy(batch).to(self.device)).cpu().numpy()

    @torch.inference_mode()
    def _run_tensor(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`_run_tiles` for a float32 tensor on the device; the result stays there."""
        b, c = x.shape[:2]
        given = x
        model_c = self.config.in_chans
        if c == 1 and model_c == 3:
            x = x.expand(b, 3, *x.shape[2:])
        elif c == 3 and model_c == 1:
            x = x.reshape(b * 3, 1, *x.shape[2:])
        total = None
        for _ in range(self.passes):
            y = self._forward(x)
            total = y if total is None else total + y
        y = total / self.passes
        if not torch.isfinite(y).all():
            raise ModelLoadError("the model's output is NaN or infinite: the checkpoint's weights are broken")
        if c == 1 and model_c == 3:
            y = y.mean(dim=1, keepdim=True)
        elif c == 3 and model_c == 1:
            y = y.reshape(b, 3, *y.shape[2:])
        y = y.float()
        if self.strength != 1:
            y = keep_share_of_change(given.float(), y.clamp(0, 1), self.strength)
        return y

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.precision == "fp32":
            return self.model(x, generator=self._generator)
        if self.device.type == "cpu":  # bf16 products in the CPU route's linears, not autocast
            return self.model(x, generator=self._generator, matmul_dtype=torch.bfloat16)
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        state = self._generator.get_state()
        with torch.autocast(self.device.type, dtype=dtype):
            y = self.model(x, generator=self._generator).float()
        if self.precision == "fp16" and not torch.isfinite(y).all():
            # SwinIR features grow across RSTBs and can overflow fp16: redo this tile in fp32.
            self._generator.set_state(state)
            y = self.model(x, generator=self._generator)
        return y
