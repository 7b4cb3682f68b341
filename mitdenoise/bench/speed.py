"""The speed benchmark: megapixels per second and peak memory of the tiled denoiser.

For sizes x tiles x batch sizes x precisions x devices, side by side with the
straightforward reference (whole image, one forward pass, attention mask drawn with
NumPy on the host per layer, as the authors' code does), and the machine's sgemm
rate as a practical ceiling for the network's multiply-adds per pixel.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from ..imageio import from_float, to_float
from ..defaults import DEFAULT_OVERLAP
from .common import Progress, ResultTable, format_number, sgemm_lines, synthetic_image, write_results

MACS_PER_PIXEL_RELEASED = 959_445
"""Multiply-adds per pixel of the released network (see shared fixtures README): 1.92 TFLOP per megapixel."""


def macs_per_pixel(config) -> int:
    """Multiply-adds per (padded) pixel of a :class:`~mitdenoise.model.ModelConfig`.

    Per Swin block: qkv 3C^2, q@k^T and attn@v N C each (N tokens per window), proj
    C^2, MLP 2 C hidden; per RSTB and after the body a 3conv (9 C C/4 + C^2/16 +
    9 C/4 C) or a 3x3 conv; plus conv_first and conv_last. 959,445 for the released config.
    """
    c, n = config.embed_dim, config.window_size**2
    hidden = int(c * config.mlp_ratio)
    block = 3 * c * c + 2 * n * c + c * c + 2 * c * hidden
    if config.resi_connection == "3conv":
        conv = 9 * c * (c // 4) + (c // 4) ** 2 + 9 * (c // 4) * c
    else:
        conv = 9 * c * c
    ends = config.conv_first_kernel**2 * config.in_chans * c + 9 * c * config.in_chans
    return sum(config.depths) * block + (len(config.depths) + 1) * conv + ends


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """``"256,512x384"`` -> [(256, 256), (512, 384)] (height x width)."""
    sizes = []
    for part in text.split(","):
        part = part.strip().lower()
        if not part:
            continue
        try:
            h, _, w = part.partition("x")
            size = (int(h), int(w or h))
        except ValueError:
            raise ValueError(f"bad size {part!r}: use N or HxW, e.g. 256 or 512x384") from None
        if min(size) < 8:
            raise ValueError(f"bad size {part!r}: at least 8 pixels per side")
        sizes.append(size)
    if not sizes:
        raise ValueError("no sizes given")
    return sizes


def parse_ints(text: str, what: str, minimum: int = 1) -> list[int]:
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"bad {what} list {text!r}: use integers separated by commas") from None
    if not values or min(values) < minimum:
        raise ValueError(f"bad {what} list {text!r}: integers >= {minimum}")
    return values


def parse_words(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def peak_rss_mb() -> float:
    """This process's peak resident set size (getrusage ru_maxrss) in MiB."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024**2 if sys.platform == "darwin" else rss / 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark to the current RSS (Linux ``clear_refs`` 5); False if not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_runs(fn: Callable[[], object], device, runs: int, warmup: int) -> list[float]:
    """Wall times of ``runs`` calls after ``warmup`` untimed ones (CUDA synchronised)."""
    for _ in range(warmup):
        fn()
        _sync(device)
    times = []
    for _ in range(runs):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def sgemm_gflops(device, n: int = 2048, runs: int = 5, dtype: str = "fp32") -> dict:
    """Median rate of an n x n matmul on ``device`` (float32, or bf16 for ``dtype="bf16"``):
    the practical FLOP ceiling of that precision."""
    import torch

    g = torch.Generator().manual_seed(0)
    kind = torch.bfloat16 if dtype == "bf16" else torch.float32
    a = torch.randn(n, n, generator=g).to(device, kind)
    b = torch.randn(n, n, generator=g).to(device, kind)
    times = time_runs(lambda: torch.mm(a, b), device, runs, warmup=1)
    median = statistics.median(times)
    return {"device": str(device), "n": n, "runs": runs, "median_s": median, "gflops": 2 * n**3 / median / 1e9,
            "dtype": dtype}


def host_numpy_mask_drawer(seed: int = 0) -> tuple[Callable, list[int]]:
    """A keep-mask drawer for ``SwinIR.forward(draw_mask=...)`` that draws as the authors' code
    does: a ratio from ``randint``, then ``np.random.choice`` on the host, per layer. Returns the
    drawer and a one-item list counting its draws."""
    state = np.random.RandomState(seed)
    calls = [0]

    def draw(shape, ratio_range, generator, device):
        import torch

        low, high = ratio_range
        if high == 0:
            return None
        calls[0] += 1
        ratio = state.randint(low, high + 1) / 100
        mask = state.choice([0, 1], size=shape[:-1], p=[ratio, 1 - ratio])
        return torch.from_numpy(mask).to(device).unsqueeze(-1).to(torch.float32)

    return draw, calls


