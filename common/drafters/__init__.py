"""The drafters: raw EventGPT, TokenAdapter, hidden-state adapters (L1-L5) and the EAGLE head.

Model code and drafters live in the submodules (``hidden_adapter``, ``hidden_drafter``,
``eagle_head``, ``token_adapter``, ``token_drafter``); the benchmarks' flag-to-drafter wiring
in ``factory``; ``widen`` widens trained drafters to a widened twin of their pair. ``from common.drafters import DrafterFactory`` keeps working.
"""

from common.drafters.factory import (
    DRAFTER_CHOICES,
    DrafterChoice,
    DrafterFactory,
    add_drafter_args,
    aligned_fields,
    aligned_statistics,
    build_drafter_factory,
    drafter_choice,
    drafter_factory,
    record_drafter,
)

__all__ = ["DRAFTER_CHOICES", "DrafterChoice", "DrafterFactory", "add_drafter_args", "aligned_fields",
           "aligned_statistics", "build_drafter_factory", "drafter_choice", "drafter_factory", "record_drafter"]
