"""Feature alignment: extraction, training and evaluation entry points.

The drafter model code lives in :mod:`common.drafters`. Its old module names here stay importable
(``feature_alignment.hidden_adapter``, ``feature_alignment.drafter``, ``feature_alignment.eagle_head``
name the moved modules themselves, imported on first use so that a CLI's ``--help`` needs no
torch), so existing imports and scripts keep working.
"""

from common.lazy import alias_modules

alias_modules(__name__, {"hidden_adapter": "common.drafters.hidden_adapter", "drafter": "common.drafters.hidden_drafter",
                         "eagle_head": "common.drafters.eagle_head"})
