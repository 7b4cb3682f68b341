"""Progress of a training run: ``log.jsonl`` (rank 0), and a rich bar or plain lines on stderr."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


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
