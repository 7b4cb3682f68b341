"""The training loop: Adam + MultiStepLR + EMA, checkpoints that resume exactly, DDP under torchrun.

One process trains on its own; under ``torchrun`` (WORLD_SIZE > 1 in the
environment) every process joins a process group (NCCL on CUDA, Gloo on CPU),
trains on its slice of the global batch through DistributedDataParallel, and
rank 0 alone writes logs, checkpoints and exports. EMA weights are updated from
the all-reduced model on every rank, so they stay identical too.

:func:`train` reads as its steps: check the request, build the run (:class:`Run`),
resume it, prepare data and validation, then step, log, validate and save until done
or stopped.
"""

from __future__ import annotations

import bisect
import collections
import copy
import json
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from ..checkpoints import TRAIN_CHECKPOINT_NAME, TRAIN_EXPORT_NAME, load_model, save_safetensors
from ..devices import pick_device, pick_precision
from ..errors import DeviceError, MitdenoiseError, TrainSetupError
from ..imageio import blocked_folder
from ..masking import ramped
from ..model import SwinIR, train_route_applies
from ..route_train import backward_in_parts
from ..registry import resolve_model
from ..files import write_text_atomically
from ..stopping import StopFlag, signal_exit_code
from .checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    load_checkpoint,
    pack_schedule,
    params_digest,
    quality_metadata,
    rng_state,
    save_checkpoint,
    set_rng_state,
    unpack_schedule,
)
from .config import TrainConfig
from ..noise import derive_seed
from .data import PatchBatches, find_images, load_images, make_loader, min_image_size
from .report import Reporter, TrainObserver
from .validation import ValSet, evaluate, pair_set, synthetic_sets

CHECKPOINT_NAME = TRAIN_CHECKPOINT_NAME
EXPORT_NAME = TRAIN_EXPORT_NAME


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
        return 0 if self.signal is None else signal_exit_code(self.signal)


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


def resolve_device(name: str, d: Dist) -> torch.device:
    """:func:`~mitdenoise.devices.pick_device`, then: under torchrun each process takes the GPU
    of its local rank, and a CUDA device gets an index and becomes the current one."""
    device = pick_device(name)
    if device.type == "cuda":
        if d.enabled:
            device = torch.device("cuda", d.local_rank)
        elif device.index is None:  # set_device and the data loader's pinning want an index
            device = torch.device("cuda", torch.cuda.current_device())
        if device.index >= torch.cuda.device_count():
            raise DeviceError(f"device {device} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
        torch.cuda.set_device(device)
    return device


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


@dataclass
class Run:
    """What a training run updates, and where it stands."""

    config: TrainConfig
    device: torch.device
    model: SwinIR
    ema: SwinIR
    optimizer: torch.optim.Optimizer
    scheduler: Any
    net: torch.nn.Module
    """The model as the steps call it: itself, or wrapped in DistributedDataParallel."""
    start: int = 0
    elapsed_before: float = 0.0
    iteration: int = 0

    @classmethod
    def build(cls, config: TrainConfig, device: torch.device, init_state: dict | None) -> "Run":
        """The network (seeded, or from ``init_state``), its EMA copy, Adam and the lr schedule."""
        torch.manual_seed(config.seed)
        model = SwinIR(config.model).to(device)
        if init_state is not None:
            model.load_state_dict(init_state)
        ema = copy.deepcopy(model).requires_grad_(False).eval()
        optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=0)
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, list(config.milestones), config.gamma)
        return cls(config, device, model, ema, optimizer, scheduler, net=model)

    def resume(self, path: Path) -> None:
        """Continue from the checkpoint at ``path``: weights, optimizer, schedule, RNGs, iteration."""
        config = self.config
        state = load_checkpoint(path)
        saved = TrainConfig.from_dict(json.loads(state["config"]))
        if saved.model != config.model:
            raise TrainSetupError(
                f"{path} was trained with a different network ({saved.model}); resume it with the same one"
            )
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        unpack_schedule(self.scheduler, state["scheduler"])
        self.start, self.elapsed_before = int(state["iteration"]), float(state["elapsed"])
        if (saved.lr, saved.milestones, saved.gamma) != (config.lr, config.milestones, config.gamma):
            _schedule_to(self.optimizer, self.scheduler, config, self.start)
        set_rng_state(state["rng"], self.device)
        self.iteration = self.start

    def distribute(self, d: Dist) -> None:
        """Under torchrun: the steps go through DistributedDataParallel."""
        if d.enabled:
            self.net = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                broadcast_buffers=False,
            )

    def step(self, noisy: torch.Tensor, clean: torch.Tensor, generator: torch.Generator, autocast) -> torch.Tensor:
        """One optimisation step on a batch, then the EMA update; returns the (detached) loss.

        On the CPU in fp32 the network takes the training route (:mod:`mitdenoise.route_train`),
        and without DDP the batch goes in parts to single-thread workers
        (:func:`~mitdenoise.route_train.backward_in_parts`) where there are several threads.
        """
        noisy = noisy.to(self.device, non_blocking=True)
        clean = clean.to(self.device, non_blocking=True)
        ratio = ramped(self.config.model.attn_mask_ratio, self.iteration, self.config.mask_ramp)
        self.optimizer.zero_grad(set_to_none=True)
        with autocast:  # the route is fp32: under bf16 autocast the model's modules run
            in_parts = self.net is self.model and train_route_applies(noisy)  # DDP's hooks want one backward
        loss = backward_in_parts(self.model, noisy, clean, F.l1_loss, generator, ratio) if in_parts else None
        if loss is None:
            with autocast:
                out = self.net(noisy, generator=generator, mask_ratio=ratio)
            loss = F.l1_loss(out.float(), clean)
            loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        ema_update(self.ema, self.model, self.config.ema_decay)
        return loss.detach()

    def checkpoint_state(self, elapsed: float, world_size: int) -> dict[str, Any]:
        """What :meth:`resume` reads back."""
        return {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "iteration": self.iteration,
            "elapsed": elapsed,
            "world_size": world_size,
            "config": self.config.to_json(),
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": pack_schedule(self.scheduler),
            "rng": rng_state(self.device),
        }


