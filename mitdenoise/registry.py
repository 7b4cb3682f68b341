"""The model registry, download and cache: from a model spec to a local checkpoint file.

Registry names point at our shipped checkpoints (``weights/``, works offline) or the
authors' files on GitHub. Those are downloaded once into the Hugging Face cache
(``<HF_HUB_CACHE>/mitdenoise/``), verified against their git blob id, converted to
safetensors (:func:`mitdenoise.checkpoints.convert_checkpoint`) and used from there
afterwards; ``hf://`` files go through ``huggingface_hub.hf_hub_download`` into the same
cache. The default model is the authors' masked checkpoint, with a shipped one standing in
where it can't be had (:func:`resolve_default`). ``HF_HOME``, ``HF_HUB_CACHE``,
``HF_HUB_OFFLINE`` and ``HF_ENDPOINT`` are read when used (not at import), so a changed
environment is honoured.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import safe_open

from . import checkpoints
from .checkpoints import CONFIG_KEY, SOURCE_BLOB_KEY, SOURCE_KEY, convert_checkpoint, git_blob_id, human_size
from .defaults import DEFAULT_MODEL, DEFAULT_MODEL_TIMEOUT_S, FALLBACK_MODEL
from .errors import ModelLoadError, ModelUnavailableError, first_line
from .hub import HF_SCHEME, download_hf, hub_cache_dir, offline_mode
from .model import ModelConfig


# --- the registry -------------------------------------------------------------------------------

logger = logging.getLogger("mitdenoise.registry")

DownloadProgress = Callable[[str, int, "int | None"], None]
"""``(model name, bytes received so far, total bytes or None)``: called as a download starts
(with 0) and after each part, for a progress bar (the command line draws one with rich)."""

AUTHORS_REPO = "haoyuc/MaskedDenoising"
AUTHORS_COMMIT = "9cd4c62a7a82178d86f197e11f2d0ba3ab1fbd5a"
PAPER_CITATION = (
    "Chen, Gu, Liu, Abdel Magid, Dong, Wang, Pfister, Zhu. Masked Image Training for Generalizable Deep Image "
    "Denoising. CVPR 2023, pp. 1692-1703 (arXiv 2303.13132)"
)
AUTHORS_LICENSE = "not stated (no licence file found in haoyuc/MaskedDenoising; ask the authors before redistributing)"
OUR_LICENSE = "MIT (mitdenoise)"
OUR_CITATION = PAPER_CITATION + "; weights trained by the mitdenoise authors"


@dataclass(frozen=True)
class ModelEntry:
    """A named checkpoint: where it comes from, which network it is, under which terms.

    ``github_repo``/``commit``/``path``/``git_blob`` locate and verify a file on GitHub;
    an entry without ``github_repo`` is our shipped checkpoint (``path`` under
    ``weights/``). ``config`` is the whole config when known; otherwise the shapes
    give it, and ``global_residual``/``attn_mask_ratio`` the fields they can't tell.
    """

    name: str
    description: str
    license: str
    citation: str
    path: str
    github_repo: str | None = None
    commit: str | None = None
    git_blob: str | None = None
    size: int | None = None
    config: ModelConfig | None = None
    global_residual: bool = False
    attn_mask_ratio: tuple[int, int] = (75, 75)

    @property
    def shipped(self) -> bool:
        return self.github_repo is None

    @property
    def url(self) -> str | None:
        if self.github_repo is None:
            return None
        return f"{github_endpoint()}/{self.github_repo}/raw/{self.commit}/{self.path}"

    @property
    def known(self) -> dict:
        """What the registry says that shapes can't: passed to the config reader."""
        return {"global_residual": self.global_residual, "attn_mask_ratio": self.attn_mask_ratio}


