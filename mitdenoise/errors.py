"""Errors a user can see: each carries a one-line message the CLI prints as is."""


class MitdenoiseError(Exception):
    """Base class: the message is meant for the user, on one line, naming the file and the reason."""


class ImageReadError(MitdenoiseError):
    """An input image could not be read (missing, corrupt, unsupported, too large)."""


class ImageWriteError(MitdenoiseError):
    """An output image could not be written."""


class ModelLoadError(MitdenoiseError):
    """A checkpoint could not be found, read, verified or matched to a network."""


class DeviceError(MitdenoiseError):
    """The requested device or precision is not available here."""


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