class HostMaskReference:
    """The straightforward way to run the network: the whole image in one fp32 forward pass,
    attention masks drawn with NumPy on the host per layer (see :func:`host_numpy_mask_drawer`),
    image rolled and partitioned, plain attention over all windows at once.

    Shares the weights of ``model``; the comparison point for the tiled denoiser's speed.
    """

    def __init__(self, model, device, seed: int = 0) -> None:
        self.model = model.to(device).eval()
        self.device = device
        self.seed = seed

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        import torch

        x = torch.from_numpy(to_float(pixels, np.float64).astype(np.float32).transpose(2, 0, 1).copy())[None].to(self.device)
        draw, calls = host_numpy_mask_drawer(self.seed)
        with torch.inference_mode():
            y = self.model(x, shortcut=False, chunked=False, draw_mask=draw)
        if self.model.config.mask_enabled and calls[0] == 0:
            raise RuntimeError("the network did not draw its attention masks through the drawer it was given")
        return from_float(y.clamp(0, 1)[0].permute(1, 2, 0).float().cpu().numpy(), pixels.dtype)


REFERENCE_DESCRIPTION = (
    "whole image, one fp32 forward, NumPy host mask per layer, plain attention, no window chunking, "
    "in a fresh process with glibc's default malloc settings"
)


def measure_reference(
    model_path, device, size: tuple[int, int], seed: int, runs: int, warmup: int, threads: int
) -> dict | None:
    """Time :class:`HostMaskReference` in a child process; None if it dies (e.g. out of memory).

    A child, because the reference must see the allocator as the authors' script does
    (the tiled path changes it process-wide, see ``keep_freed_buffers_for_reuse``), and
    so that its peak RSS is its own.
    """
    with tempfile.TemporaryDirectory(prefix="mitdenoise-reference-") as folder:
        result = Path(folder) / "row.json"
        args = json.dumps(dict(model=str(model_path), device=str(device), size=list(size), seed=seed, runs=runs,
                               warmup=warmup, threads=threads, parent=os.getpid(), out=str(result)))
        code = "import sys; from mitdenoise.bench.speed import reference_child; reference_child(sys.argv[1])"
        run = subprocess.run([sys.executable, "-c", code, args], capture_output=True, text=True)
        if run.returncode != 0 or not result.is_file():
            return None
        return json.loads(result.read_text())


def die_with_parent(parent: int) -> None:
    """Linux: have the kernel kill this process when ``parent`` ends, however it ends.

    A bench stopped with SIGTERM or SIGKILL would otherwise leave its reference child
    running on for minutes, with gigabytes of memory.
    """
    if sys.platform != "linux":
        return
    import ctypes
    import signal

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent ended before the call above
        os._exit(1)


def reference_child(args_json: str) -> None:
    """The child process of :func:`measure_reference`: time the reference, write its JSON row to ``out``."""
    import torch

    from ..checkpoints import load_model

    args = json.loads(args_json)
    die_with_parent(args["parent"])
    torch.set_num_threads(args["threads"])
    device = torch.device(args["device"])
    image = synthetic_image(*args["size"], args["seed"])
    ref = HostMaskReference(load_model(args["model"]), device, args["seed"])
    Path(args["out"]).write_text(json.dumps(_measure(lambda: ref(image), device, args["runs"], args["warmup"])))