REGISTRY: dict[str, ModelEntry] = {
    e.name: e
    for e in (
        ModelEntry(
            name="masked-denoising",
            description="the authors' masked-training model",
            license=AUTHORS_LICENSE,
            citation=PAPER_CITATION,
            github_repo=AUTHORS_REPO,
            commit=AUTHORS_COMMIT,
            path="model_zoo/input_mask_80_90.pth",
            git_blob="deafdf08ce4e6f69170f6f31bb3a32da9dee8cf5",
            global_residual=False,
            attn_mask_ratio=(75, 75),
        ),
        ModelEntry(
            name="mitdenoise-mild",
            description="ours: the baseline + a mild input mask",
            license=OUR_LICENSE,
            citation=OUR_CITATION,
            path="mitdenoise-mild.safetensors",
        ),
        ModelEntry(
            name="mitdenoise-camera",
            description="ours: blind, white + camera-structured noise",
            license=OUR_LICENSE,
            citation=OUR_CITATION,
            path="mitdenoise-camera.safetensors",
        ),
        ModelEntry(
            name="mitdenoise-baseline",
            description="ours, trained without masks",
            license=OUR_LICENSE,
            citation=OUR_CITATION,
            path="mitdenoise-baseline.safetensors",
        ),
        ModelEntry(
            name="masked-denoising-baseline",
            description="the authors' baseline, no masks",
            license=AUTHORS_LICENSE,
            citation=PAPER_CITATION,
            github_repo=AUTHORS_REPO,
            commit=AUTHORS_COMMIT,
            path="model_zoo/baseline.pth",
            git_blob="bd7ab9e05a0e45c32991a8c375ecd331d569768e",
            global_residual=False,
            attn_mask_ratio=(0, 0),
        ),
    )
}

PIPELINES: dict[str, dict[str, str]] = {
    "mitdenoise-auto": {"white": "mitdenoise-mild", "camera": "mitdenoise-camera"},
}
"""Shipped routes over several shipped networks (:mod:`mitdenoise.adaptive`): name -> role -> entry."""


def network_of(name: str) -> str:
    """The registry entry whose network ``name`` runs: itself, or for a route the network camera
    photos go through (all of a route's networks share one architecture)."""
    return PIPELINES[name]["camera"] if name in PIPELINES else name

REMOVED_MODELS = {
    name: (
        f"model {name!r} was removed: our undertrained masked checkpoint made images worse (weights/README.md "
        f"keeps its numbers); use {DEFAULT_MODEL}, the authors' masked checkpoint (the default)"
    )
    for name in ("mitdenoise", "mitdenoise-masked")
}
"""Names that are gone, and the one line that says so and what to use instead."""

_CHECKPOINT_SUFFIXES = (".pth", ".pt", ".safetensors", ".bin", ".ckpt")


# --- the environment, read when used ------------------------------------------------------------


def cache_dir() -> Path:
    """Where the converted authors' checkpoints live: ``<HF_HUB_CACHE>/mitdenoise``."""
    return hub_cache_dir() / "mitdenoise"


def github_endpoint() -> str:
    """Base URL of GitHub; MITDENOISE_GITHUB_ENDPOINT replaces it (a mirror, or a test server)."""
    return (os.environ.get("MITDENOISE_GITHUB_ENDPOINT") or "https://github.com").rstrip("/")


# --- resolving a model spec to a local file -----------------------------------------------------

SHIPPED_DIRS = (Path(__file__).resolve().parent / "_shipped", Path(__file__).resolve().parent.parent / "weights")
"""Where the shipped checkpoint is: inside an installed wheel, or weights/ of a source tree."""


def shipped_checkpoint(name: str) -> Path:
    """The file of a shipped registry entry (it may be missing: :func:`resolve_model` says so)."""
    candidates = [d / REGISTRY[name].path for d in SHIPPED_DIRS]
    return next((p for p in candidates if p.is_file()), candidates[-1])