class _LossLog:
    """The mean loss and the rate since the last log line, time spent validating left out."""

    def __init__(self, start: int, device: torch.device) -> None:
        self.wall_start = time.perf_counter()
        self.last_time, self.last_iteration, self.val_time = self.wall_start, start, 0.0
        self.loss_sum = torch.zeros((), device=device, dtype=torch.float64)

    def record(self, run: Run, d: Dist) -> dict[str, Any]:
        """The ``train`` log record at ``run.iteration``; starts the next interval."""
        if d.enabled:
            dist.all_reduce(self.loss_sum, group=None)
            self.loss_sum /= d.world_size
        now = time.perf_counter()
        steps = run.iteration - self.last_iteration
        rate = steps / max(now - self.last_time - self.val_time, 1e-9)
        record = {
            "event": "train",
            "iteration": run.iteration,
            "loss": round(float(self.loss_sum) / max(steps, 1), 6),
            "lr": run.optimizer.param_groups[0]["lr"],
            "it_per_s": round(rate, 4),
            "patches_per_s": round(rate * run.config.batch_size, 3),
            "elapsed": round(run.elapsed_before + now - self.wall_start, 2),
        }
        self.loss_sum.zero_()
        self.last_time, self.last_iteration, self.val_time = now, run.iteration, 0.0
        return record


def _check_request(config: TrainConfig, resume: bool, d: Dist) -> tuple[torch.device, str, Path]:
    """Everything that can be checked before any work: data given, batch split, device,
    precision, the run folder (holding a run to resume, or none) and the export path."""
    if config.data is None:
        raise TrainSetupError("no training images: give a folder of clean images (--data DIR)")
    if config.batch_size % d.world_size:
        raise TrainSetupError(f"batch size {config.batch_size} is not divisible by the {d.world_size} processes")
    device = resolve_device(config.device, d)
    precision = pick_precision(config.precision, device, training=True)
    run_dir = Path(config.out)
    checkpoint_path = run_dir / CHECKPOINT_NAME
    if resume and not checkpoint_path.is_file():
        raise TrainSetupError(f"nothing to resume: {checkpoint_path} does not exist")
    if not resume and checkpoint_path.exists():
        raise TrainSetupError(f"{run_dir} already holds a run: pass --resume to continue it, or choose another --out")
    _check_outputs(run_dir, config.export)
    return device, precision, run_dir


def _join_processes(d: Dist, device: torch.device) -> None:
    """Under torchrun: join the process group, plus a Gloo group for the stop flag next to NCCL."""
    if d.enabled:
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
        d.flag_group = dist.new_group(backend="gloo") if backend == "nccl" else None


