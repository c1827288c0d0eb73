"""Moved to :mod:`common.drafters.token_drafter` (the ground floor); this path stays so existing imports keep working."""

from common.drafters.token_drafter import *  # noqa: F403