def resolve_default(offline: bool = False, *, on_download: DownloadProgress | None = None) -> tuple[Path | None, str, str | None]:
    """The model to run when none was named: ``(file, registry name, notice or None)``.

    The default (:data:`DEFAULT_MODEL`, the authors' masked checkpoint) from the cache, else
    downloaded now, with a short timeout and no retries since nobody asked for it by name.
    Where it can't be had (``offline``, ``HF_HUB_OFFLINE``, unreachable, no answer, an HTTP
    error, a failed checksum or conversion, a cache that can't be written: any
    :class:`ModelUnavailableError`), the shipped :data:`FALLBACK_MODEL` runs, and the notice
    is one line naming both and how to get the default. ``offline`` never opens a connection.
    """
    try:
        path = fetch(DEFAULT_MODEL, on_download=on_download, offline=offline, timeout=DEFAULT_MODEL_TIMEOUT_S, retries=0)
        return path, DEFAULT_MODEL, None
    except ModelUnavailableError as e:
        reason = e.reason
    notice = (
        f"using {FALLBACK_MODEL} (shipped), not the default {DEFAULT_MODEL} (the authors' masked checkpoint): "
        f"{reason}; get it with `mitdenoise download {DEFAULT_MODEL}`"
    )
    return (None if FALLBACK_MODEL in PIPELINES else _shipped(FALLBACK_MODEL)), FALLBACK_MODEL, notice


def resolve_model(
    spec: str | os.PathLike | None, *, offline: bool = False, on_download: DownloadProgress | None = None
) -> Path:
    """A local file for a model spec, fetching it on first use.

    ``spec``: None (the default model, or its fallback: :func:`resolve_default`, which also
    says which ran), a registry name (a shipped file from ``weights/``, or the authors' file,
    downloaded, verified and converted once, then read from the cache),
    ``hf://owner/repo/path/file.safetensors[@revision]``, or a path. ``offline`` never opens
    a connection: a file that is not here already is an error. ``on_download`` hears how a
    download goes.
    """
    if spec is None:
        path, spec, _ = resolve_default(offline, on_download=on_download)
        if path is not None:
            return path
    if isinstance(spec, os.PathLike):
        return _local(Path(spec))
    spec = str(spec)
    if spec.startswith(HF_SCHEME):
        return download_hf(spec, offline=offline)
    if spec in PIPELINES:
        raise ModelLoadError(f"{spec} is a route over several networks ({', '.join(PIPELINES[spec].values())}), "
                             f"not one file: name one of them")
    if spec in REGISTRY:
        return fetch(spec, offline=offline, on_download=on_download)
    path = Path(spec).expanduser()
    if spec in REMOVED_MODELS and not path.is_file():
        raise ModelLoadError(REMOVED_MODELS[spec])
    if path.exists() or _looks_like_path(spec):
        return _local(path)
    raise ModelLoadError(
        f"unknown model {spec!r}: not a file and not one of: {', '.join(model_names())} "
        f"(or {HF_SCHEME}owner/repo/file.safetensors, or a path to a .pth/.safetensors file)"
    )


@dataclass(frozen=True)
class ResolvedModel:
    """What a model spec names, here and now (:func:`resolve`)."""

    name: str
    """The registry name, ``hf://`` address or path that runs (the fallback's name when it stands in)."""
    path: Path | None
    """Its checkpoint; None for a route over several networks."""
    networks: dict[str, Path]
    """A route's checkpoints by role (:data:`PIPELINES`); empty for one network."""
    notice: str | None
    """Why the fallback runs instead of the default; None otherwise."""


