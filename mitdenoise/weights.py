"""Checkpoints: read the authors' .pth and our .safetensors safely, write safetensors.

A checkpoint of ours is a safetensors file of parameters whose metadata holds the
``ModelConfig`` as JSON under ``mitdenoise.config``. An authors'-format ``.pth`` is a
bare state dict: its config is read from tensor shapes (see
:func:`mitdenoise.model.config_from_state_dict`).
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from .errors import ModelLoadError
from .model import ModelConfig, SwinIR, config_from_state_dict, load_state_dict_into

CONFIG_KEY = "mitdenoise.config"
MAX_CHECKPOINT_BYTES = 2 * 1024**3
"""Refuse files over 2 GiB: the full network is 3.3 MB of parameters (16 MB with buffers)."""


def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], ModelConfig | None]:
    """Tensors of a checkpoint file and the config stored in it (None for a bare state dict)."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"model file not found: {path}" + ("" if path.exists() else " (give a path or a model name)"))
    size = path.stat().st_size
    if size > MAX_CHECKPOINT_BYTES:
        raise ModelLoadError(f"cannot load {path}: {size / 1024**3:.1f} GiB is over the 2 GiB limit for a checkpoint")
    if path.suffix.lower() == ".safetensors":
        return _read_safetensors(path)
    return _read_pickle(path), None


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], ModelConfig | None]:
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load {path}: not a valid safetensors file ({_first_line(e)})") from None
    config = None
    if CONFIG_KEY in metadata:
        try:
            config = ModelConfig.from_json(metadata[CONFIG_KEY])
        except (ValueError, TypeError) as e:
            raise ModelLoadError(f"cannot load {path}: bad config in metadata ({_first_line(e)})") from None
    return state, config


def _read_pickle(path: Path) -> dict[str, torch.Tensor]:
    """torch.load with weights_only=True: a pickle naming anything but tensors is refused unrun."""
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = _first_line(e)
        if "weights_only" in reason or "Unsupported global" in reason or "GLOBAL" in reason:
            reason = "it holds Python objects other than tensors, refused for safety"
        raise ModelLoadError(f"cannot load {path}: {reason}") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load {path}: not a PyTorch checkpoint ({_first_line(e)})") from None
    if isinstance(obj, dict):
        for wrapper in ("params_ema", "params", "state_dict", "model"):
            if wrapper in obj and isinstance(obj[wrapper], dict):
                obj = obj[wrapper]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelLoadError(f"cannot load {path}: not a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_model(
    path: str | os.PathLike, *, config: ModelConfig | None = None, **overrides
) -> SwinIR:
    """Build the network for a checkpoint file and load it (CPU, eval mode).

    The config comes from, in order: ``config``, the file's metadata, the tensor
    shapes; ``overrides`` (e.g. ``attn_mask_ratio``) replace single fields of it.
    """
    state, stored = read_state_dict(path)
    try:
        if config is None:
            config = stored or config_from_state_dict(state)
        if overrides:
            config = ModelConfig(**{**config.__dict__, **overrides})
        model = SwinIR(config)
        load_state_dict_into(model, state)
    except ValueError as e:
        raise ModelLoadError(f"cannot load {path}: {_first_line(e)}") from None
    return model.eval()


def save_safetensors(model: SwinIR, path: str | os.PathLike, *, dtype: torch.dtype = torch.float32) -> None:
    """Write the parameters and config, atomically (temp file + rename)."""
    path = Path(path)
    state = {
        k: v.detach().to("cpu", dtype).contiguous()
        for k, v in model.state_dict().items()
        if not k.endswith("relative_position_index")
    }
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        save_file(state, str(tmp), metadata={CONFIG_KEY: model.config.to_json(), "format": "pt"})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:200]


SHIPPED_DIRS = (Path(__file__).resolve().parent / "_shipped", Path(__file__).resolve().parent.parent / "weights")
"""Where the shipped checkpoint is: inside an installed wheel, or weights/ of a source tree."""
DEFAULT_MODEL = "mitdenoise"
"""Our own checkpoint, shipped in ``weights/`` so the tool works offline."""


def shipped_checkpoint() -> Path:
    candidates = [d / "mitdenoise-masked.safetensors" for d in SHIPPED_DIRS]
    return next((p for p in candidates if p.is_file()), candidates[-1])


def resolve_model(spec: str | os.PathLike | None) -> Path:
    """A local file for a model spec: None (the default), a registry name, or a path."""
    if spec is None or str(spec) == DEFAULT_MODEL:
        path = shipped_checkpoint()
        if not path.is_file():
            raise ModelLoadError(f"the shipped checkpoint {path} is missing: reinstall mitdenoise or pass --model PATH")
        return path
    return Path(spec)
