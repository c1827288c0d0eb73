"""Moved to :mod:`common.drafters.token_adapter` (the ground floor); this path stays so existing imports keep working."""

from common.drafters.token_adapter import *  # noqa: F403
