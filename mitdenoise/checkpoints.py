"""Checkpoint files: safe reading, building the network from them, writing and converting.

A checkpoint of ours is a safetensors file of parameters whose metadata holds the
``ModelConfig`` as JSON under ``mitdenoise.config``. An authors'-format ``.pth`` is a
bare state dict: its config is read from tensor shapes (see
:func:`mitdenoise.model.config_from_state_dict`), and what shapes can't tell (global
residual, attention-mask ratio) is given by the caller (the registry entry, or flags).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from .errors import ModelLoadError, first_line
from .files import write_atomically
from .model import ModelConfig, SwinIR, config_from_state_dict, load_state_dict_into

CONFIG_KEY = "mitdenoise.config"
SOURCE_KEY = "mitdenoise.source"
SOURCE_BLOB_KEY = "mitdenoise.source_git_blob"
VALIDATION_KEY = "mitdenoise.validation"
MAX_CHECKPOINT_BYTES = 2 * 1024**3
"""Refuse files over 2 GiB: the full network's parameters are a few MB."""
TRAIN_CHECKPOINT_NAME = "last.pt"
"""What ``mitdenoise train`` names the resumable checkpoint in a run folder."""
TRAIN_EXPORT_NAME = "ema.safetensors"
"""What ``mitdenoise train`` names the exported (EMA) weights in a run folder."""

# Fields that tensor shapes determine; a config (given or stored) must agree with them.
_SHAPE_FIELDS = ("in_chans", "embed_dim", "depths", "num_heads", "window_size", "mlp_ratio", "resi_connection",
                 "conv_first_kernel")


# --- reading and writing ------------------------------------------------------------------------


