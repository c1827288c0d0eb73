"""Moved to :mod:`common.drafters.hidden_adapter` (the ground floor); this path stays so existing imports keep working."""

from common.drafters.hidden_adapter import *  # noqa: F403
from common.drafters.hidden_adapter import __all__  # noqa: F401
