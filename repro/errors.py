"""The one base of every error about the user's input (a recipe, a paper table, a path, a run).

`repro`'s command line reports a `UserError` in one line, naming the file and the key or path,
and exits 1; anything else is a bug and keeps its traceback. Each layer subclasses it for its own
errors (`RecipeError`, `DataError`, ...), so the command line classifies an error without
importing the layer that raised it.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input, reported in one line; nothing was half-written."""
