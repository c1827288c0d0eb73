"""Widened drafters on the widened twin propose exactly what the trained drafters propose on the small pair."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from common.data import ClipDataset
from common.defaults import MODELS_DIR, default_dataset_dir
from common.drafters.eagle_head import (
    EagleTarget,
    load_eagle_head,
    make_eagle_drafter,
)
from common.drafters.hidden_adapter import WidenedAdapter, create_adapter, load_any_adapter, save_adapter
from common.drafters.hidden_drafter import load_hidden_adapter_drafter
from common.drafters.token_adapter import TokenAdapter
from common.drafters.token_drafter import load_token_adapter_drafter
from common.drafters.widen import widened_layer
from common.errors import DataError
from common.models.loader import load_vlm
from common.speculative import speculative_generate
from scripts.widen_pair import main as widen_main
from tests.drafter_fixtures import make_small_drafters

KINDS = ("eventgpt", "videollava")
MAX_NEW, GAMMA = 12, 4


@pytest.fixture(scope="module")
def small_drafters(tmp_path_factory) -> dict[str, Path]:
    """Untrained but non-trivial drafters for the shipped pair, in their on-disk formats."""
    return make_small_drafters(tmp_path_factory.mktemp("small_drafters"))


@pytest.fixture(scope="module")
def twin(small_drafters, tmp_path_factory) -> Path:
    """The shipped pair and the drafters widened with --shape small in one widen_pair call."""
    out = tmp_path_factory.mktemp("twin_drafters") / "small"
    d = small_drafters
    widen_main(["--output_dir", str(out), "--shape", "small", "--eagle_head", str(d["eagle"]),
                "--hidden_adapter", f"{d['L1']},{d['L5']}", "--token_adapter", str(d["token_adapter"])])
    return out


@pytest.fixture(scope="module")
def pairs(twin):
    load = lambda folder: tuple(load_vlm(k, folder / k, quant="fp32", device="cpu") for k in KINDS)  # noqa: E731
    return {"small": load(MODELS_DIR), "twin": load(twin)}


@pytest.fixture(scope="module")
def clips(pairs):
    """Two default test clips with each pair's encoded visuals (encoded once)."""
    samples = list(ClipDataset(default_dataset_dir()))[:2]
    return [(s, {name: tuple(m.encode(s) for m in pair) for name, pair in pairs.items()}) for s in samples]


def _drafts(name: str, pair: tuple, visuals: tuple, drafter_path: Path, sample) -> tuple[list[int], list, list]:
    """(output tokens, (drafted, accepted) per step, first proposal) of one drafter on one pair."""
    draft, target = pair
    if name == "eagle":
        head = load_eagle_head(drafter_path, target)
        proxy = EagleTarget(target, head.config.feature_layer)
        state = proxy.prefill(visuals[1], sample.question)
        drafter = make_eagle_drafter(head, None, proxy, state)
        first = drafter.propose([], GAMMA).tokens
        drafter = make_eagle_drafter(head, None, proxy, state)
        result = speculative_generate(proxy, state, drafter, max_new_tokens=MAX_NEW, gamma=GAMMA)
        return result.tokens, result.iterations, first
    state = target.prefill(visuals[1], sample.question)
    if name == "token_adapter":
        def make():
            dstate = draft.prefill(visuals[0], sample.question)
            limit = min(draft.base_vocab_size, target.base_vocab_size)
            return load_token_adapter_drafter(drafter_path, draft, dstate, limit,
                                              stop_token_ids=[target.eos_token_id])
    else:
        adapter = load_any_adapter(drafter_path)

        def make():
            dstate = draft.prefill(visuals[0], sample.question, hidden_layers=[adapter.meta["input_layer"]])
            return load_hidden_adapter_drafter(adapter, draft, dstate, target)
    first = make().propose([], GAMMA).tokens
    result = speculative_generate(target, state, make(), max_new_tokens=MAX_NEW, gamma=GAMMA)
    return result.tokens, result.iterations, first


