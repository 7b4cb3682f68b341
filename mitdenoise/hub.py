"""Files on the Hugging Face Hub (``hf://owner/repo/path/file[@revision]``) through ``huggingface_hub``,
and the Hub environment (cache, offline mode, endpoint) read when used, not at import, so a
changed environment (a test's, a user's shell) takes effect at once."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from .errors import ModelLoadError, first_line

HF_SCHEME = "hf://"


def is_true(value: str | None) -> bool:
    """An environment flag as huggingface_hub reads one (1, ON, YES, TRUE)."""
    return value is not None and value.strip().upper() in {"1", "ON", "YES", "TRUE"}


def hub_cache_dir() -> Path:
    """``huggingface_hub.constants.HF_HUB_CACHE``, by the same rules, from the environment as it is now.

    (huggingface_hub reads the environment once, at import; reading it here on each
    call keeps HF_HOME/HF_HUB_CACHE changes made later, e.g. by tests, effective.)
    """
    env = os.environ
    home = env.get("HF_HOME") or os.path.join(
        env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface"
    )
    home = os.path.expandvars(os.path.expanduser(home))
    hub = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub")
    return Path(os.path.expandvars(os.path.expanduser(hub)))


def offline_mode() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE), as huggingface_hub reads it, but now."""
    return is_true(os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE"))


def hf_endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def parse_hf_spec(spec: str) -> tuple[str, str, str, str | None]:
    """(repo_type, repo_id, filename, revision) of ``hf://owner/repo/path/file[@revision]``.

    huggingface_hub's own form ``hf://owner/repo@revision/path/file`` (and the
    ``datasets/``, ``spaces/`` prefixes) is accepted too.
    """
    from huggingface_hub import parse_hf_uri
    from huggingface_hub.errors import HfUriError

    body = spec[len(HF_SCHEME):]
    expected = f"expected {HF_SCHEME}owner/repo/path/to/file.safetensors[@revision]"
    try:
        uri = None
        if "@" in body:
            head, revision = body.split("@", 1)
            trailing = parse_hf_uri(HF_SCHEME + head)
            if trailing.path_in_repo:  # the revision follows the file name
                uri = dataclasses.replace(trailing, revision=revision)
        if uri is None:
            uri = parse_hf_uri(spec)
    except HfUriError as e:
        raise ModelLoadError(f"invalid model {spec!r}: {first_line(e).rstrip('.')}; {expected}") from None
    if uri.type == "bucket":
        raise ModelLoadError(f"invalid model {spec!r}: buckets are not supported; {expected}")
    if not uri.path_in_repo:
        raise ModelLoadError(f"invalid model {spec!r}: it names a repository but no file; {expected}")
    return uri.type, uri.id, uri.path_in_repo, uri.revision


def download_hf(spec: str, *, force: bool = False, offline: bool = False) -> Path:
    """A Hub file, through ``huggingface_hub.hf_hub_download`` (its cache, locks, offline mode, endpoint).

    With a branch or tag as revision the Hub is asked whether the file changed (one
    HEAD request); a 40-hex commit revision already cached makes no request; offline
    or unreachable, the cached copy is used. ``offline`` (or HF_HUB_OFFLINE) makes no request.
    """
    import httpx2
    from huggingface_hub import hf_hub_download, hf_hub_url
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    from . import __version__

    repo_type, repo_id, filename, revision = parse_hf_spec(spec)
    asked, offline = offline, offline or offline_mode()
    try:
        path = hf_hub_download(
            repo_id,
            filename,
            repo_type=repo_type,
            revision=revision,
            cache_dir=hub_cache_dir(),
            endpoint=hf_endpoint(),
            local_files_only=offline,
            force_download=force and not offline,
            library_name="mitdenoise",
            library_version=__version__,
        )
    except LocalEntryNotFoundError:
        reason = f"cannot reach {hf_endpoint()}"
        if offline:
            reason = "offline use was asked for" if asked else "offline mode is on (HF_HUB_OFFLINE)"
        url = hf_hub_url(repo_id, filename, repo_type=repo_type, revision=revision, endpoint=hf_endpoint())
        raise ModelLoadError(
            f"cannot get {spec}: {reason}, and it is not in the cache ({hub_cache_dir()}); "
            f"run `mitdenoise download {spec}` when online, or download {url} yourself and pass --model PATH"
        ) from None
    except GatedRepoError:
        raise ModelLoadError(
            f"cannot get {spec}: {repo_id} is gated; accept its terms on the Hub and log in (`hf auth login`)"
        ) from None
    except RepositoryNotFoundError:
        raise ModelLoadError(
            f"cannot get {spec}: repository {repo_id} not found on {hf_endpoint()} "
            "(or private: log in with `hf auth login`)"
        ) from None
    except RevisionNotFoundError:
        raise ModelLoadError(f"cannot get {spec}: revision {revision!r} not found in {repo_id}") from None
    except EntryNotFoundError:
        raise ModelLoadError(f"cannot get {spec}: no file {filename!r} in {repo_id}") from None
    except (HfHubHTTPError, httpx2.HTTPError, OSError, ValueError) as e:
        raise ModelLoadError(f"cannot get {spec}: {first_line(e)}") from None
    return Path(path)


