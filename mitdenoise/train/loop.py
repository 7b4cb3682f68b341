"""The training loop: Adam + MultiStepLR + EMA, checkpoints that resume exactly, DDP under torchrun.

One process trains on its own; under ``torchrun`` (WORLD_SIZE > 1 in the
environment) every process joins a process group (NCCL on CUDA, Gloo on CPU),
trains on its slice of the global batch through DistributedDataParallel, and
rank 0 alone writes logs, checkpoints and exports. EMA weights are updated from
the all-reduced model on every rank, so they stay identical too.
"""

from __future__ import annotations

import bisect
import collections
import copy
import hashlib
import json
import os
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from ..errors import DeviceError, MitdenoiseError
from ..imageio import blocked_folder
from ..model import SwinIR
from ..stopping import StopFlag
from ..weights import VALIDATION_KEY, load_model, resolve_model, save_safetensors
from .config import TrainConfig
from .data import PatchBatches, derive_seed, find_images, load_images, make_loader
from .validation import ValSet, evaluate, pair_set, synthetic_sets

CHECKPOINT_NAME = "last.pt"
EXPORT_NAME = "ema.safetensors"
CHECKPOINT_FORMAT = "mitdenoise-train"
CHECKPOINT_VERSION = 1
EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


class TrainSetupError(MitdenoiseError):
    """The run can't start: run folder, checkpoint or device don't fit the request."""


@dataclass
class TrainResult:
    """What a call to :func:`train` left behind."""

    iteration: int
    run_dir: Path
    checkpoint: Path | None = None
    export: Path | None = None
    signal: int | None = None
    validation: dict[str, float] = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        """0 when finished; 130 after SIGINT, 143 after SIGTERM (the shell's 128 + signal number)."""
        return 0 if self.signal is None else EXIT_CODES.get(self.signal, 128 + int(self.signal))


