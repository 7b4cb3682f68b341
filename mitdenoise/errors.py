"""Errors a user can see: each carries a one-line message the CLI prints as is."""

from __future__ import annotations


class MitdenoiseError(Exception):
    """Base class: the message is meant for the user, on one line, naming the file and the reason."""


class ImageReadError(MitdenoiseError):
    """An input image could not be read (missing, corrupt, unsupported, too large)."""


class ImageWriteError(MitdenoiseError):
    """An output image could not be written."""


class ModelLoadError(MitdenoiseError):
    """A checkpoint could not be found, read, verified or matched to a network."""


class ModelUnavailableError(ModelLoadError):
    """A downloadable model can't be had here and now: offline, unreachable, no answer, an HTTP
    error, a failed checksum or conversion, a cache that can't be written. The default model falls
    back to the shipped one on this error only; a model asked for by name fails with it.
    ``reason`` is the short cause, for the fallback's notice."""

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason or message


class DeviceError(MitdenoiseError):
    """The requested device or precision is not available here."""


class JobPlanError(MitdenoiseError):
    """The inputs and output of a folder run don't make a consistent set of jobs."""


class TrainDataError(MitdenoiseError):
    """The training or validation images could not be found or read."""


class TrainSetupError(MitdenoiseError):
    """A training run can't start: run folder, checkpoint or device don't fit the request."""


class Aborted(KeyboardInterrupt):
    """A second SIGINT/SIGTERM: stop at once (writers remove their temp files on the way out).

    A KeyboardInterrupt, so that no ``except Exception`` holds it up; the CLI exits with
    128 + ``signum``, as the shell reports a process the signal killed (130, 143).
    """

    def __init__(self, signum: int) -> None:
        super().__init__(f"signal {signum}")
        self.signum = signum


def first_line(e: BaseException) -> str:
    """The first line of an error's message (its type when it has none), at most 200 characters:
    how another library's error is quoted in one of ours."""
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:200]
