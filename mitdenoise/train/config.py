"""Every training hyper-parameter in one dataclass; presets; TOML in, JSON out.

Precedence, lowest first: the preset (``paper`` unless named), a TOML file, then
single fields given in code or on the command line. On ``--resume`` the run's own
``config.json`` replaces the preset, so a resumed run keeps its settings unless
they are overridden on purpose.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..checks import is_int
from ..model import ModelConfig

PAPER_MILESTONES = (150_000, 200_000, 300_000, 350_000, 400_000)


@dataclass(frozen=True)
class TrainConfig:
    """The recipe of Chen et al. (CVPR 2023) by default; see ../shared/METHOD.md, "Training recipe".

    ``input_mask`` and ``model.attn_mask_ratio`` are (low, high) percentages, (0, 0)
    for off; :meth:`baseline_variant` switches both off. ``batch_size`` is the global
    batch: under torchrun every rank trains on ``batch_size / world_size`` patches.
    """

    data: str | None = None
    out: str = "runs/train"
    preset: str = "paper"
    model: ModelConfig = field(default_factory=ModelConfig)
    patch_size: int = 64
    batch_size: int = 64
    iterations: int = 400_000
    lr: float = 1e-4
    milestones: tuple[int, ...] = PAPER_MILESTONES
    gamma: float = 0.5
    ema_decay: float = 0.999
    noise_sigma: float | tuple[float, float] = 15.0
    """Gaussian sigma (of 255); ``[low, high]`` draws each patch's sigma uniformly from that range
    (a blind model, one network for every noise level)."""
    input_mask: tuple[int, int] = (80, 90)
    mask_ramp: int = 0
    """Iterations over which both mask ratios rise linearly from 0 to their settings (a curriculum,
    e.g. from a trained baseline, which the full masks at once undo); 0 = the full masks from the start.
    The exported model keeps the final attention-mask ratio for inference."""
    clip_noisy: bool = True
    """Clip noisy patches to [0, 1], as the authors do. Off, the network never sees clipped noise,
    so it does not learn to push values near black and white outwards (a colour shift on photos)."""
    correlated_noise: float = 0.0
    """Share of patches (0-1) whose Gaussian noise has a camera's structure instead of being white:
    spatially correlated, coarser and at its own level in colour (``noise.structured_noise``), with
    sigma drawn from ``correlated_sigma``. Meant for photos, whose noise a white-noise model
    leaves as coarse colour blotches."""
    correlated_sigma: tuple[float, float] = (1.0, 15.0)
    """``[low, high]``: the correlated noise's sigma (of 255, RMS over the three channels), drawn per patch."""
    broad_noise: bool = False
    """The broad recipe instead of the Gaussian one (``data.broad_noise``): a camera's pipeline over
    its whole range, white Gaussian 0-50, Poisson-Gaussian, camera-structured correlated noise and
    mixtures, some JPEG-compressed; ``noise_sigma`` and ``correlated_*`` are then unused."""
    seed: int = 1
    workers: int | None = None
    """DataLoader worker processes; None: 0 on CPU (the model is the bottleneck), up to 8 on CUDA."""
    device: str = "auto"
    precision: str = "auto"
    """auto (bf16 autocast on CUDA when supported, else fp32), fp32, or bf16."""
    threads: int | None = None
    """torch.set_num_threads; None: every core."""
    checkpoint_every: int = 5000
    log_every: int = 100
    val_every: int = 5000
    val_clean: str | None = None
    val_pairs: str | None = None
    """``NOISY_DIR:CLEAN_DIR``, files matched by name."""
    val_images: int = 4
    val_crop: int = 256
    val_seed: int = 0
    export: str | None = None
    """Extra path for the EMA safetensors; ``RUN_DIR/ema.safetensors`` is always written."""
    init: str | None = None
    """Start from these weights (a model name or file, as ``denoise --model`` takes) instead of a
    random initialisation: fine-tuning, e.g. the masked recipe from a baseline. The network must
    be the same but for the attention mask, a run-time setting. Ignored on resume."""

    def __post_init__(self) -> None:
        if isinstance(self.model, dict):
            object.__setattr__(self, "model", ModelConfig(**self.model))
        _check_types(self)
        object.__setattr__(self, "milestones", tuple(int(m) for m in self.milestones))
        object.__setattr__(self, "input_mask", tuple(int(r) for r in self.input_mask))
        problems = []
        if self.patch_size < self.model.window_size or self.patch_size % self.model.window_size:
            problems.append(f"patch_size {self.patch_size} must be a multiple of the window ({self.model.window_size})")
        for name in ("batch_size", "iterations", "checkpoint_every", "log_every", "val_every", "val_images", "val_crop"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1")
        if self.lr <= 0 or not 0 < self.gamma <= 1 or not 0 <= self.ema_decay < 1:
            problems.append("lr must be > 0, gamma in (0, 1], ema_decay in [0, 1)")
        if list(self.milestones) != sorted(self.milestones) or any(m < 1 for m in self.milestones):
            problems.append(f"milestones must be increasing positive iterations, not {list(self.milestones)}")
        low, high = self.input_mask
        if not 0 <= low <= high < 100:
            problems.append(f"input_mask must satisfy 0 <= low <= high < 100, not {self.input_mask}")
        if self.mask_ramp < 0:
            problems.append("mask_ramp must be >= 0")
        if isinstance(self.noise_sigma, (list, tuple)):
            object.__setattr__(self, "noise_sigma", tuple(float(s) for s in self.noise_sigma))
            if not 0 <= self.noise_sigma[0] <= self.noise_sigma[1]:
                problems.append(f"noise_sigma [low, high] must satisfy 0 <= low <= high, not {list(self.noise_sigma)}")
        elif self.noise_sigma < 0:
            problems.append("noise_sigma must be >= 0")
        object.__setattr__(self, "correlated_sigma", tuple(float(s) for s in self.correlated_sigma))
        if not 0 <= self.correlated_noise <= 1:
            problems.append(f"correlated_noise must be a share in [0, 1], not {self.correlated_noise}")
        if not 0 < self.correlated_sigma[0] <= self.correlated_sigma[1]:
            problems.append(f"correlated_sigma [low, high] must satisfy 0 < low <= high, not {list(self.correlated_sigma)}")
        if self.workers is not None and self.workers < 0:
            problems.append("workers must be >= 0")
        if self.threads is not None and self.threads < 1:
            problems.append("threads must be >= 1")
        if self.precision not in ("auto", "fp32", "bf16"):
            problems.append(f"precision must be auto, fp32 or bf16, not {self.precision!r}")
        if self.val_pairs is not None and ":" not in self.val_pairs:
            problems.append(f"val_pairs must be NOISY_DIR:CLEAN_DIR, not {self.val_pairs!r}")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def is_baseline(self) -> bool:
        return self.input_mask[1] == 0 and not self.model.mask_enabled

    def baseline_variant(self) -> "TrainConfig":
        """The same recipe with both masks off (the paper's "baseline")."""
        return self.replace(input_mask=(0, 0), model={"attn_mask_ratio": (0, 0)})

    def replace(self, **changes: Any) -> "TrainConfig":
        """A copy with fields changed; ``model`` may be a dict of ModelConfig fields to change."""
        model = changes.pop("model", None)
        if isinstance(model, dict):
            changes["model"] = dataclasses.replace(self.model, **model)
        elif model is not None:
            changes["model"] = model
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"unknown training settings: {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["model"] = json.loads(self.model.to_json())
        return _lists(data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any], base: "TrainConfig | None" = None) -> "TrainConfig":
        """``data`` over ``base`` (default: all defaults); unknown keys are an error that names them."""
        base = base or cls()
        data = dict(data)
        model = data.pop("model", None)
        if model is not None and not isinstance(model, dict):
            raise ValueError("model must be a table of network settings")
        if model:
            unknown = set(model) - {f.name for f in dataclasses.fields(ModelConfig)}
            if unknown:
                raise ValueError(f"unknown model settings: {', '.join(sorted(unknown))}")
            data["model"] = model
        return base.replace(**data)


