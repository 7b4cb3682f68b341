"""mitdenoise: denoise images whose noise you don't know (masked-training SwinIR, CVPR 2023).

Names are imported lazily so that ``mitdenoise --help`` does not wait for torch.
"""

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("mitdenoise")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0+unknown"

_EXPORTS = {
    "Denoiser": "denoiser",
    "MitdenoiseError": "errors",
    "ModelConfig": "model",
    "SwinIR": "model",
}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'mitdenoise' has no attribute {name!r}")
