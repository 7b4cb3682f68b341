"""Training: the paper's recipe (masked input + masked attention), resumable, single process or torchrun.

>>> from mitdenoise.train import PRESETS, train
>>> train(PRESETS["quick"].replace(data="photos/", out="runs/smoke"))

Names are imported lazily so that the CLI's ``--help`` does not wait for torch.
"""

from importlib import import_module

_EXPORTS = {
    "TrainConfig": "config",
    "PRESETS": "config",
    "resolve_config": "config",
    "train": "loop",
    "TrainResult": "loop",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'mitdenoise.train' has no attribute {name!r}")
