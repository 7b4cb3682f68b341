"""Turn the user's inputs (files, folders, globs) and output into a list of jobs, and run them.

Rules (also in the README):
- one input file and an output with an image extension: that exact file; with any other
  extension (``out.gif``, ``out.jpg2``) an error, unless the output is an existing folder or
  ends with a slash, rather than a folder named like a file;
- otherwise the output is a folder (created if missing) and each input ``name.ext``
  becomes ``<out>/<name><suffix>.<ext or --format>``; folders are read one level deep;
- two inputs that would land on the same output file are an error before anything runs;
- an existing output is skipped (so an interrupted run resumes), unless ``overwrite``;
- an output that is the input itself is refused unless ``overwrite``;
- an input that is another input's output (a folder into itself with a suffix, run again) is left out.
"""

from __future__ import annotations

import glob
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .errors import JobPlanError, MitdenoiseError, first_line
from .imageio import SUPPORTED_SUFFIXES, check_writable, image_files, read_image, write_image


@dataclass(frozen=True)
class Job:
    source: Path
    target: Path


@dataclass
class RunSummary:
    done: list[Job] = field(default_factory=list)
    skipped: list[Job] = field(default_factory=list)
    failed: list[tuple[Job, str]] = field(default_factory=list)
    megapixels: float = 0.0
    seconds: float = 0.0


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Files, folders (their image files, sorted) and globs, in the order given, without repeats."""
    found: list[Path] = []
    for spec in inputs:
        path = Path(spec)
        if path.is_dir():
            found += image_files(path)
        elif path.exists() or path.is_symlink():
            found.append(path)
        elif glob.has_magic(spec):
            matches = sorted(Path(p) for p in glob.glob(spec) if Path(p).is_file())
            if not matches:
                raise JobPlanError(f"no files match {spec}")
            found += [p for p in matches if p.suffix.lower() in SUPPORTED_SUFFIXES]
        else:
            raise JobPlanError(f"input not found: {spec}")
    unique = list(dict.fromkeys(found))
    if not unique:
        raise JobPlanError(f"no image files in {', '.join(inputs)} (supported: {', '.join(sorted(SUPPORTED_SUFFIXES))})")
    return unique


def plan_jobs(inputs: list[str], output: str, *, suffix: str = "", fmt: str | None = None) -> list[Job]:
    if "/" in suffix or os.sep in suffix or (os.altsep and os.altsep in suffix) or "\0" in suffix:
        # '/../x' would write outside the output folder (and with --overwrite, over any file)
        raise JobPlanError(f"--suffix {suffix!r} must be part of a file name: no path separators")
    sources = expand_inputs(inputs)
    out = Path(output)
    if fmt is not None:
        fmt = "." + fmt.lower().lstrip(".")
        if fmt not in SUPPORTED_SUFFIXES:
            raise JobPlanError(f"unsupported output format {fmt}: use one of {', '.join(sorted(SUPPORTED_SUFFIXES))}")
    single_file = len(sources) == 1 and not out.is_dir() and out.suffix.lower() in SUPPORTED_SUFFIXES
    if single_file and Path(inputs[0]).is_dir():
        single_file = False
    if single_file:
        return [Job(sources[0], out)]
    if (
        len(inputs) == 1
        and Path(inputs[0]).is_file()
        and out.suffix
        and not out.exists()
        and not output.endswith(("/", os.sep))
    ):
        raise JobPlanError(
            f"cannot write {out}: unknown image format {out.suffix}; use one of {', '.join(sorted(SUPPORTED_SUFFIXES))}"
            f" (for a new folder of that name, end it with /)"
        )
    if out.exists() and not out.is_dir():
        raise JobPlanError(f"output {out} is a file, but {len(sources)} inputs need an output folder")
    if out.suffix.lower() in SUPPORTED_SUFFIXES and not out.exists():
        raise JobPlanError(f"{len(sources)} inputs need an output folder, but {out} looks like a file name")
    jobs = [Job(s, out / f"{s.stem}{suffix}{fmt or s.suffix}") for s in sources]
    by_target: dict[Path, Path] = {}
    for job in jobs:
        key = _key(job.target)
        if key in by_target:
            raise JobPlanError(
                f"{by_target[key]} and {job.source} would both be written to {job.target}: use --suffix or --format, or separate runs"
            )
        by_target[key] = job.source
    # A folder denoised into itself with a suffix: a.png -> a_dn.png. On a re-run a_dn.png is an
    # input too; it is another job's output, not a new image, so it is left out (no a_dn_dn.png).
    return [job for job in jobs if by_target.get(_key(job.source), job.source) == job.source]


def _key(path: Path) -> Path:
    return Path(os.path.normcase(os.path.abspath(path)))


def same_file(a: Path, b: Path) -> bool:
    try:
        return b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def run_jobs(
    jobs: list[Job],
    transform: Callable,
    *,
    overwrite: bool = False,
    on_start: Callable[[Job, int], None] | None = None,
    on_end: Callable[[Job, str], None] | None = None,
    should_stop: Callable[[], bool] = lambda: False,
) -> RunSummary:
    """Turn each job's source into its target (denoise it, add noise...); a failure is recorded
    and the rest go on; ``should_stop`` is asked before each job (a stop signal).

    ``transform(job, image)`` maps the source's ``imageio.Image`` to the target's.
    ``on_start(job, pixels)`` and ``on_end(job, status)`` drive progress display.
    """
    summary = RunSummary()
    start = time.perf_counter()
    for job in jobs:
        if should_stop():
            break
        if same_file(job.source, job.target) and not overwrite:
            summary.failed.append((job, f"{job.target} is the input file itself; pass --overwrite to replace it"))
            _notify(on_end, job, "failed")
            continue
        if job.target.exists() and not overwrite:
            summary.skipped.append(job)
            _notify(on_end, job, "skipped")
            continue
        try:
            image = read_image(job.source)
            # what would fail at writing fails now, before minutes of denoising
            check_writable(job.target, image)
            if job.target.parent != Path("") and not job.target.parent.exists():
                job.target.parent.mkdir(parents=True, exist_ok=True)
            h, w = image.pixels.shape[:2]
            if on_start:
                on_start(job, h * w)
            result = transform(job, image)
            del image  # the input pixels aren't needed to write: free them before the encoder's buffers
            write_image(job.target, result, overwrite=True)
        except MitdenoiseError as e:
            summary.failed.append((job, str(e)))
            _notify(on_end, job, "failed")
            continue
        except OSError as e:
            summary.failed.append((job, f"cannot write {job.target}: {e.strerror or e}"))
            _notify(on_end, job, "failed")
            continue
        except Exception as e:  # a decoder or the network failing on one odd file must not stop the others
            reason = first_line(e) if str(e).strip() else ""
            summary.failed.append((job, f"failed on {job.source}: {type(e).__name__}: {reason}"[:300]))
            _notify(on_end, job, "failed")
            continue
        summary.done.append(job)
        summary.megapixels += h * w / 1e6
        _notify(on_end, job, "done")
    summary.seconds = time.perf_counter() - start
    return summary


def _notify(callback, job, status):
    if callback:
        callback(job, status)
