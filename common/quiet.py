"""Turn off third-party noise in our command-line runs, in one place.

``quiet_third_party()`` (called by :func:`common.cli.run_cli` before a CLI's ``main``) silences,
through public APIs only:
- transformers' per-checkpoint "Loading weights" progress bars and its info/warning logging
  (``transformers.utils.logging``), unless ``--debug`` or ``TRANSFORMERS_VERBOSITY`` is set;
- known harmless notes: "CLIPImageProcessor requires torchvision" and Video-LLaVA's
  "returning pixel_values_images is deprecated" (transformers logs both: errors-only verbosity
  drops them), plus the same texts where they come as Python warnings.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

# (message regex, category) pairs of warnings that say nothing a user can act on in this toolkit.
HARMLESS_WARNINGS: tuple[tuple[str, type[Warning]], ...] = (
    (r".*torchvision.*", UserWarning),
    (r".*torchvision.*", DeprecationWarning),
    (r".*video decoding and encoding capabilities of torchvision.*", UserWarning),
    (r".*pixel_values_images.*", UserWarning),
    (r".*pixel_values_images.*", FutureWarning),
)
HARMLESS_LOGGERS = ("torchvision",)


def quiet_warnings() -> None:
    """Ignore the warnings in :data:`HARMLESS_WARNINGS` (process wide)."""
    for message, category in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)


def quiet_transformers() -> None:
    """transformers: errors only, no progress bars (a ``TRANSFORMERS_VERBOSITY`` the user set wins).

    Before transformers is imported this only sets its documented environment variables (so a
    ``--help`` does not pay for importing it); once imported, its logging API is used.
    """
    if os.environ.get("TRANSFORMERS_VERBOSITY") and os.environ.get("TRANSFORMERS_VERBOSITY") != "error":
        return
    os.environ["TRANSFORMERS_VERBOSITY"] = "error"
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" not in sys.modules:
        return
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def quiet_third_party(debug: bool = False) -> None:
    """Everything above; with ``debug`` nothing is silenced."""
    if debug:
        return
    quiet_warnings()
    for name in HARMLESS_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    quiet_transformers()
