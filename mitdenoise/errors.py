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
