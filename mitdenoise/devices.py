"""Where and in what precision the network runs: one decision for inference and for training."""

from __future__ import annotations

import torch

from .errors import DeviceError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
"""What ``--precision`` takes for inference; training takes all but fp16."""


def pick_device(name: str = "auto") -> torch.device:
    """'auto' is CUDA when present, else CPU; a CUDA device that isn't there is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DeviceError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {name} requested but CUDA is not available here (use --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(f"device {name} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    elif device.type != "cpu":
        raise DeviceError(f"unsupported device {name!r}: use auto, cpu, cuda or cuda:N")
    return device


def pick_precision(requested: str, device: torch.device, *, training: bool = False) -> str:
    """The precision to run in: ``"fp32"``, ``"bf16"`` or ``"fp16"``.

    ``auto`` is bf16 on a GPU that computes it natively (much faster, a negligible loss:
    docs/benchmarks.md) and fp32 everywhere else. Asked for by name, bf16 on a GPU without it
    is an error; for inference, half precision on the CPU is one too (eager bf16 there is far
    slower than fp32: docs/benchmarks.md), while training may ask for CPU bf16 autocast.
    """
    allowed = PRECISIONS[:3] if training else PRECISIONS
    if requested not in allowed:
        raise DeviceError(f"unknown precision {requested!r}: use one of {', '.join(allowed)}")
    cuda = device.type == "cuda"
    if requested == "auto":
        return "bf16" if cuda and torch.cuda.is_bf16_supported(including_emulation=False) else "fp32"
    if cuda and requested == "bf16" and not torch.cuda.is_bf16_supported():
        raise DeviceError("bf16 is not supported on this GPU (use --precision fp32)")
    if not cuda and requested != "fp32" and not training:
        raise DeviceError(f"--precision {requested} is for CUDA; on the CPU use fp32 (half precision is slower there)")
    return requested