def resolve(
    spec: str | os.PathLike | None, *, offline: bool = False, on_download: DownloadProgress | None = None
) -> ResolvedModel:
    """The one way from a model spec to files, for ``Denoiser``, the benchmarks and training.

    None is the default model or its fallback (:func:`resolve_default`); a route's name
    (:data:`PIPELINES`) gives its networks' files; anything else is :func:`resolve_model`'s.
    """
    notice = None
    if spec is None:
        path, name, notice = resolve_default(offline, on_download=on_download)
    elif str(spec) in PIPELINES:
        path, name = None, str(spec)
    else:
        path, name = resolve_model(spec, offline=offline, on_download=on_download), str(spec)
    networks = {} if path is not None else {role: _shipped(network) for role, network in PIPELINES[name].items()}
    return ResolvedModel(name, path, networks, notice)


def download(spec: str, *, force: bool = False, on_download: DownloadProgress | None = None) -> Path:
    """``mitdenoise download``: fetch a registry model or an hf:// file into the cache, return its path."""
    if spec.startswith(HF_SCHEME):
        return download_hf(spec, force=force)
    if spec in REMOVED_MODELS:
        raise ModelLoadError(REMOVED_MODELS[spec])
    if spec not in REGISTRY:
        raise ModelLoadError(
            f"unknown model {spec!r}: not one of: {', '.join(REGISTRY)} (or {HF_SCHEME}owner/repo/file.safetensors)"
        )
    return fetch(spec, force=force, on_download=on_download)


def _shipped(name: str) -> Path:
    path = shipped_checkpoint(name)
    if not path.is_file():
        raise ModelLoadError(f"the shipped checkpoint {path} is missing: reinstall mitdenoise or pass --model PATH")
    return path


def _local(path: Path) -> Path:
    if not path.is_file():
        raise ModelLoadError(f"model file not found: {path}" + (" is a directory" if path.is_dir() else ""))
    return path


def _looks_like_path(spec: str) -> bool:
    return (
        "/" in spec
        or os.sep in spec
        or spec.startswith((".", "~"))
        or spec.lower().endswith(_CHECKPOINT_SUFFIXES)
    )


# --- the authors' files: download, verify, convert, cache ---------------------------------------


def cached_path(entry: ModelEntry) -> Path:
    """The converted checkpoint of a GitHub entry in the cache (it may not exist)."""
    return cache_dir() / entry.name / f"{entry.git_blob}.safetensors"


def is_cached(entry: ModelEntry) -> bool:
    """True when the cache holds this entry's verified, converted file."""
    return _cached_metadata(entry) is not None


def _cached_metadata(entry: ModelEntry) -> dict[str, str] | None:
    path = cached_path(entry)
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError):
        return None  # unreadable: fetched again
    if metadata.get(SOURCE_BLOB_KEY) != entry.git_blob:
        return None
    try:
        ModelConfig.from_json(metadata[CONFIG_KEY])
    except (KeyError, ValueError, TypeError):
        return None  # not a file we wrote: fetched again
    return metadata