@dataclass
class Dist:
    """This process's place in the job."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    flag_group: Any = None

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def _dist_from_env() -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    return Dist(
        rank=int(os.environ["RANK"]),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        world_size=world,
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", str(world))),
    )


def _resolve_device(name: str, d: Dist) -> torch.device:
    """auto is CUDA when present; under torchrun each process takes the GPU of its local rank."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DeviceError(f"unknown device {name!r}: use auto, cpu or cuda") from None
    if device.type not in ("cpu", "cuda"):
        raise DeviceError(f"unsupported device {name!r}: use auto, cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device {name} requested but CUDA is not available here (use --device cpu)")
    if device.type == "cuda":
        if d.enabled:
            device = torch.device("cuda", d.local_rank)
        elif device.index is None:  # set_device and the data loader's pinning want an index
            device = torch.device("cuda", torch.cuda.current_device())
        if device.index >= torch.cuda.device_count():
            raise DeviceError(f"device {device} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
        torch.cuda.set_device(device)
    return device


def quality_metadata(validation: dict[str, float], iteration: int, val_sets: list[ValSet]) -> dict[str, str]:
    """The last validation, for the exported file's metadata: ``denoise`` warns when it shows harm."""
    sets = {
        v.name: {"psnr": validation[f"psnr_{v.name}"], "noisy_psnr": round(v.noisy_psnr, 4)}
        for v in val_sets
        if f"psnr_{v.name}" in validation
    }
    return {VALIDATION_KEY: json.dumps({"iteration": iteration, "sets": sets})} if sets else {}


def _resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise DeviceError("bf16 is not supported on this GPU (use --precision fp32)")
    return precision


# ---------------------------------------------------------------------------------------------
# Checkpoints: plain containers of tensors, numbers and strings, so torch.load(weights_only=True) reads them.


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
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _atomic_write_bytes(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_text(path: Path, text: str) -> None:
    _atomic_write_bytes(path, lambda tmp: tmp.write_text(text))


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """torch.save to a temp file, then rename: a crash never leaves a half-written checkpoint."""
    _atomic_write_bytes(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to read is reported as one line
        raise TrainSetupError(f"cannot resume from {path}: {str(e).splitlines()[0][:200]}") from None
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


# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def initial_weights(config: TrainConfig) -> dict[str, torch.Tensor]:
    """The state dict of ``config.init`` for ``config.model``: the same network, any attention mask."""
    try:
        source = load_model(resolve_model(config.init), attn_mask_ratio=config.model.attn_mask_ratio)
    except MitdenoiseError as e:  # not found, not a checkpoint, download failed
        raise TrainSetupError(f"--init: {e}") from None
    if source.config != config.model:
        differ = [
            f"{name} {getattr(source.config, name)!r} there, {getattr(config.model, name)!r} here"
            for name in config.model.__dataclass_fields__
            if getattr(source.config, name) != getattr(config.model, name)
        ]
        raise TrainSetupError(f"--init {config.init} is a different network: {'; '.join(differ)}")
    return source.state_dict()


def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema = decay * ema + (1 - decay) * model, parameter by parameter (KAIR's update_E)."""
    ema_params = list(ema.parameters())
    torch._foreach_mul_(ema_params, decay)
    torch._foreach_add_(ema_params, [p.detach() for p in model.parameters()], alpha=1 - decay)


def _schedule_to(optimizer: torch.optim.Optimizer, scheduler, config: TrainConfig, iteration: int) -> None:
    """Point the optimizer and scheduler at ``config``'s lr schedule, at ``iteration``."""
    scheduler.milestones = collections.Counter(config.milestones)
    scheduler.gamma = config.gamma
    scheduler.base_lrs = [config.lr for _ in optimizer.param_groups]
    lr = config.lr * config.gamma ** bisect.bisect_right(config.milestones, iteration)
    for group in optimizer.param_groups:
        group["initial_lr"] = config.lr
        group["lr"] = lr
    scheduler._last_lr = [lr for _ in optimizer.param_groups]


class Reporter:
    """log.jsonl (rank 0), and either a rich progress bar or plain log lines on stderr."""

    def __init__(self, run_dir: Path, total: int, start: int, enabled: bool, quiet: bool, bar: bool | None) -> None:
        self.enabled = enabled
        self.log_path = run_dir / "log.jsonl"
        self.quiet = quiet or not enabled
        self.total = total
        self.progress = None
        self.psnr = ""
        if self.quiet:
            return
        from rich.console import Console

        self.console = Console(stderr=True)
        if bar is None:
            bar = sys.stderr.isatty()
        if bar:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(
                TextColumn("train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"),
                TextColumn("loss {task.fields[loss]}"),
                TextColumn("{task.fields[psnr]}"),
                TextColumn("eta"),
                TimeRemainingColumn(),
                console=self.console,
            )
            self.task = self.progress.add_task("train", total=total, completed=start, rate="", loss="-", psnr="")
            self.progress.start()

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.log_path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def message(self, text: str) -> None:
        if not self.quiet:
            self.console.print(text, markup=False, highlight=False, soft_wrap=True)

    def step(self, iteration: int) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=iteration)

    def metrics(self, record: dict[str, Any]) -> None:
        psnrs = {k.removeprefix("psnr_"): v for k, v in record.items() if k.startswith("psnr_")}
        if psnrs:
            self.psnr = "psnr " + " ".join(f"{k} {v:.2f}" for k, v in psnrs.items())
        if self.quiet:
            return
        loss = f"{record['loss']:.4f}" if "loss" in record else "-"
        rate = f"{record['it_per_s']:.2f} it/s" if "it_per_s" in record else ""
        if self.progress is not None:
            self.progress.update(self.task, completed=record["iteration"], rate=rate, loss=loss, psnr=self.psnr)
        else:
            parts = [f"it {record['iteration']}/{self.total}", f"loss {loss}"]
            if "lr" in record:
                parts.append(f"lr {record['lr']:.2e}")
            if rate:
                parts.append(rate)
                remaining = (self.total - record["iteration"]) / max(record["it_per_s"], 1e-9)
                parts.append(f"eta {_duration(remaining)}")
            if psnrs:
                parts.append(self.psnr)
            self.console.print("  ".join(parts), markup=False, highlight=False, soft_wrap=True)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def _check_outputs(run_dir: Path, export: str | None) -> None:
    """What would fail at the first checkpoint or at the end, found before any training."""
    if run_dir.exists() and not run_dir.is_dir():
        raise TrainSetupError(f"--out {run_dir} is a file, not a folder")
    folders = [run_dir]
    if export is not None:
        export_path = Path(export)
        if export_path.suffix.lower() != ".safetensors":
            raise TrainSetupError(f"--export {export_path} must end in .safetensors")
        if export_path.is_dir():
            raise TrainSetupError(f"--export {export_path} is a folder, not a file name")
        folders.append(export_path.parent)
    for folder in folders:
        blocked = blocked_folder(folder)
        if blocked is not None:
            raise TrainSetupError(f"cannot write into {folder}: {blocked} is not a folder we may write to")


def _make_folder(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TrainSetupError(f"cannot create {path}: {(e.strerror or str(e)).lower()}") from None


def train(
    config: TrainConfig,
    *,
    resume: bool = False,
    quiet: bool = False,
    progress: bool | None = None,
    handle_signals: bool = True,
) -> TrainResult:
    """Train (or, with ``resume``, continue) a run in ``config.out``; see :class:`TrainConfig`.

    ``progress``: a rich bar (True), plain lines (False) or decide from stderr being a
    terminal (None). ``handle_signals`` installs SIGINT/SIGTERM handlers that end the
    run cleanly after the current step (the result's ``exit_code`` is then 130/143).
    """
    if config.data is None:
        raise TrainSetupError("no training images: give a folder of clean images (--data DIR)")
    d = _dist_from_env()
    if config.batch_size % d.world_size:
        raise TrainSetupError(f"batch size {config.batch_size} is not divisible by the {d.world_size} processes")
    device = _resolve_device(config.device, d)
    precision = _resolve_precision(config.precision, device)
    run_dir = Path(config.out)
    checkpoint_path = run_dir / CHECKPOINT_NAME
    if resume and not checkpoint_path.is_file():
        raise TrainSetupError(f"nothing to resume: {checkpoint_path} does not exist")
    if not resume and checkpoint_path.exists():
        raise TrainSetupError(f"{run_dir} already holds a run: pass --resume to continue it, or choose another --out")
    _check_outputs(run_dir, config.export)

    threads = config.threads or max(1, (os.cpu_count() or 1) // d.local_world_size)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads)
    if d.enabled:
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
        d.flag_group = dist.new_group(backend="gloo") if backend == "nccl" else None
    stop = StopFlag()
    if handle_signals:
        stop.install()
    reporter = None
    try:
        images, too_small = load_images(find_images(config.data), min_size=config.patch_size)
        init_state = None if resume or config.init is None else initial_weights(config)
        if d.main:  # after the data is found good, so that a failed start leaves no empty run folder
            _make_folder(run_dir)

        torch.manual_seed(config.seed)
        model = SwinIR(config.model).to(device)
        if init_state is not None:
            model.load_state_dict(init_state)
            del init_state
        ema = copy.deepcopy(model).requires_grad_(False).eval()
        optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=0)
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, list(config.milestones), config.gamma)

        start, elapsed_before = 0, 0.0
        if resume:
            state = load_checkpoint(checkpoint_path)
            saved = TrainConfig.from_dict(json.loads(state["config"]))
            if saved.model != config.model:
                raise TrainSetupError(
                    f"{checkpoint_path} was trained with a different network ({saved.model}); resume it with the same one"
                )
            model.load_state_dict(state["model"])
            ema.load_state_dict(state["ema"])
            optimizer.load_state_dict(state["optimizer"])
            sched_state = dict(state["scheduler"])
            sched_state["milestones"] = collections.Counter(sched_state["milestones"])
            scheduler.load_state_dict(sched_state)
            start, elapsed_before = int(state["iteration"]), float(state["elapsed"])
            if (saved.lr, saved.milestones, saved.gamma) != (config.lr, config.milestones, config.gamma):
                _schedule_to(optimizer, scheduler, config, start)
            set_rng_state(state["rng"], device)
            del state

        net = model
        if d.enabled:
            net = DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False
            )
        model.train()

        if config.workers is not None:
            workers = config.workers
        else:  # on CPU the model is the bottleneck and workers would take its cores; a GPU needs them
            workers = min(8, (os.cpu_count() or 1) // d.local_world_size) if device.type == "cuda" else 0
        dataset = PatchBatches(
            images,
            patch_size=config.patch_size,
            batch_size=config.batch_size,
            steps=config.iterations,
            seed=config.seed,
            noise_sigma=config.noise_sigma,
            mask_ratio=config.input_mask,
            rank=d.rank,
            world_size=d.world_size,
        )

        val_sets: list[ValSet] = []
        if d.main:
            if config.val_clean:
                val_sets += synthetic_sets(config.val_clean, config.val_images, config.val_crop, config.val_seed)
            if config.val_pairs:
                val_sets.append(pair_set(config.val_pairs, config.val_images, config.val_crop))
            _write_text(run_dir / "config.json", config.to_json() + "\n")

        reporter = Reporter(run_dir, config.iterations, start, d.main, quiet, progress)
        reporter.write(
            {
                "event": "resume" if resume else "start",
                "iteration": start,
                "world_size": d.world_size,
                "global_batch": config.batch_size,
                "per_rank_batch": dataset.per_rank,
                "device": str(device),
                "precision": precision,
                "threads": threads,
                "workers": workers,
                "images": len(images),
                "images_too_small": too_small,
                "params": sum(p.numel() for p in model.parameters()),
                "baseline": config.is_baseline,
                **{f"noisy_psnr_{v.name}": round(v.noisy_psnr, 4) for v in val_sets},
            }
        )
        if too_small:
            reporter.message(f"note: skipped {too_small} images smaller than {config.patch_size}x{config.patch_size}")
        validation: dict[str, float] = {}
        validated_at = start
        if val_sets and not resume:
            validation = evaluate(ema, val_sets, device, config.val_seed)
            reporter.write({"event": "val", "iteration": start, **validation})
            reporter.metrics({"iteration": start, **validation})

        if start >= config.iterations:
            reporter.message(f"already at {start} iterations: pass --iterations N (N > {start}) to train longer")
            return TrainResult(start, run_dir, checkpoint_path, run_dir / EXPORT_NAME, None, validation)

        loader = make_loader(dataset, start, workers, pin_memory=device.type == "cuda")
        attn_generator = torch.Generator(device=device)
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
        wall_start = time.perf_counter()
        last_log_time, last_log_it, val_time = wall_start, start, 0.0
        loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        iteration = start
        saved_at = None

        def write_checkpoint() -> None:
            nonlocal saved_at
            if not d.main:
                return
            sched_state = scheduler.state_dict()
            sched_state["milestones"] = dict(sched_state["milestones"])
            save_checkpoint(
                checkpoint_path,
                {
                    "format": CHECKPOINT_FORMAT,
                    "version": CHECKPOINT_VERSION,
                    "iteration": iteration,
                    "elapsed": elapsed_before + time.perf_counter() - wall_start,
                    "world_size": d.world_size,
                    "config": config.to_json(),
                    "model": model.state_dict(),
                    "ema": ema.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": sched_state,
                    "rng": rng_state(device),
                },
            )
            quality = quality_metadata(validation, validated_at, val_sets)
            save_safetensors(ema, run_dir / EXPORT_NAME, extra_metadata=quality)
            if config.export:
                _make_folder(Path(config.export).parent)
                save_safetensors(ema, config.export, extra_metadata=quality)
            saved_at = iteration

        for step, (noisy, clean) in zip(range(start, config.iterations), loader):
            noisy = noisy.to(device, non_blocking=True)
            clean = clean.to(device, non_blocking=True)
            attn_generator.manual_seed(derive_seed(config.seed, step, d.rank, 1))
            with autocast:
                out = net(noisy, generator=attn_generator)
            loss = F.l1_loss(out.float(), clean)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            ema_update(ema, model, config.ema_decay)
            iteration = step + 1
            loss_sum += loss.detach()
            reporter.step(iteration)

            stopping = bool(stop)
            if d.enabled:  # every rank stops at the same step, whichever one got the signal
                flag = torch.tensor([1 if stopping else 0])
                dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=d.flag_group)
                stopping = bool(flag.item())
            finished = iteration == config.iterations
            record: dict[str, Any] = {}
            if iteration % config.log_every == 0 or finished or stopping:
                if d.enabled:
                    dist.all_reduce(loss_sum, group=None)
                    loss_sum /= d.world_size
                now = time.perf_counter()
                steps = iteration - last_log_it
                rate = steps / max(now - last_log_time - val_time, 1e-9)
                record = {
                    "event": "train",
                    "iteration": iteration,
                    "loss": round(float(loss_sum) / max(steps, 1), 6),
                    "lr": optimizer.param_groups[0]["lr"],
                    "it_per_s": round(rate, 4),
                    "patches_per_s": round(rate * config.batch_size, 3),
                    "elapsed": round(elapsed_before + now - wall_start, 2),
                }
                loss_sum.zero_()
                last_log_time, last_log_it, val_time = now, iteration, 0.0
            if val_sets and (iteration % config.val_every == 0 or finished):
                t = time.perf_counter()
                validation = evaluate(ema, val_sets, device, config.val_seed)
                validated_at = iteration
                val_time += time.perf_counter() - t
                record = {"event": "train", "iteration": iteration, **record, **validation}
            if record:
                reporter.write(record)
                reporter.metrics(record)
            if iteration % config.checkpoint_every == 0 or finished or stopping:
                write_checkpoint()
            if stopping:
                break

        reporter.close()
        result = TrainResult(
            iteration,
            run_dir,
            checkpoint_path if saved_at is not None else None,
            run_dir / EXPORT_NAME if saved_at is not None else None,
            stop.signal if iteration < config.iterations else None,
            validation,
        )
        if result.signal is not None:
            reporter.write({"event": "stop", "iteration": iteration, "signal": signal.Signals(stop.signal).name})
        else:
            reporter.write({"event": "end", "iteration": iteration})
        if os.environ.get("MITDENOISE_TEST_RANK_HASH") == "1":
            _write_text(run_dir / f"rank{d.rank}_params.sha256", params_digest(model, ema) + "\n")
        if d.enabled:
            dist.barrier()
        return result
    finally:
        if reporter is not None:
            reporter.close()
        if handle_signals:
            stop.restore()
        torch.set_num_threads(threads_before)
        if d.enabled and dist.is_initialized():
            dist.destroy_process_group()
