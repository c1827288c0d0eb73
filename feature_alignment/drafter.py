"""Moved to :mod:`common.drafters.hidden_drafter` (the ground floor); this path stays so existing imports keep working."""

from common.drafters.hidden_drafter import *  # noqa: F403
from common.drafters.hidden_drafter import __all__  # noqa: F401
