"""Greedy answers of several prompts decoded together over one batched static KV cache.

Each prompt is prefilled alone (a 2k-token prompt already fills the GPU, and alone it needs no
padding), straight into its own row of a batched cache; then one decode step serves every row,
each at its own position. On CUDA the step is a captured CUDA graph (a 7B step is ~1,000 small
kernels: launched eagerly they cost more than the step itself). The graph and its cache are kept
for the next call of the same shape, so a long extraction captures once.

Feature extraction uses this: the states the target computes while decoding its own greedy
answer are, position for position, the states of the target teacher-forced on that answer (the
state before answer token t, given the prompt and tokens < t), so they are recorded here instead
of running the 2k-token prompt through the target a second time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from common.models.decoder import KVCache, LlamaRunner, capture_graph

# cache capacities are rounded up to this, so batches whose prompts differ by a few tokens share a graph
CAPACITY_STEP = 64

StepFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict[int, torch.Tensor]]]


@dataclass
class GreedyBatch:
    """Answers (each ends with eos if it stopped there) and, per requested layer, each answer's states."""

    answers: list[list[int]]
    hidden: dict[int, list[torch.Tensor]] = field(default_factory=dict)  # layer -> [(len_i, H)]


class BatchedGreedyDecoder:
    """Batched greedy decoding for one ``LlamaRunner``; keeps its last cache (and CUDA graph) for reuse."""

    def __init__(self, runner: LlamaRunner, use_cuda_graph: bool = True):
        self.runner = runner
        self.use_cuda_graph = use_cuda_graph
        self._key: tuple | None = None
        self._cache: KVCache | None = None
        self._step: StepFn | None = None

    def release(self) -> None:
        """Free the kept cache and graph."""
        self._key = self._cache = self._step = None

    def _prepare(self, rows: int, capacity: int, dtype: torch.dtype, device: torch.device,
                 wanted: frozenset[int]) -> tuple[KVCache, StepFn]:
        graph = self.use_cuda_graph and device.type == "cuda"
        key = (rows, capacity, dtype, str(device), wanted, graph)
        if key != self._key:
            self.release()
            cache = KVCache(self.runner.shape, capacity, dtype, device, batch=rows)
            eager = self._eager_step(cache, wanted)
            self._cache, self._step = cache, self._capture(eager, cache, rows) if graph else eager
            self._key = key
        return self._cache, self._step

    def _eager_step(self, cache: KVCache, wanted: frozenset[int]) -> StepFn:
        runner = self.runner

        def step(embeds: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
            x, hidden = runner.run_layers(embeds, positions, cache.capacity, cache, set(wanted))
            return runner.lm_head(x[:, -1]).float(), {i: h[:, -1] for i, h in hidden.items()}

        return step

    @staticmethod
    def _capture(eager: StepFn, cache: KVCache, rows: int) -> StepFn:
        """A CUDA graph of ``eager``; captured before any prompt is written (warm-up writes are scratch)."""
        device = cache.keys.device
        embeds = torch.zeros((rows, 1, cache.shape.hidden_size), dtype=cache.keys.dtype, device=device)
        positions = torch.full((rows, 1), cache.capacity - 1, dtype=torch.long, device=device)
        graph, (out_logits, out_hidden) = capture_graph(lambda: eager(embeds, positions), device, warmup=2)

        def replay(new_embeds: torch.Tensor, new_positions: torch.Tensor
                   ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
            embeds.copy_(new_embeds)
            positions.copy_(new_positions)
            with torch.cuda.device(device):
                graph.replay()
            return out_logits.clone(), {i: h.clone() for i, h in out_hidden.items()}

        return replay

    @torch.no_grad()
    def generate(self, prompts: Sequence[torch.Tensor], max_new_tokens: int, eos_token_id: int,
                 hidden_layers: Sequence[int] = ()) -> GreedyBatch:
        """Greedy answers of ``prompts`` (each (T_i, H) input embeddings); each stops after eos.

        With ``hidden_layers``, also the state before every answer token (row t predicts token t)
        for those layers (indices as in ``common.vlm``).
        """
        if not prompts or max_new_tokens < 1:
            raise ValueError("generate needs at least one prompt and max_new_tokens >= 1")
        runner, rows = self.runner, len(prompts)
        lengths = [int(p.shape[0]) for p in prompts]
        capacity = -(-(max(lengths) + max_new_tokens) // CAPACITY_STEP) * CAPACITY_STEP
        device, dtype = prompts[0].device, prompts[0].dtype
        wanted = frozenset(runner.layer_index(i) for i in hidden_layers)
        cache, step = self._prepare(rows, capacity, dtype, device, wanted)
        first_logits, first_states = [], []
        for b, prompt in enumerate(prompts):
            logits, hidden = runner.run(prompt, cache.row(b), hidden_layers, all_logits=False)
            first_logits.append(logits[-1])
            first_states.append({i: hidden[i][-1] for i in hidden_layers})
        tokens = torch.stack(first_logits).argmax(-1)
        positions = torch.as_tensor(lengths, device=device)[:, None]
        done = torch.zeros(rows, dtype=torch.bool, device=device)
        steps_tokens, steps_done, steps_hidden = [], [], []
        for n in range(max_new_tokens):
            steps_tokens.append(tokens)
            steps_done.append(done.clone())
            done = done | (tokens == eos_token_id)
            if n == max_new_tokens - 1 or bool(done.all()):
                break
            logits, hidden = step(runner.language_model.embed_tokens(tokens)[:, None].to(dtype), positions)
            steps_hidden.append({i: hidden[runner.layer_index(i)] for i in hidden_layers})
            tokens, positions = logits.argmax(-1), positions + 1
        token_grid = torch.stack(steps_tokens, 1).tolist()
        stopped = torch.stack(steps_done, 1).tolist()  # row already finished before this step
        answers = [[t for t, gone in zip(token_grid[b], stopped[b]) if not gone] for b in range(rows)]
        result = GreedyBatch(answers=answers)
        for i in hidden_layers:
            later = torch.stack([s[i] for s in steps_hidden], 1) if steps_hidden else None  # (rows, n, H)
            result.hidden[i] = [
                torch.cat([first_states[b][i][None], later[b, : len(answers[b]) - 1]])
                if later is not None else first_states[b][i][None] for b in range(rows)]
        return result