def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], ModelConfig | None]:
    """Tensors of a checkpoint file and the config stored in it (None for a bare state dict)."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"model file not found: {path}" + ("" if path.exists() else " (give a path or a model name)"))
    size = path.stat().st_size
    if size > MAX_CHECKPOINT_BYTES:
        raise ModelLoadError(
            f"cannot load {path}: {human_size(size)} is over the {human_size(MAX_CHECKPOINT_BYTES)} limit for a checkpoint"
        )
    if path.suffix.lower() == ".safetensors":
        return _read_safetensors(path)
    return _read_pickle(path), None


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], ModelConfig | None]:
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load {path}: not a valid safetensors file ({first_line(e)})") from None
    config = None
    if CONFIG_KEY in metadata:
        try:
            config = ModelConfig.from_json(metadata[CONFIG_KEY])
        except (ValueError, TypeError) as e:
            raise ModelLoadError(f"cannot load {path}: bad config in metadata ({first_line(e)})") from None
    return state, config


def _read_pickle(path: Path) -> dict[str, torch.Tensor]:
    """torch.load with weights_only=True: a pickle naming anything but tensors is refused unrun."""
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        named = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
        detail = re.search(r"WeightsUnpickler error:\s*(.+)", text)
        refused = "refused for safety, nothing in it was run"
        if named:
            reason = f"it names Python objects other than tensors ({named.group(1)}): {refused}"
        elif detail:
            reason = f"not a plain state dict ({detail.group(1).strip()}): {refused}"
        else:
            reason = f"not a PyTorch checkpoint ({first_line(e)})"
        raise ModelLoadError(f"cannot load {path}: {reason}") from None
    except Exception as e:  # noqa: BLE001 - the weights-only unpickler runs no code; any failure means garbage
        # (RuntimeError, EOFError, BadZipFile, ... and KeyError/IndexError from stray bytes read as opcodes)
        detail = first_line(e).split(". ")[0]
        detail = detail if detail == type(e).__name__ else f"{type(e).__name__}: {detail}"
        raise ModelLoadError(f"cannot load {path}: not a PyTorch checkpoint ({detail})") from None
    if isinstance(obj, dict):
        for wrapper in ("params_ema", "params", "state_dict", "model"):
            if wrapper in obj and isinstance(obj[wrapper], dict):
                obj = obj[wrapper]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelLoadError(f"cannot load {path}: not a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _build(state: dict[str, torch.Tensor], config: ModelConfig, origin: str) -> SwinIR:
    """The network for ``config`` with ``state`` loaded; ValueError if they don't fit.

    The config is checked against the shapes first, so that a file whose metadata
    lies (or a wrong ``config``) gets a clear message and never builds a huge network.
    ``origin`` says where the config came from, for that message.
    """
    actual = config_from_state_dict(state)
    for name in _SHAPE_FIELDS:
        want, got = getattr(config, name), getattr(actual, name)
        if want != got:
            raise ValueError(
                f"the config {origin} does not match the tensors ({name} {_show(want)} in the config, "
                f"{_show(got)} in the tensors)"
            )
    model = SwinIR(config)
    load_state_dict_into(model, state)
    return model.eval()


def load_model(
    path: str | os.PathLike, *, config: ModelConfig | None = None, **overrides
) -> SwinIR:
    """Build the network for a checkpoint file and load it (CPU, eval mode).

    The config comes from, in order: ``config``, the file's metadata, the tensor
    shapes; ``overrides`` (e.g. ``attn_mask_ratio``) replace single fields of it.
    """
    state, stored = read_state_dict(path)
    try:
        origin = "in its metadata" if config is None and stored is not None else "given"
        if config is None:
            config = stored or config_from_state_dict(state)
        if overrides:
            config = ModelConfig(**{**config.__dict__, **overrides})
        return _build(state, config, origin)
    except ValueError as e:
        raise ModelLoadError(f"cannot load {path}: {first_line(e)}") from None


def save_safetensors(
    model: SwinIR,
    path: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.float32,
    extra_metadata: dict[str, str] | None = None,
) -> None:
    """Write the parameters and config, atomically (temp file + rename)."""
    path = Path(path)
    state = {
        k: v.detach().to("cpu", dtype).contiguous()
        for k, v in model.state_dict().items()
        if not k.endswith("relative_position_index")
    }
    metadata = {**(extra_metadata or {}), CONFIG_KEY: model.config.to_json(), "format": "pt"}
    write_atomically(path, lambda temp: save_file(state, str(temp), metadata=metadata))


def read_validation(path: str | os.PathLike) -> dict | None:
    """The last validation ``mitdenoise train`` stored in a checkpoint's metadata, if any.

    ``{"iteration": N, "sets": {name: {"psnr": dB, "noisy_psnr": dB}}}``.
    """
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(VALIDATION_KEY)
        record = json.loads(raw) if raw else None
        return {
            "iteration": int(record["iteration"]),
            "sets": {
                str(name): {"psnr": float(scores["psnr"]), "noisy_psnr": float(scores["noisy_psnr"])}
                for name, scores in record["sets"].items()
            },
        }
    except (SafetensorError, OSError, ValueError, KeyError, TypeError, AttributeError):
        return None




def convert_checkpoint(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    config: ModelConfig | None = None,
    extra_metadata: dict[str, str] | None = None,
    **known,
) -> ModelConfig:
    """Write ``src`` (an authors' ``.pth`` or a safetensors file) as our safetensors checkpoint.

    The config comes from ``config``, else the file's metadata, else the shapes;
    ``known`` (``global_residual``, ``attn_mask_ratio``: what shapes can't tell)
    replaces those fields. Without ``extra_metadata``, a safetensors source's own metadata
    (its validation record, its source) is kept where the config stays the same: the
    record describes that model, not one with, say, another attention mask.
    Returns the config written into the metadata.
    """
    dst = Path(dst)
    if dst.suffix.lower() != ".safetensors":
        raise ValueError(f"the output {dst} must end in .safetensors")
    state, stored = read_state_dict(src)
    try:
        base = config or stored
        origin = "in its metadata" if config is None and stored is not None else "given"
        if base is None:
            config = config_from_state_dict(state, **known)
        else:
            config = dataclasses.replace(base, **known)
        model = _build(state, config, origin)
    except (ValueError, TypeError) as e:
        raise ModelLoadError(f"cannot convert {src}: {first_line(e)}") from None
    if extra_metadata is None and stored is not None and config == stored:
        with safe_open(str(src), framework="pt") as f:
            extra_metadata = {k: v for k, v in (f.metadata() or {}).items() if k.startswith("mitdenoise.")}
    try:
        save_safetensors(model, dst, extra_metadata=extra_metadata)
    except (OSError, SafetensorError) as e:
        raise ModelLoadError(f"cannot write {dst}: {first_line(e)}") from None
    return config


def git_blob_id(path: str | os.PathLike) -> str:
    """Git's id of a file's content: SHA-1 of ``b"blob <size>\\0" + content``."""
    path = Path(path)
    digest = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def human_size(n: int | None) -> str:
    """A byte count for people: '1.5 MiB' ('-' for None)."""
    if n is None:
        return "-"
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def _show(value) -> str:
    return str(list(value)) if isinstance(value, tuple) else str(value)