def run_speed(
    model: str | os.PathLike | None = None,
    *,
    sizes: Sequence[tuple[int, int]] = ((256, 256),),
    tiles: Sequence[int] = (128, 256),
    batch_sizes: Sequence[int] = (1,),
    precisions: Sequence[str] = ("fp32",),
    devices: Sequence[str] = ("auto",),
    threads: int | None = None,
    runs: int = 3,
    warmup: int = 1,
    tile_overlap: int = DEFAULT_OVERLAP,
    reference: bool = True,
    sgemm_n: int = 2048,
    seed: int = 0,
    on_progress: Progress | None = None,
    on_total: Callable[[int], None] | None = None,
) -> dict:
    """Time the tiled denoiser for every combination, and the reference, on synthetic images.

    Per row: median seconds of ``runs`` after ``warmup``, MP/s, effective GFLOP/s
    (``2 * macs_per_pixel * MP/s``, image pixels only), its fraction of the sgemm
    rate (and of the bf16 GEMM rate for bf16 rows, measured beside it where bf16 is asked
    for), peak RSS (reset before each row where Linux allows it) and on CUDA the peak
    allocated memory; tiled rows also get the speed-up over the reference of the same
    device and size. Combinations that can't run here (no CUDA, no bf16) become notes.
    """
    import torch

    from ..checkpoints import load_model
    from ..devices import computes_bf16

    if threads is not None:
        torch.set_num_threads(threads)
    notes: list[str] = []
    model, model_path = _network_to_time(model, notes)
    net = load_model(model_path)
    macs = macs_per_pixel(net.config)
    targets = _devices(devices, notes)
    combos = [(p, t, b) for p in precisions for t in tiles for b in batch_sizes]
    if on_total:
        on_total(len(targets) * (1 + len(sizes) * (len(combos) + (1 if reference else 0))))

    sgemm, bf16_gemm, rows = {}, {}, []
    for device in targets:
        sgemm[str(device)] = sgemm_gflops(device, sgemm_n)
        if "bf16" in precisions and computes_bf16(device):
            bf16_gemm[str(device)] = sgemm_gflops(device, sgemm_n, dtype="bf16")
        if on_progress:
            on_progress(f"sgemm {sgemm_n} on {device}")
        for size in sizes:
            size_rows = _tiled_rows(net, device, size, combos, tile_overlap, seed, runs, warmup, notes, on_progress)
            if reference:
                _add_reference(size_rows, model_path, device, size, seed, runs, warmup, notes, on_progress)
            rows += size_rows
    for row in rows:
        _add_rates(row, macs, sgemm[row["device"]], bf16_gemm.get(row["device"]))
    return {
        "schema": "mitdenoise.bench.speed/1",
        "config": {
            "model": str(model), "model_config": json_config(net.config),
            "macs_per_pixel": macs, "tflop_per_megapixel": 2 * macs * 1e6 / 1e12,
            "runs": runs, "warmup": warmup, "threads": torch.get_num_threads(), "seed": seed,
            "torch": torch.__version__, "peak_rss_per_row": all(r["peak_rss_is_per_row"] for r in rows),
            "reference": REFERENCE_DESCRIPTION,
        },
        "sgemm": sgemm,
        "bf16_gemm": bf16_gemm,
        "rows": rows,
        "notes": notes,
    }


def _network_to_time(model, notes: list[str]) -> tuple[str, Path]:
    """The model's name and the checkpoint to time: a route's network stands in for the route."""
    from ..registry import network_of, resolve, shipped_checkpoint

    resolved = resolve(model)
    notes += [resolved.notice] if resolved.notice else []
    if resolved.path is not None:
        return resolved.name, resolved.path
    network = network_of(resolved.name)
    notes.append(f"{resolved.name} times its network {network}; the noise estimate and the second stage come on top "
                 f"(docs/benchmarks.md)")
    return resolved.name, shipped_checkpoint(network)


def _devices(names: Sequence[str], notes: list[str]) -> list:
    """The devices named, each once; those not here become notes."""
    from ..devices import pick_device
    from ..errors import MitdenoiseError

    found = []
    for name in names:
        try:
            found.append(pick_device(name))
        except MitdenoiseError as e:
            notes.append(f"device {name} skipped: {e}")
    return list(dict.fromkeys(found))


def _tiled_rows(net, device, size, combos, tile_overlap, seed, runs, warmup, notes, on_progress) -> list[dict]:
    """One timed row per (precision, tile, batch) at ``size``; combinations refused here become notes."""
    from ..denoiser import Denoiser
    from ..errors import MitdenoiseError

    h, w = size
    image = synthetic_image(h, w, seed)
    rows = []
    for precision, tile, batch in combos:
        try:
            den = Denoiser(net, device=str(device), precision=precision, tile=tile, tile_overlap=tile_overlap,
                           batch_size=batch, seed=seed)
        except (MitdenoiseError, ValueError) as e:
            notes.append(f"{device} {precision} tile {tile} batch {batch} skipped: {e}")
            if on_progress:
                on_progress(f"skipped {precision} tile {tile}")
            continue
        row = _measure(lambda: den.denoise_array(image), device, runs, warmup)
        row.update(kind="tiled", device=str(device), precision=precision, height=h, width=w, tile=tile,
                   tile_overlap=tile_overlap, batch_size=batch, tiles=den.count_tiles(h, w))
        rows.append(row)
        if on_progress:
            on_progress(f"{h}x{w} tile {tile} batch {batch} {precision} on {device}")
    return rows


def _add_reference(size_rows, model_path, device, size, seed, runs, warmup, notes, on_progress) -> None:
    """Time the reference at ``size`` and give every row of ``size_rows`` its speed-up over it."""
    import torch

    h, w = size
    row = measure_reference(model_path, device, size, seed, runs, warmup, torch.get_num_threads())
    if row is None:
        notes.append(f"reference at {h}x{w} on {device} did not finish (out of memory?)")
        return
    row.update(kind="reference", device=str(device), precision="fp32", height=h, width=w, tile=None,
               tile_overlap=None, batch_size=1, tiles=1)
    for other in size_rows:
        other["speedup_vs_reference"] = row["median_s"] / other["median_s"]
    row["speedup_vs_reference"] = 1.0
    size_rows.append(row)
    if on_progress:
        on_progress(f"{h}x{w} reference on {device}")


