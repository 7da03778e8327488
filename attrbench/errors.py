"""Exceptions for mistakes in the user's input, kept free of heavy imports.

``attrbench report`` and ``attrbench figures`` import this module without importing torch.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A config value that is invalid or contradicts another. Its message names the key and the fix."""


class SourceNotFoundError(OSError):
    """Data or model weights that the config names cannot be found or reached.

    Its message names the source and the ways out (a local path, network access once, or an
    embedded variant).
    """
