"""Token sampling shared by plain and speculative decoding.

One place turns logits into a token (greedy at temperature 0, a multinomial draw from the
tempered softmax otherwise) and into probabilities, so the baseline and the speculative
engine can never drift apart in how they pick tokens.

Randomness always comes from the given ``torch.Generator`` (draws happen on the
generator's device; tensors are moved there), so a fixed seed reproduces a run.
"""

from __future__ import annotations

import torch


def is_greedy(temperature: float) -> bool:
    """Whether ``temperature`` means greedy decoding (0 or below)."""
    return temperature <= 0.0


def probs_from_logits(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """float32 probabilities of ``logits`` (..., V) at ``temperature``; one-hot argmax when greedy."""
    logits = logits.float()
    if is_greedy(temperature):
        onehot = torch.zeros_like(logits)
        return onehot.scatter_(-1, logits.argmax(dim=-1, keepdim=True), 1.0)
    return torch.softmax(logits / temperature, dim=-1)


def _draw_device(generator: torch.Generator | None, fallback: torch.device) -> torch.device:
    return generator.device if generator is not None else fallback


def sample_from_probs(probs: torch.Tensor, generator: torch.Generator | None = None) -> int:
    """Draw one index from a probability vector (V,) (need not be normalised)."""
    probs = probs.to(_draw_device(generator, probs.device))
    return int(torch.multinomial(probs, 1, generator=generator).item())


def sample_from_logits(logits: torch.Tensor, temperature: float = 0.0,
                       generator: torch.Generator | None = None) -> int:
    """The next token from logits (V,): argmax at temperature 0, else a draw from softmax(logits / T)."""
    if is_greedy(temperature):
        return int(logits.argmax().item())
    return sample_from_probs(probs_from_logits(logits, temperature), generator)


def uniform(generator: torch.Generator | None = None) -> float:
    """One uniform draw in [0, 1) from ``generator``."""
    device = generator.device if generator is not None else torch.device("cpu")
    return float(torch.rand(1, generator=generator, device=device).item())


def mask_from(logits: torch.Tensor, limit: int) -> torch.Tensor:
    """A copy of ``logits`` (..., V) with every id >= ``limit`` set to -inf."""
    out = logits.clone()
    if limit < out.shape[-1]:
        out[..., limit:] = float("-inf")
    return out
