"""Feature alignment: extraction, training and evaluation entry points.

The drafter model code lives in :mod:`common.drafters`. Its old module names here stay importable
(``feature_alignment.hidden_adapter``, ``feature_alignment.drafter``, ``feature_alignment.eagle_head``
name the moved modules themselves), so existing imports and scripts keep working.
"""

import sys

from common.drafters import eagle_head, hidden_adapter
from common.drafters import hidden_drafter as drafter

for _name, _module in (("hidden_adapter", hidden_adapter), ("drafter", drafter), ("eagle_head", eagle_head)):
    sys.modules[f"{__name__}.{_name}"] = _module
