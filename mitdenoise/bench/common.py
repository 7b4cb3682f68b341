"""What the benchmarks share: the made-up test image, number formatting, the progress callback type,
the sgemm line, the results table and the result files."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..files import write_text_atomically
from ..imageio import from_float

Progress = Callable[[str], None]
"""Called with a short description after each unit of work (for a progress bar)."""


def synthetic_image(height: int = 256, width: int = 256, seed: int = 0) -> np.ndarray:
    """A made-up (H, W, 3) uint8 test image: smooth colour gradients, hard-edged shapes, fine stripes."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
    img = np.stack(
        [
            0.5 + 0.3 * np.sin(2 * np.pi * (xx + 0.3 * c) * (1 + c)) * np.cos(2 * np.pi * yy * (1 + 0.5 * c))
            for c in range(3)
        ],
        axis=-1,
    )
    for _ in range(6):
        cy, cx, r = rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.9), rng.uniform(0.05, 0.2)
        colour = rng.uniform(0, 1, 3)
        if rng.random() < 0.5:
            inside = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        else:
            inside = (abs(yy - cy) < r) & (abs(xx - cx) < r * 0.6)
        img[inside] = colour
    stripes = (np.sin(2 * np.pi * xx * 40) > 0) & (yy > 0.8)
    img[stripes] *= 0.6
    return from_float(img, np.uint8)


def format_number(value: float | None, digits: int) -> str:
    """``value`` to ``digits`` decimals; '-' for None, 'inf' for infinity (PSNR of identical images)."""
    if value is None:
        return "-"
    if math.isinf(value):
        return "inf"
    return f"{value:.{digits}f}"


@dataclass
class ResultTable:
    """A benchmark's table, built once from its results and rendered twice: as Markdown into the
    result files (:meth:`markdown`) and by the command line with rich. Cells are Markdown text,
    ``**...**`` marking a best value."""

    title: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    """Lines under the table: the sgemm ceiling, what the numbers count, the run's notes."""
    text_columns: int = 1
    """How many leading columns hold names (left-aligned); the rest hold numbers."""

    def markdown(self) -> str:
        lines = [self.title, ""] if self.title else []
        lines += ["| " + " | ".join(self.columns) + " |", "|" + "---|" * len(self.columns)]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        if self.notes:
            lines.append("")
            lines += self.notes
        return "\n".join(lines) + "\n"


def sgemm_lines(results: dict) -> list[str]:
    """One line per device and precision: the GEMM ceilings a benchmark measured beside its runs."""
    ceilings = [(s, "float32") for s in results["sgemm"].values()]
    ceilings += [(s, "bf16") for s in results.get("bf16_gemm", {}).values()]
    return [
        f"{'sgemm' if kind == 'float32' else 'GEMM'} {s['n']}x{s['n']} {kind} on {s['device']}: "
        f"{s['gflops']:.1f} GFLOP/s (median of {s['runs']})."
        for s, kind in ceilings
    ]


def write_results(results: dict, out_dir: str | os.PathLike, stem: str, markdown: str) -> None:
    """``<stem>.json`` (the results) and ``<stem>.md`` (``markdown``) in ``out_dir``, made if missing."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomically(out / f"{stem}.json", json.dumps(results, indent=2) + "\n")
    write_text_atomically(out / f"{stem}.md", markdown)