def fetch(
    name: str,
    *,
    force: bool = False,
    on_download: DownloadProgress | None = None,
    offline: bool = False,
    timeout: float | None = None,
    retries: int = 2,
) -> Path:
    """The converted checkpoint of a registry entry: from the cache, else downloaded now.

    A download goes to a temporary file, is checked against the entry's git blob id,
    converted to safetensors (config in its metadata) and only then put in place;
    anything that fails leaves nothing behind. A cache hit makes no network request, and
    ``offline`` (or HF_HUB_OFFLINE) makes none at all. ``timeout`` (seconds to connect and
    between bytes; default huggingface_hub's download timeout) and ``retries`` (of 429/5xx
    answers) bound the wait. Not getting the file raises :class:`ModelUnavailableError`.
    """
    entry = REGISTRY.get(name)
    if entry is None:
        raise ModelLoadError(f"unknown model {name!r}: not one of: {', '.join(REGISTRY)}")
    if entry.shipped:
        return _shipped(name)
    target = cached_path(entry)
    if not force and (metadata := _cached_metadata(entry)) is not None:
        _restamp_if_stale(entry, metadata)
        return target
    if offline or offline_mode():
        why = "offline use was asked for" if offline else "offline mode is on (HF_HUB_OFFLINE)"
        if is_cached(entry):  # only reached with force
            raise ModelUnavailableError(
                f"cannot download model '{entry.name}' again: {why}; the cached copy {target} is still there", why
            )
        raise ModelUnavailableError(_unavailable(entry, why), f"it is not in the cache and {why}")

    from huggingface_hub.utils import WeakFileLock

    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        lock = cache_dir() / ".locks" / f"{entry.name}.lock"
        lock.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        why = f"cannot use the cache {cache_dir()}: {first_line(e)}"
        raise ModelUnavailableError(why, why) from None
    with WeakFileLock(lock):
        if not force and (metadata := _cached_metadata(entry)) is not None:  # another process got it meanwhile
            _restamp_if_stale(entry, metadata)
            return target
        tmp = target.with_name(f".{entry.git_blob}.{uuid.uuid4().hex[:8]}.pth.incomplete")
        try:
            cut_short = _download(entry, tmp, on_download=on_download, timeout=timeout, retries=retries)
            _verify(entry, tmp, cut_short)
            try:
                convert_checkpoint(tmp, target, config=entry.config, extra_metadata=_source_metadata(entry),
                                   **entry.known)
            except ModelLoadError as e:
                reason = str(e).split(": ", 1)[-1]
                raise ModelUnavailableError(
                    f"model '{entry.name}' from {entry.url} passed its checksum but cannot be converted: {reason}",
                    f"the download passed its checksum but cannot be converted ({reason})",
                ) from None
            logger.info("downloaded %s (%s), checksum verified, converted to %s",
                        entry.name, human_size(tmp.stat().st_size), target)
        finally:
            tmp.unlink(missing_ok=True)
    return target


def _source_metadata(entry: ModelEntry) -> dict[str, str]:
    return {
        "mitdenoise.model": entry.name,
        SOURCE_KEY: f"https://github.com/{entry.github_repo}/raw/{entry.commit}/{entry.path}",
        SOURCE_BLOB_KEY: entry.git_blob or "",
        "mitdenoise.license": entry.license,
        "mitdenoise.citation": entry.citation,
    }


def _restamp_if_stale(entry: ModelEntry, metadata: dict[str, str]) -> None:
    """Rewrite the cached file's config if the registry's changed since it was converted (no download)."""
    stored = ModelConfig.from_json(metadata[CONFIG_KEY])
    wanted = dataclasses.replace(entry.config or stored, **entry.known)
    if stored != wanted:
        path = cached_path(entry)
        convert_checkpoint(path, path, config=wanted, extra_metadata=_source_metadata(entry))


def _unavailable(entry: ModelEntry, reason: str) -> str:
    return (
        f"cannot get model '{entry.name}': {reason}, and it is not in the cache ({cache_dir()}); "
        f"run `mitdenoise download {entry.name}` when online, or download {entry.url} yourself "
        f"and pass --model PATH (a local .pth or .safetensors file works)"
    )


