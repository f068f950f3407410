"""The one error type of the data package (bad corpus, tokenizer or chat file)."""
from __future__ import annotations

from trinity_jax.config import ConfigError


class DataError(ConfigError):
    """Bad data input, raised before training starts; the message names the file, line or field.

    A subclass of ``ConfigError`` (itself a ``ValueError``) so the CLI prints both the same way.
    """
