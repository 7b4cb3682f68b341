"""The defaults that the library and the command line share, defined once.

This module imports nothing, so the CLI can show them in ``--help`` without loading torch.
"""

DEFAULT_MODEL = "masked-denoising"
"""The authors' masked-training checkpoint (attention mask 75 % at inference): taken from the
cache, else downloaded on first use. Where it can't be had, :data:`FALLBACK_MODEL` runs instead."""

FALLBACK_MODEL = "mitdenoise-auto"
"""Our own model, shipped in ``weights/`` so the tool works offline: it reads the image's noise and
runs one of two networks at a strength it picks on light white noise, ``mitdenoise-camera`` and a
non-local second stage on camera and heavy noise (:mod:`mitdenoise.adaptive`); see
``weights/README.md``."""

DEFAULT_MODEL_TIMEOUT_S = 5.0
"""Connect and read timeout of the default model's download when nobody asked for it by name:
past it (and with no retries) the fallback runs, so a machine without a network doesn't wait."""

DEFAULT_TILE = 544
"""Tile size of ``denoise`` and :class:`~mitdenoise.denoiser.Denoiser`: big tiles overlap less
(with the default overlap a 1024x1024 image runs as 2x2 tiles), and a pixel costs the same in any
tile size; what grows is the working set."""

DEFAULT_OVERLAP = 32
"""Overlap between neighbouring tiles, in pixels: room for the blending ramp."""