def _download(
    entry: ModelEntry, dest: Path, *, on_download: DownloadProgress | None, timeout: float | None, retries: int
) -> str | None:
    """Stream ``entry.url`` into ``dest``, telling ``on_download`` how far it got after each part.

    Uses huggingface_hub's shared HTTP client (``get_session`` through
    ``http_stream_backoff``): the proxy, certificate and offline settings a user gave
    huggingface_hub apply here too, redirects (GitHub -> raw.githubusercontent.com)
    are followed, and 429/5xx answers are retried ``retries`` times with backoff. A
    transfer cut short (or stalled past ``timeout``) is not an error here: the checksum
    that follows rejects it (the returned note says how short it was). Every failure
    is a :class:`ModelUnavailableError`.
    """
    import httpx2  # huggingface_hub's HTTP library; get_session() returns an httpx2.Client
    from huggingface_hub import constants
    from huggingface_hub.errors import OfflineModeIsEnabled
    from huggingface_hub.utils import http_stream_backoff

    url = entry.url
    host = httpx2.URL(url).host
    timeout = constants.HF_HUB_DOWNLOAD_TIMEOUT if timeout is None else timeout
    try:
        with http_stream_backoff(
            "GET",
            url,
            max_retries=retries,
            retry_on_exceptions=(),
            retry_on_status_codes=(429, 500, 502, 503, 504),
            timeout=timeout,
        ) as response:
            total = _expected_size(entry, response, host)
            cut_short = _save_stream(entry, response, dest, total, host, on_download)
    except OfflineModeIsEnabled:
        why = "offline mode is on (HF_HUB_OFFLINE)"
        raise ModelUnavailableError(_unavailable(entry, why), f"it is not in the cache and {why}") from None
    except (httpx2.ConnectError, httpx2.ConnectTimeout, httpx2.ProxyError) as e:
        why = f"cannot connect to {host} ({first_line(e)})"
        raise ModelUnavailableError(_unavailable(entry, why), why) from None
    except httpx2.TimeoutException:
        why = f"no answer from {host} within {timeout:g} s"
        raise ModelUnavailableError(_unavailable(entry, why), why) from None
    except httpx2.HTTPError as e:
        raise ModelUnavailableError(
            f"cannot download model '{entry.name}' from {url}: {first_line(e)}; nothing was kept, try again",
            f"the download from {host} failed ({first_line(e)})",
        ) from None
    except OSError as e:
        why = f"cannot write to the cache {dest.parent}: {first_line(e)}"
        raise ModelUnavailableError(why, why) from None
    return cut_short


def _expected_size(entry: ModelEntry, response, host: str) -> int | None:
    """The size the answer announces (None: not said); an error answer, or a size over the limit
    for a checkpoint, is a :class:`ModelUnavailableError`."""
    if response.status_code != 200:
        status = f"HTTP {response.status_code} {response.reason_phrase}".rstrip()
        raise ModelUnavailableError(
            f"cannot download model '{entry.name}' from {entry.url}: {status}", f"{host} answered {status}"
        )
    total = _content_length(response)
    if total is not None and total > checkpoints.MAX_CHECKPOINT_BYTES:
        raise ModelUnavailableError(
            f"refusing to download model '{entry.name}' from {entry.url}: {human_size(total)} is over the "
            f"{human_size(checkpoints.MAX_CHECKPOINT_BYTES)} limit for a checkpoint",
            f"the file on {host} is over the size limit for a checkpoint",
        )
    return total


def _save_stream(
    entry: ModelEntry, response, dest: Path, total: int | None, host: str, on_download: DownloadProgress | None
) -> str | None:
    """Write the answer's body to ``dest`` part by part, telling ``on_download``; past the size limit
    a :class:`ModelUnavailableError`. A transfer cut short returns a note saying how short (the
    checksum that follows rejects the file); a whole one returns None."""
    import httpx2

    received = 0
    if on_download is not None:
        on_download(entry.name, 0, total)
    with dest.open("wb") as f:
        try:
            for chunk in response.iter_bytes(chunk_size=1 << 20):
                received += len(chunk)
                if received > checkpoints.MAX_CHECKPOINT_BYTES:
                    raise ModelUnavailableError(
                        f"refusing to download model '{entry.name}' from {entry.url}: more than "
                        f"{human_size(checkpoints.MAX_CHECKPOINT_BYTES)} (the limit for a checkpoint); "
                        "the partial file was deleted",
                        f"the file on {host} is over the size limit for a checkpoint",
                    )
                f.write(chunk)
                if on_download is not None:
                    on_download(entry.name, received, total)
        except (httpx2.TransportError, httpx2.StreamError):
            of = f" of {total}" if total is not None else ""
            return f"the transfer was cut short after {received}{of} bytes"
    return None


