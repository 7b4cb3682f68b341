"""``python -m mitdenoise.train ...``: the same command as ``mitdenoise train``, for torchrun."""

from ..cli.train import main

main()
