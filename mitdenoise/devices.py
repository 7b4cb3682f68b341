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


def cpu_computes_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX-512 BF16 or AMX) and torch's oneDNN uses it:
    where it does not, bf16 matmuls are emulated and slower than float32."""
    cpu = getattr(torch, "cpu", None)
    native = any(
        bool(getattr(cpu, name, lambda: False)())
        for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    )
    mkldnn = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return native and bool(mkldnn)


def computes_bf16(device: torch.device) -> bool:
    """Whether ``device`` multiplies in bf16 natively: a GPU with bf16 units, a CPU with
    :func:`cpu_computes_bf16`."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return device.type == "cpu" and cpu_computes_bf16()


def pick_precision(requested: str, device: torch.device, *, training: bool = False) -> str:
    """The precision to run in: ``"fp32"``, ``"bf16"`` or ``"fp16"``.

    ``auto`` is bf16 on a GPU that computes it natively (much faster, a negligible loss:
    docs/benchmarks.md) and fp32 everywhere else, the CPU included: there bf16 gains too little
    to pick it unasked (docs/benchmarks.md). Asked for by name, bf16 on a GPU without it is an
    error, and so is bf16 inference on a CPU that only emulates it (:func:`cpu_computes_bf16`)
    and fp16 inference on any CPU; training may ask for CPU bf16 autocast.
    """
    allowed = PRECISIONS[:3] if training else PRECISIONS
    if requested not in allowed:
        raise DeviceError(f"unknown precision {requested!r}: use one of {', '.join(allowed)}")
    cuda = device.type == "cuda"
    if requested == "auto":
        return "bf16" if cuda and computes_bf16(device) else "fp32"
    if cuda and requested == "bf16" and not torch.cuda.is_bf16_supported():
        raise DeviceError("bf16 is not supported on this GPU (use --precision fp32)")
    if not cuda and not training:
        if requested == "fp16":
            raise DeviceError("--precision fp16 is for CUDA; on the CPU use fp32 or bf16")
        if requested == "bf16" and not cpu_computes_bf16():
            raise DeviceError("this CPU has no native bf16 (AVX-512 BF16 or AMX), where it is slower: use --precision fp32")
    return requested