_INTS = ("patch_size", "batch_size", "iterations", "seed", "mask_ramp", "checkpoint_every", "log_every", "val_every",
         "val_images", "val_crop", "val_seed")
_NUMBERS = ("lr", "gamma", "ema_decay", "correlated_noise")
_TEXTS = ("out", "preset", "device", "precision")


def _check_types(config: TrainConfig) -> None:
    """Settings come from TOML and flags: a wrong type is one message naming the setting, not a crash later."""

    def fail(name: str, kind: str) -> None:
        raise ValueError(f"{name} must be {kind}, not {getattr(config, name)!r}")

    for name in _INTS:
        if not is_int(getattr(config, name)):
            fail(name, "an integer")
    for name in ("workers", "threads"):
        if getattr(config, name) is not None and not is_int(getattr(config, name)):
            fail(name, "an integer")
    for name in _NUMBERS:
        value = getattr(config, name)
        if not (is_int(value) or isinstance(value, float)) or not math.isfinite(value):
            fail(name, "a finite number")
    sigma = config.noise_sigma
    if isinstance(sigma, (list, tuple)):
        if len(sigma) != 2 or not all(_is_number(s) for s in sigma):
            fail("noise_sigma", "a number or [low, high]")
    elif not _is_number(sigma):
        fail("noise_sigma", "a number or [low, high]")
    pair = config.correlated_sigma
    if not isinstance(pair, (list, tuple)) or len(pair) != 2 or not all(_is_number(s) for s in pair):
        fail("correlated_sigma", "[low, high]")
    for name in ("clip_noisy", "broad_noise"):
        if not isinstance(getattr(config, name), bool):
            fail(name, "true or false")
    for name in _TEXTS:
        if not isinstance(getattr(config, name), str):
            fail(name, "a string")
    for name in ("data", "val_clean", "val_pairs", "export", "init"):
        if getattr(config, name) is not None and not isinstance(getattr(config, name), str):
            fail(name, "a path (a string)")
    if not isinstance(config.milestones, (list, tuple)) or not all(is_int(m) for m in config.milestones):
        fail("milestones", "a list of integers")
    mask = config.input_mask
    if not isinstance(mask, (list, tuple)) or len(mask) != 2 or not all(is_int(r) for r in mask):
        fail("input_mask", "[low, high] in percent")


