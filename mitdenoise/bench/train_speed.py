"""The training-speed benchmark: patches per second of a training step, plain route beside training route.

A step is what ``mitdenoise train`` does with a batch: forward, L1 loss, backward, Adam
step, lr schedule and EMA update. The plain route is the model's own modules on torch's
intra-op threads, as training ran before :mod:`mitdenoise.route_train`; the training route
is ``train``'s own step (``Run.step``), which on the CPU in fp32 takes the route with the
batch in parts on single-thread workers. Both start from the same weights and batch and
draw the same masks; their steps alternate (plain, route, plain, ...) so that a load
change on the machine hits both, and the medians are compared. The effective rate counts
the plain network's multiply-adds, three times the forward's for a step, against the
sgemm ceiling of :mod:`.speed`.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from collections.abc import Callable, Sequence

from .common import Progress, ResultTable, sgemm_lines, synthetic_image, write_results
from .speed import json_config, macs_per_pixel, sgemm_gflops

ROUTE_DESCRIPTION = (
    "plain: the model's modules on torch's intra-op threads (training before route_train); "
    "route: train's own step, route_train with the batch in parts on single-thread workers; "
    "route, one forward: route_train with the whole batch on intra-op threads"
)


def network_config(model_config: str | os.PathLike | None, attn_mask: tuple[int, int]):
    """The network to time: the ``[model]`` table of a training TOML (``train --config``), or the
    shipped checkpoints' network; with the attention-mask ratio ``attn_mask``. Returns it and
    where it came from."""
    from ..checkpoints import load_model
    from ..registry import FALLBACK_MODEL, network_of, shipped_checkpoint
    from ..train.config import TrainConfig, load_toml

    if model_config is None:
        config = load_model(shipped_checkpoint(network_of(FALLBACK_MODEL))).config
        source = f"the network of {FALLBACK_MODEL}"
    else:
        config, source = TrainConfig.from_dict(load_toml(model_config)).model, str(model_config)
    return dataclasses.replace(config, attn_mask_ratio=tuple(attn_mask)), source


def one_forward_step(run, noisy, clean, generator, ratio, shortcut: bool) -> None:
    """``Run.step`` with the whole batch in one forward: the plain route (``shortcut`` False), as
    training ran before the training route, or the training route on intra-op threads."""
    import torch.nn.functional as F

    from ..train.loop import ema_update

    out = run.model(noisy, generator=generator, shortcut=shortcut, mask_ratio=ratio)
    loss = F.l1_loss(out, clean)
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    run.optimizer.step()
    run.scheduler.step()
    ema_update(run.ema, run.model, run.config.ema_decay)


def run_train_speed(
    model_config: str | os.PathLike | None = None,
    *,
    threads: int | None = None,
    batch: int = 8,
    patch: int = 64,
    iterations: int = 5,
    warmup: int = 1,
    attn_mask: tuple[int, int] = (75, 75),
    input_mask: tuple[int, int] = (80, 90),
    sgemm_n: int = 2048,
    one_forward: bool = False,
    seed: int = 0,
    on_progress: Progress | None = None,
    on_total: Callable[[int], None] | None = None,
) -> dict:
    """Time ``iterations`` training steps of each route after ``warmup`` untimed ones, alternating.

    Per route: the step times, their median, patches/s, effective GFLOP/s and its share of the
    sgemm rate; the route's row also its speed-up over the plain route. ``one_forward`` adds a
    third: the route with the whole batch in one forward on intra-op threads (no parts). Also the
    data pipeline's time for a batch (``PatchBatches``, which training runs on the main thread on
    the CPU).
    """
    import torch

    from ..train.config import TrainConfig
    from ..train.loop import Run

    if threads is not None:
        torch.set_num_threads(threads)
    if batch < 1 or patch < 8 or iterations < 1 or warmup < 0:
        raise ValueError("batch >= 1, patch size >= 8, iterations >= 1 and warmup >= 0, please")
    config, source = network_config(model_config, attn_mask)
    train_config = TrainConfig(model=config, batch_size=batch, patch_size=patch, input_mask=tuple(input_mask),
                               seed=seed, lr=1e-4, milestones=())
    device = torch.device("cpu")
    names = ("plain", "route", "route, one forward") if one_forward else ("plain", "route")
    runs = {name: Run.build(train_config, device, None) for name in names}  # seeded: same weights
    (noisy, clean), data_ms = _timed_batch(patch, batch, warmup + iterations, input_mask, seed)
    if on_total:
        on_total(1 + len(names) * (warmup + iterations))
    ceiling = sgemm_gflops(device, sgemm_n)
    if on_progress:
        on_progress(f"sgemm {sgemm_n}")
    steps = _steps(noisy, clean, tuple(attn_mask), names)
    times = _alternate(steps, runs, warmup, iterations, seed, on_progress)
    macs = macs_per_pixel(config)
    flop_per_step = 3 * 2 * macs * patch * patch * batch  # the backward's work is about twice the forward's
    rows = _rows(times, flop_per_step, batch, ceiling)
    return {
        "schema": "mitdenoise.bench.train/1",
        "config": {
            "model_config": json_config(config), "network_from": source, "threads": torch.get_num_threads(),
            "batch": batch, "patch": patch, "iterations": iterations, "warmup": warmup,
            "attn_mask": list(attn_mask), "input_mask": list(input_mask), "seed": seed,
            "macs_per_pixel": macs, "gflop_per_step": flop_per_step / 1e9, "torch": torch.__version__,
            "routes": ROUTE_DESCRIPTION,
        },
        "sgemm": {str(device): ceiling},
        "rows": rows,
        "data_ms_per_batch": data_ms,
        "notes": [],
    }


def _timed_batch(patch: int, batch: int, steps: int, input_mask, seed: int) -> tuple[tuple, float]:
    """The batch every step trains on, and the data pipeline's median time for one (ms)."""
    from ..train.data import PatchBatches

    image = synthetic_image(max(256, patch), max(256, patch), seed)
    data = PatchBatches([image], patch_size=patch, batch_size=batch, steps=steps + 3, seed=seed,
                        noise_sigma=15.0, mask_ratio=tuple(input_mask))
    times = []
    for step in range(1, 4):
        start = time.perf_counter()
        data[step]
        times.append(time.perf_counter() - start)
    return data[0], 1000 * statistics.median(times)


