"""Errors raised while loading model checkpoints."""


class ModelLoadError(ValueError):
    """A checkpoint folder is missing, of the wrong kind or incomplete; the message names the path and the fix."""
