"""Token alignment: extraction, training and evaluation entry points.

The TokenAdapter and its drafter live in :mod:`common.drafters`. Their old module names here stay
importable (``token_alignment.token_adapter``, ``token_alignment.drafter`` name the moved modules
themselves), so existing imports and scripts keep working.
"""

import sys

from common.drafters import token_adapter
from common.drafters import token_drafter as drafter

for _name, _module in (("token_adapter", token_adapter), ("drafter", drafter)):
    sys.modules[f"{__name__}.{_name}"] = _module