def _steps(noisy, clean, ratio: tuple[int, int], names: Sequence[str]) -> dict[str, Callable]:
    """One training step a route, by name: ``step(run, generator)``."""
    import torch

    no_autocast = torch.autocast("cpu", enabled=False)
    steps = {
        "plain": lambda run, g: one_forward_step(run, noisy, clean, g, ratio, shortcut=False),
        "route": lambda run, g: run.step(noisy, clean, g, no_autocast),
        "route, one forward": lambda run, g: one_forward_step(run, noisy, clean, g, ratio, shortcut=True),
    }
    return {name: steps[name] for name in names}


def _alternate(steps: dict, runs: dict, warmup: int, iterations: int, seed: int, on_progress) -> dict[str, list[float]]:
    """Each route's step times, the routes taking turns step by step (so a drift in the machine's
    speed falls on all of them); the first ``warmup`` rounds untimed."""
    import torch

    times: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(warmup + iterations):
        for name, step in steps.items():
            generator = torch.Generator().manual_seed(seed + i)  # both routes draw the same masks
            start = time.perf_counter()
            step(runs[name], generator)
            elapsed = time.perf_counter() - start
            if i >= warmup:
                times[name].append(elapsed)
            if on_progress:
                on_progress(f"{name} step {i + 1}{' (warm-up)' if i < warmup else ''}")
    return times


def _rows(times: dict[str, list[float]], flop_per_step: float, batch: int, ceiling: dict) -> list[dict]:
    """A result row a route: medians, patches/s, GFLOP/s and its share of sgemm, speed-up over plain."""
    rows = []
    for name, values in times.items():
        median = statistics.median(values)
        gflops = flop_per_step / median / 1e9
        rows.append({
            "route": name, "times_s": values, "median_s": median, "min_s": min(values),
            "patches_per_s": batch / median, "gflops_effective": gflops,
            "fraction_of_sgemm": gflops / ceiling["gflops"] if ceiling["gflops"] else None,
        })
    for row in rows[1:]:
        row["speedup_vs_plain"] = rows[0]["median_s"] / row["median_s"]
    return rows


def train_speed_table(results: dict) -> ResultTable:
    """The training-speed table, for the result file and the terminal."""
    c = results["config"]
    table = ResultTable(
        f"Training step, batch {c['batch']} of {c['patch']}x{c['patch']}, attention mask {c['attn_mask']}, "
        f"input mask {c['input_mask']}, {c['threads']} thread(s), median of {c['iterations']} alternating steps "
        f"after {c['warmup']} warm-up; network: {c['network_from']}.",
        ["route", "median s/step", "patches/s", "GFLOP/s", "of sgemm", "vs plain"],
    )
    for r in results["rows"]:
        speedup = f"**{r['speedup_vs_plain']:.2f}x**" if "speedup_vs_plain" in r else "1.00x"
        table.rows.append([r["route"], f"{r['median_s']:.3f}", f"{r['patches_per_s']:.2f}",
                           f"{r['gflops_effective']:.1f}", f"{100 * r['fraction_of_sgemm']:.1f}%", speedup])
    table.notes += sgemm_lines(results)
    table.notes.append(f"GFLOP/s counts {c['gflop_per_step']:.2f} GFLOP a step (3 x the plain forward's "
                       f"{c['macs_per_pixel']:,} multiply-adds per pixel). Data pipeline: "
                       f"{results['data_ms_per_batch']:.1f} ms a batch.")
    table.notes += [f"- {n}" for n in results["notes"]]
    return table


def write_train_speed_outputs(results: dict, out_dir: str | os.PathLike) -> None:
    write_results(results, out_dir, "train-speed", train_speed_table(results).markdown())
