"""Progress of a training run: ``log.jsonl`` (rank 0), and what a watcher is told.

The library never writes to the terminal. A run tells a :class:`TrainObserver` (the command
line's progress bar or log lines) what happens; without one it logs the same lines through
``logging`` (logger ``mitdenoise.train``), which stays silent unless the caller configures it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Protocol

logger = logging.getLogger("mitdenoise.train")


class TrainObserver(Protocol):
    """What a training run tells whoever watches it (rank 0 only)."""

    def start(self, iteration: int, total: int) -> None:
        """The run starts (or resumes) at ``iteration`` of ``total``."""

    def message(self, text: str) -> None:
        """A note for the user (one line)."""

    def step(self, iteration: int) -> None:
        """An iteration finished."""

    def metrics(self, record: dict[str, Any]) -> None:
        """A log record with ``iteration`` and some of ``loss``, ``lr``, ``it_per_s``, ``psnr_*``."""

    def close(self) -> None:
        """The run ends (also after an error)."""


class LoggingObserver:
    """The default watcher: the log lines through ``logging`` (INFO)."""

    def __init__(self) -> None:
        self.total = 0
        self.psnr = ""

    def start(self, iteration: int, total: int) -> None:
        self.total = total

    def message(self, text: str) -> None:
        logger.info(text)

    def step(self, iteration: int) -> None:
        pass

    def metrics(self, record: dict[str, Any]) -> None:
        self.psnr = psnr_text(record) or self.psnr
        logger.info(metrics_line(record, self.total, self.psnr))

    def close(self) -> None:
        pass


class Reporter:
    """``log.jsonl`` (rank 0) and the observer; on other ranks both stay silent."""

    def __init__(self, run_dir: Path, total: int, start: int, enabled: bool, observer: TrainObserver | None) -> None:
        self.enabled = enabled
        self.log_path = run_dir / "log.jsonl"
        self.observer = (observer or LoggingObserver()) if enabled else None
        if self.observer is not None:
            self.observer.start(start, total)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.log_path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def message(self, text: str) -> None:
        if self.observer is not None:
            self.observer.message(text)

    def step(self, iteration: int) -> None:
        if self.observer is not None:
            self.observer.step(iteration)

    def metrics(self, record: dict[str, Any]) -> None:
        if self.observer is not None:
            self.observer.metrics(record)

    def close(self) -> None:
        if self.observer is not None:
            self.observer.close()
            self.observer = None


def psnr_text(record: dict[str, Any]) -> str:
    """``"psnr gaussian15 30.39 poisson2 29.77"`` from a record's ``psnr_*`` keys; "" if none."""
    psnrs = {k.removeprefix("psnr_"): v for k, v in record.items() if k.startswith("psnr_")}
    return "psnr " + " ".join(f"{k} {v:.2f}" for k, v in psnrs.items()) if psnrs else ""


def metrics_line(record: dict[str, Any], total: int, psnr: str = "") -> str:
    """One log line: ``it 500/60000  loss 0.0271  lr 1.00e-04  0.58 it/s  eta 28h21m  psnr ...``."""
    parts = [f"it {record['iteration']}/{total}", f"loss {record['loss']:.4f}" if "loss" in record else "loss -"]
    if "lr" in record:
        parts.append(f"lr {record['lr']:.2e}")
    if "it_per_s" in record:
        parts.append(f"{record['it_per_s']:.2f} it/s")
        remaining = (total - record["iteration"]) / max(record["it_per_s"], 1e-9)
        parts.append(f"eta {duration(remaining)}")
    if psnr:
        parts.append(psnr)
    return "  ".join(parts)


def duration(seconds: float) -> str:
    """``3725`` -> ``"1h02m"``; under an hour ``"12m05s"``."""
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
