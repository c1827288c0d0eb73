"""Moved to :mod:`common.drafters.eagle_head` (the ground floor); this path stays so existing imports keep working."""

from common.drafters.eagle_head import *  # noqa: F403
from common.drafters.eagle_head import __all__  # noqa: F401
