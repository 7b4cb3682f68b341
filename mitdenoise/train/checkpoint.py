"""Resumable training checkpoints: plain containers of tensors, numbers and strings, so
``torch.load(weights_only=True)`` reads them, written atomically (temp file + rename)."""

from __future__ import annotations

import collections
import hashlib
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checkpoints import VALIDATION_KEY
from ..errors import TrainSetupError, first_line
from ..files import write_atomically

CHECKPOINT_FORMAT = "mitdenoise-train"
CHECKPOINT_VERSION = 1


def quality_metadata(validation: dict[str, float], iteration: int, val_sets: list) -> dict[str, str]:
    """The last validation, for the exported file's metadata: ``denoise`` warns when it shows harm."""
    sets = {
        v.name: {"psnr": validation[f"psnr_{v.name}"], "noisy_psnr": round(v.noisy_psnr, 4)}
        for v in val_sets
        if f"psnr_{v.name}" in validation
    }
    return {VALIDATION_KEY: json.dumps({"iteration": iteration, "sets": sets})} if sets else {}


def rng_state(device: torch.device) -> dict[str, Any]:
    """Every global RNG the process has. Batches and masks are derived from (seed, step), not from these,
    but restoring them keeps anything else that draws from a global RNG on the same track."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {"version": py_version, "internal": list(py_internal), "gauss_next": py_gauss},
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    """Restore what :func:`rng_state` saved."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """torch.save to a temp file, then rename: a crash never leaves a half-written checkpoint."""
    write_atomically(path, lambda temp: torch.save(state, temp))


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A training checkpoint's contents; one-line errors for anything else."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to read is reported as one line
        raise TrainSetupError(f"cannot resume from {path}: {first_line(e)}") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise TrainSetupError(f"cannot resume from {path}: not a mitdenoise training checkpoint")
    return state


def params_digest(*models: torch.nn.Module) -> str:
    """SHA-256 of every parameter's bytes (CPU, float32), in state-dict order."""
    h = hashlib.sha256()
    for model in models:
        for name, p in model.named_parameters():
            h.update(name.encode())
            h.update(p.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def pack_schedule(scheduler) -> dict[str, Any]:
    """The scheduler's state with its milestone Counter as a plain dict (weights-only loadable)."""
    state = scheduler.state_dict()
    state["milestones"] = dict(state["milestones"])
    return state


def unpack_schedule(scheduler, state: dict[str, Any]) -> None:
    """Inverse of :func:`pack_schedule`: load ``state`` into ``scheduler``."""
    state = dict(state)
    state["milestones"] = collections.Counter(state["milestones"])
    scheduler.load_state_dict(state)
