"""Token alignment: extraction, training and evaluation entry points.

The TokenAdapter and its drafter live in :mod:`common.drafters`. Their old module names here stay
importable (``token_alignment.token_adapter``, ``token_alignment.drafter`` name the moved modules
themselves, imported on first use so that a CLI's ``--help`` needs no torch), so existing imports
and scripts keep working.
"""

from common.lazy import alias_modules

alias_modules(__name__, {"token_adapter": "common.drafters.token_adapter", "drafter": "common.drafters.token_drafter"})