def _content_length(response) -> int | None:
    if response.headers.get("Content-Encoding", "identity").lower() != "identity":
        return None
    try:
        return int(response.headers["Content-Length"])
    except (KeyError, ValueError):
        return None


def _verify(entry: ModelEntry, path: Path, cut_short: str | None = None) -> None:
    actual = git_blob_id(path)
    if actual != entry.git_blob:
        size = path.stat().st_size
        path.unlink(missing_ok=True)
        note = f" ({cut_short})" if cut_short else ""
        raise ModelUnavailableError(
            f"checksum mismatch for model '{entry.name}' downloaded from {entry.url}{note}: got git blob {actual} "
            f"({size} bytes), expected {entry.git_blob}; the download was deleted; try again",
            f"the download failed its checksum{note} and was deleted",
        )


# --- listing ------------------------------------------------------------------------------------


def model_status(entry: ModelEntry) -> dict:
    """What ``mitdenoise models`` shows of an entry (its --json rows)."""
    if entry.shipped:
        path = shipped_checkpoint(entry.name)
        source = f"shipped: weights/{entry.path}"
        present = path.is_file()
    else:
        path = cached_path(entry)
        source = entry.url
        present = is_cached(entry)
    return {
        "name": entry.name,
        "default": entry.name == DEFAULT_MODEL,
        "fallback": entry.name == FALLBACK_MODEL,
        "shipped": entry.shipped,
        "description": entry.description,
        "source": source,
        "git_blob": entry.git_blob,
        "cached": present,
        "path": str(path) if present else None,
        "size": path.stat().st_size if present else entry.size,
        "license": entry.license,
        "citation": entry.citation,
        "attn_mask_ratio": list(entry.attn_mask_ratio) if not entry.shipped else None,
        "global_residual": entry.global_residual if not entry.shipped else None,
    }


def pipeline_status(name: str) -> dict:
    """:func:`model_status` of a route over shipped networks: its parts' files together."""
    parts = [model_status(REGISTRY[part]) for part in PIPELINES[name].values()]
    present = all(p["cached"] for p in parts)
    return {
        "name": name,
        "default": name == DEFAULT_MODEL,
        "fallback": name == FALLBACK_MODEL,
        "shipped": True,
        "description": "ours: reads the noise, then picks a network",
        "source": " + ".join(p["source"] for p in parts),
        "parts": [p["name"] for p in parts],
        "git_blob": None,
        "cached": present,
        "path": None,
        "size": sum(p["size"] for p in parts) if present else None,
        "license": OUR_LICENSE,
        "citation": OUR_CITATION,
        "attn_mask_ratio": None,
        "global_residual": None,
    }


def model_names() -> list[str]:
    """Every name ``--model`` takes, in :func:`list_models`' order."""
    return [DEFAULT_MODEL, *PIPELINES, *(name for name in REGISTRY if name != DEFAULT_MODEL)]


def list_models() -> list[dict]:
    """Every name ``--model`` takes: the default first, then the shipped routes, then the other files."""
    rows = [model_status(e) for e in REGISTRY.values()]
    first = [r for r in rows if r["default"]]
    return first + [pipeline_status(name) for name in PIPELINES] + [r for r in rows if not r["default"]]




def validation_warning(record: dict | None) -> str | None:
    """One line for the user when the recorded validation says the model makes images worse."""
    if not record:
        return None
    worse = [
        f"{name} {scores['psnr']:.2f} dB out vs {scores['noisy_psnr']:.2f} dB in"
        for name, scores in record["sets"].items()
        if scores["psnr"] < scores["noisy_psnr"]
    ]
    if not worse:
        return None
    return (
        f"this model made its validation images worse ({', '.join(worse)}; iteration {record['iteration']}): "
        f"it is undertrained. Better: the default, {DEFAULT_MODEL} (the authors' released checkpoint), "
        f"or {FALLBACK_MODEL} (shipped, works offline)"
    )