def _is_number(value: Any) -> bool:
    return (is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _lists(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _lists(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_lists(v) for v in value]
    return value


TINY_MODEL = ModelConfig(embed_dim=12, depths=(2, 2), num_heads=(2, 2))

PRESETS: dict[str, TrainConfig] = {
    # The authors' settings (input_mask_80_90.json, METHOD.md): ~12.8 M patches at batch 64.
    "paper": TrainConfig(preset="paper", out="runs/paper"),
    # A tiny network for smoke tests: a few minutes on a 2-core CPU, validation included. A higher lr
    # and a shorter EMA than the paper's, so that 300 steps show learning; one thread, because a tiny
    # network gains little from two and OpenMP threads stall badly on a shared, busy CPU.
    "quick": TrainConfig(
        preset="quick",
        out="runs/quick",
        model=TINY_MODEL,
        patch_size=48,
        batch_size=8,
        iterations=300,
        lr=3e-3,
        milestones=(200,),
        ema_decay=0.99,
        threads=1,
        checkpoint_every=100,
        log_every=25,
        val_every=100,
        val_images=2,
        val_crop=128,
    ),
    # The full network at a CPU-sized batch, for long background runs. fp32: bf16 autocast makes a
    # CPU training step slower (the attention's small bf16 matmuls take a slow GEMM in backward).
    "cpu": TrainConfig(
        preset="cpu",
        out="runs/cpu",
        batch_size=8,
        iterations=200_000,
        milestones=(100_000, 150_000, 175_000),
        precision="fp32",
        checkpoint_every=250,
        log_every=10,
        val_every=2000,
    ),
}


def load_toml(path: str | Path) -> dict[str, Any]:
    """The settings of a TOML file: top-level training keys and a ``[model]`` table."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ValueError(f"config file not found: {path}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid TOML ({e})") from None
    except OSError as e:  # a folder, no permission
        raise ValueError(f"cannot read config file {path}: {(e.strerror or str(e)).lower()}") from None


def resolve_config(
    preset: str | None = None,
    toml_path: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    base: TrainConfig | None = None,
    baseline: bool = False,
    resume: bool = False,
) -> TrainConfig:
    """Preset (or ``base``), then the TOML file, then ``overrides``; ``baseline`` last, so it always wins.

    ``resume``: the run folder's own ``config.json`` (where there is one) replaces the preset, so a
    resumed run keeps its settings but for what the TOML and ``overrides`` change on purpose.
    """
    if resume:
        saved = Path(resolve_config(preset, toml_path, overrides, base, baseline).out) / "config.json"
        if saved.is_file():
            try:
                base = TrainConfig.from_dict(json.loads(saved.read_text()))
            except json.JSONDecodeError as e:
                raise ValueError(f"{saved}: not valid JSON ({e})") from None
            preset = None
    if base is None:
        name = preset or "paper"
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}: use one of {', '.join(PRESETS)}")
        base = PRESETS[name]
    elif preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}: use one of {', '.join(PRESETS)}")
        base = PRESETS[preset]
    config = base
    if toml_path is not None:
        config = TrainConfig.from_dict(load_toml(toml_path), base=config)
    if overrides:
        config = TrainConfig.from_dict(overrides, base=config)
    if baseline:
        config = config.baseline_variant()
    return config