def _add_rates(row: dict, macs: int, sgemm: dict, bf16_gemm: dict | None) -> None:
    """MP/s, s/MP, effective GFLOP/s and its share of the GEMM ceilings, into ``row``."""
    mp = row["height"] * row["width"] / 1e6
    row["megapixels"] = mp
    row["mp_per_s"] = mp / row["median_s"]
    row["s_per_mp"] = row["median_s"] / mp
    row["gflops_effective"] = 2 * macs * row["mp_per_s"] * 1e6 / 1e9
    row["fraction_of_sgemm"] = row["gflops_effective"] / sgemm["gflops"] if sgemm["gflops"] else None
    if row["precision"] == "bf16" and bf16_gemm and bf16_gemm["gflops"]:
        row["fraction_of_bf16_gemm"] = row["gflops_effective"] / bf16_gemm["gflops"]


def json_config(config) -> dict:
    import dataclasses

    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}


def _measure(fn: Callable[[], object], device, runs: int, warmup: int) -> dict:
    import torch

    gc.collect()
    per_row = reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    times = time_runs(fn, device, runs, warmup)
    row = {
        "runs": runs,
        "times_s": times,
        "median_s": statistics.median(times),
        "min_s": min(times),
        "peak_rss_mb": peak_rss_mb(),
        "peak_rss_is_per_row": per_row,
        "cuda_peak_mb": torch.cuda.max_memory_allocated(device) / 1024**2 if device.type == "cuda" else None,
    }
    return row


def speed_table(results: dict) -> ResultTable:
    """The speed table, for the result file and the terminal."""
    c = results["config"]
    table = ResultTable(
        f"Speed, median of {c['runs']} after {c['warmup']} warm-up, {c['threads']} CPU thread(s).",
        ["device", "precision", "size", "tile", "batch", "median s", "MP/s", "s/MP", "GFLOP/s", "of sgemm",
         "of bf16 GEMM", "peak RSS MiB", "CUDA MiB", "vs reference"],
        text_columns=3,
    )
    for r in results["rows"]:
        reference = r["kind"] == "reference"
        speedup = "1.00x" if reference else (f"**{r['speedup_vs_reference']:.2f}x**" if "speedup_vs_reference" in r else "-")
        table.rows.append([
            r["device"], r["precision"], f"{r['height']}x{r['width']}", "whole (reference)" if reference else str(r["tile"]),
            str(r["batch_size"]), f"{r['median_s']:.3f}", f"{r['mp_per_s']:.4f}", f"{r['s_per_mp']:.1f}",
            f"{r['gflops_effective']:.1f}", f"{100 * r['fraction_of_sgemm']:.1f}%",
            f"{100 * r['fraction_of_bf16_gemm']:.1f}%" if "fraction_of_bf16_gemm" in r else "-", f"{r['peak_rss_mb']:.0f}",
            format_number(r["cuda_peak_mb"], 0), speedup,
        ])
    table.notes += sgemm_lines(results)
    for device, s in results["sgemm"].items():
        best = max((r for r in results["rows"] if r["device"] == device), key=lambda r: r["mp_per_s"], default=None)
        if best is not None:
            table.notes.append(f"Best row on {device}: {best['gflops_effective']:.1f} GFLOP/s effective = "
                               f"{100 * best['fraction_of_sgemm']:.1f}% of sgemm.")
    groups: dict[tuple, list[dict]] = {}
    for r in results["rows"]:
        if r["kind"] == "tiled" and "speedup_vs_reference" in r:
            groups.setdefault((r["device"], r["height"], r["width"]), []).append(r)
    for (device, h, w), rows in groups.items():
        best = max(rows, key=lambda r: r["speedup_vs_reference"])
        table.notes.append(f"{h}x{w} on {device}: the tiled path at best {best['speedup_vs_reference']:.2f}x the "
                           f"reference ({best['precision']}, tile {best['tile']}, batch {best['batch_size']}).")
    table.notes.append(f"Network cost: {c['macs_per_pixel']:,} multiply-adds per pixel = {c['tflop_per_megapixel']:.2f} "
                       f"TFLOP per megapixel; GFLOP/s counts image pixels only. Reference: {c['reference']}. Peak RSS "
                       f"{'reset before each row' if c['peak_rss_per_row'] else 'is the process peak so far'}.")
    table.notes += [f"- {n}" for n in results["notes"]]
    return table


def write_speed_outputs(results: dict, out_dir: str | os.PathLike) -> None:
    write_results(results, out_dir, "speed", speed_table(results).markdown())
