"""Command line: a thin layer over the library. Progress on stderr, results on stdout.

One module a command (:mod:`.denoise`, :mod:`.models`, :mod:`.bench`, :mod:`.noise`,
:mod:`.train`), what they share in :mod:`.console`, and :mod:`.app` putting them together.
"""

from .app import app, run

__all__ = ["app", "run"]