@pytest.mark.slow
@pytest.mark.parametrize("name, clip", [("eagle", 0), ("L1", 1), ("L5", 0), ("token_adapter", 1)])
def test_widened_drafter_proposes_and_accepts_as_the_small_one(name, clip, twin, pairs, clips, small_drafters):
    """Same first proposal, same output, same (drafted, accepted) per verify step (two default clips in turn:
    the twin's prefill is the slow part on a CPU)."""
    widened = json.loads((twin / "drafters" / "drafters.json").read_text())
    path = {"eagle": widened["eagle_head"]["path"], "token_adapter": widened["token_adapter"]["path"],
            **{f"L{e['level']}": e["path"] for e in widened["hidden_adapter"]}}[name]
    for sample, visuals in clips[clip:clip + 1]:
        small = _drafts(name, pairs["small"], visuals["small"], small_drafters[name], sample)
        wide = _drafts(name, pairs["twin"], visuals["twin"], Path(path), sample)
        assert len(small[2]) == GAMMA and len(small[1]) >= 2  # a full proposal, several verify steps
        assert wide == small


def test_widened_files_keep_their_formats_and_shapes(twin, pairs):
    egpt, vllava = pairs["twin"]
    head = load_eagle_head(twin / "drafters" / "eagle_head", vllava)
    assert head.config.hidden_size == vllava.hidden_size == 1024 and head.config.feature_layer == -1
    assert head.config.target_vocab_size == vllava.vocab_size and head.config.num_heads == 8
    l5 = load_any_adapter(twin / "drafters" / "hidden_adapter" / "L5.safetensors")
    assert isinstance(l5, WidenedAdapter) and l5.io_sizes == (egpt.hidden_size, vllava.hidden_size)
    assert l5.meta["input_layer"] == 1  # layer 1 of EventGPT is layer 1 of its twin
    tok = TokenAdapter.from_pretrained(twin / "drafters" / "token_adapter")
    assert (tok.config.draft_vocab_size, tok.config.target_vocab_size) == (egpt.vocab_size, vllava.vocab_size)


def test_layer_indices_move_to_the_twin():
    assert widened_layer(-1, 4, "f") == -1 and widened_layer(4, 4, "f") == -1
    assert widened_layer(-2, 4, "f") == 3 and widened_layer(0, 4, "f") == 0
    with pytest.raises(DataError, match="out of range"):
        widened_layer(-6, 4, "f")


def test_drafter_for_another_pair_is_refused_with_one_line_and_nothing_written(tmp_path, small_drafters):
    bad = save_adapter(create_adapter(1, 64, 256), tmp_path / "bad.safetensors", {"input_layer": -1})
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        widen_main(["--output_dir", str(out), "--shape", "small", "--eagle_head", str(small_drafters["eagle"]),
                    "--hidden_adapter", str(bad)])
    message = str(exc.value)
    assert "\n" not in message and str(bad) in message and "maps 64 -> 256" in message
    assert not out.exists() or not any(out.iterdir())


def test_head_of_another_target_or_corrupt_config_is_refused(tmp_path, small_drafters):
    import shutil

    from common.drafters.widen import DrafterSources, widen_drafters

    bad = tmp_path / "eagle"
    shutil.copytree(small_drafters["eagle"], bad)
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "hidden_size": 128}))
    pair = (MODELS_DIR / "eventgpt", MODELS_DIR / "videollava")
    with pytest.raises(DataError, match=r"config.json: the head was trained for a 128-wide target"):
        widen_drafters(tmp_path / "out", DrafterSources(eagle_head=str(bad)), *pair, "small")
    (bad / "config.json").write_text("{not json")
    with pytest.raises(DataError, match="not an EAGLE head config"):
        widen_drafters(tmp_path / "out", DrafterSources(eagle_head=str(bad)), *pair, "small")
    assert not (tmp_path / "out").exists()