def _worker_count(config: TrainConfig, device: torch.device, d: Dist) -> int:
    if config.workers is not None:
        return config.workers
    # on CPU the model is the bottleneck and workers would take its cores; a GPU needs them
    return min(8, (os.cpu_count() or 1) // d.local_world_size) if device.type == "cuda" else 0


def _patch_batches(images: list, config: TrainConfig, d: Dist) -> PatchBatches:
    return PatchBatches(
        images,
        patch_size=config.patch_size,
        batch_size=config.batch_size,
        steps=config.iterations,
        seed=config.seed,
        noise_sigma=config.noise_sigma,
        mask_ratio=config.input_mask,
        clip_noisy=config.clip_noisy,
        correlated_share=config.correlated_noise,
        correlated_sigma=config.correlated_sigma,
        mask_ramp=config.mask_ramp,
        broad=config.broad_noise,
        rank=d.rank,
        world_size=d.world_size,
    )


def _validation_sets(config: TrainConfig, d: Dist) -> list[ValSet]:
    """Rank 0 validates; the other ranks get none."""
    val_sets: list[ValSet] = []
    if d.main:
        if config.val_clean:
            val_sets += synthetic_sets(config.val_clean, config.val_images, config.val_crop, config.val_seed)
        if config.val_pairs:
            val_sets.append(pair_set(config.val_pairs, config.val_images, config.val_crop))
    return val_sets


def _stop_everywhere(stop: StopFlag, d: Dist) -> bool:
    """Whether to stop now: every rank stops at the same step, whichever one got the signal."""
    stopping = bool(stop)
    if d.enabled:
        flag = torch.tensor([1 if stopping else 0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=d.flag_group)
        stopping = bool(flag.item())
    return stopping


def train(
    config: TrainConfig,
    *,
    resume: bool = False,
    observer: TrainObserver | None = None,
    handle_signals: bool = True,
) -> TrainResult:
    """Train (or, with ``resume``, continue) a run in ``config.out``; see :class:`TrainConfig`.

    ``observer`` hears the run's progress and notes (the command line draws them); without
    one they go to ``logging`` (logger ``mitdenoise.train``). ``handle_signals`` installs
    SIGINT/SIGTERM handlers that end the run cleanly after the current step (the result's
    ``exit_code`` is then 130/143).
    """
    d = _dist_from_env()
    device, precision, run_dir = _check_request(config, resume, d)
    threads = config.threads or max(1, (os.cpu_count() or 1) // d.local_world_size)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads)
    _join_processes(d, device)
    stop = StopFlag()
    if handle_signals:
        stop.install()
    reporter = None
    try:
        run, dataset, val_sets, reporter = _start(config, resume, device, precision, run_dir, threads, d, observer)
        state = _Progress(run, run_dir, config, val_sets, reporter, d)
        if val_sets and not resume:
            state.validate(first=True)
        if run.start >= config.iterations:
            reporter.message(f"already at {run.start} iterations: pass --iterations N (N > {run.start}) to train longer")
            return TrainResult(run.start, run_dir, run_dir / CHECKPOINT_NAME, run_dir / EXPORT_NAME, None, state.validation)
        loader = make_loader(dataset, run.start, _worker_count(config, device, d), pin_memory=device.type == "cuda")
        _steps(state, loader, stop, precision)
        reporter.close()
        return _finish(run, run_dir, state.saved_at, stop, state.validation, reporter, d)
    finally:
        if reporter is not None:
            reporter.close()
        if handle_signals:
            stop.restore()
        torch.set_num_threads(threads_before)
        if d.enabled and dist.is_initialized():
            dist.destroy_process_group()


def _start(config: TrainConfig, resume: bool, device, precision: str, run_dir: Path, threads: int, d: Dist,
           observer: TrainObserver | None) -> tuple[Run, PatchBatches, list[ValSet], Reporter]:
    """Data, network (fresh, from ``init``, or resumed), validation sets, the run folder and its log."""
    images, too_small = load_images(find_images(config.data), min_size=min_image_size(config))
    init_state = None if resume or config.init is None else initial_weights(config)
    if d.main:  # after the data is found good, so that a failed start leaves no empty run folder
        _make_folder(run_dir)
    run = Run.build(config, device, init_state)
    del init_state
    if resume:
        run.resume(run_dir / CHECKPOINT_NAME)
    run.distribute(d)
    run.model.train()
    dataset = _patch_batches(images, config, d)
    val_sets = _validation_sets(config, d)
    if d.main:
        write_text_atomically(run_dir / "config.json", config.to_json() + "\n")
    reporter = Reporter(run_dir, config.iterations, run.start, d.main, observer)
    reporter.write({
        "event": "resume" if resume else "start",
        "iteration": run.start,
        "world_size": d.world_size,
        "global_batch": config.batch_size,
        "per_rank_batch": dataset.per_rank,
        "device": str(device),
        "precision": precision,
        "threads": threads,
        "workers": _worker_count(config, device, d),
        "images": len(images),
        "images_too_small": too_small,
        "params": sum(p.numel() for p in run.model.parameters()),
        "baseline": config.is_baseline,
        **{f"noisy_psnr_{v.name}": round(v.noisy_psnr, 4) for v in val_sets},
    })
    if too_small:
        reporter.message(f"note: skipped {too_small} images smaller than {min_image_size(config)}x{min_image_size(config)}")
    return run, dataset, val_sets, reporter


class _Progress:
    """A run's bookkeeping between steps: the last validation, the loss log, checkpoints."""

    def __init__(self, run: Run, run_dir: Path, config: TrainConfig, val_sets: list[ValSet], reporter: Reporter,
                 d: Dist) -> None:
        self.run, self.run_dir, self.config, self.val_sets, self.reporter, self.d = run, run_dir, config, val_sets, reporter, d
        self.validation: dict[str, float] = {}
        self.validated_at = run.start
        self.saved_at: int | None = None
        self.log: _LossLog | None = None
        """Made as the steps start, so that the first rate leaves out the first validation."""

    def validate(self, first: bool = False) -> dict[str, float]:
        """Validate the EMA model now. The ``first``, before any step, is logged and shown at once;
        later ones join the step's log record, and their time is left out of the step rate."""
        start = time.perf_counter()
        self.validation = evaluate(self.run.ema, self.val_sets, self.run.device, self.config.val_seed)
        self.validated_at = self.run.iteration
        if first:
            self.reporter.write({"event": "val", "iteration": self.run.iteration, **self.validation})
            self.reporter.metrics({"iteration": self.run.iteration, **self.validation})
        else:
            self.log.val_time += time.perf_counter() - start
        return self.validation

    def after_step(self, stopping: bool) -> None:
        """Log, validate and checkpoint as the settings ask after the step just taken."""
        run, config = self.run, self.config
        finished = run.iteration == config.iterations
        record: dict[str, Any] = {}
        if run.iteration % config.log_every == 0 or finished or stopping:
            record = self.log.record(run, self.d)
        if self.val_sets and (run.iteration % config.val_every == 0 or finished):
            record = {"event": "train", "iteration": run.iteration, **record, **self.validate()}
        if record:
            self.reporter.write(record)
            self.reporter.metrics(record)
        if run.iteration % config.checkpoint_every == 0 or finished or stopping:
            self.write_checkpoint()

    def write_checkpoint(self) -> None:
        """last.pt, and the EMA weights with the last validation in their metadata (rank 0)."""
        if not self.d.main:
            return
        run, config = self.run, self.config
        elapsed = run.elapsed_before + time.perf_counter() - self.log.wall_start
        save_checkpoint(self.run_dir / CHECKPOINT_NAME, run.checkpoint_state(elapsed, self.d.world_size))
        quality = quality_metadata(self.validation, self.validated_at, self.val_sets)
        save_safetensors(run.ema, self.run_dir / EXPORT_NAME, extra_metadata=quality)
        if config.export:
            _make_folder(Path(config.export).parent)
            save_safetensors(run.ema, config.export, extra_metadata=quality)
        self.saved_at = run.iteration


def _steps(state: _Progress, loader, stop: StopFlag, precision: str) -> None:
    """Train from the run's iteration to the last, or until a stop signal reaches every process."""
    run, config, d = state.run, state.config, state.d
    attn_generator = torch.Generator(device=run.device)
    autocast = torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    state.log = _LossLog(run.start, run.device)
    for step, (noisy, clean) in zip(range(run.start, config.iterations), loader):
        attn_generator.manual_seed(derive_seed(config.seed, step, d.rank, 1))
        state.log.loss_sum += run.step(noisy, clean, attn_generator, autocast)
        run.iteration = step + 1
        state.reporter.step(run.iteration)
        stopping = _stop_everywhere(stop, d)
        state.after_step(stopping)
        if stopping:
            break


def _finish(run: Run, run_dir: Path, saved_at: int | None, stop: StopFlag, validation: dict, reporter, d: Dist) -> TrainResult:
    """The result, the log's last record, and (for the tests) each rank's parameter digest."""
    iteration = run.iteration
    result = TrainResult(
        iteration,
        run_dir,
        run_dir / CHECKPOINT_NAME if saved_at is not None else None,
        run_dir / EXPORT_NAME if saved_at is not None else None,
        stop.signal if iteration < run.config.iterations else None,
        validation,
    )
    if result.signal is not None:
        reporter.write({"event": "stop", "iteration": iteration, "signal": signal.Signals(stop.signal).name})
    else:
        reporter.write({"event": "end", "iteration": iteration})
    if os.environ.get("MITDENOISE_TEST_RANK_HASH") == "1":
        write_text_atomically(run_dir / f"rank{d.rank}_params.sha256", params_digest(run.model, run.ema) + "\n")
    if d.enabled:
        dist.barrier()
    return result
