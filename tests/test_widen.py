"""Widening a trained pair to a larger LLM shape keeps its function (scripts.widen_pair, common.models.widen)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from common.data import ClipDataset
from common.defaults import MODELS_DIR, default_dataset_dir
from common.errors import DataError
from common.models.decoder import LlamaRunner, VocabLimitedHead
from common.models.loader import load_vlm
from common.models.widen import LlmShape, WidenPlan, plan_for, prepare, write_widened
from common.speculative import autoregressive_generate
from scripts.widen_pair import main
from tests.data_fixtures import tiny_dataset  # noqa: F401  (fixture)

KINDS = ("eventgpt", "videollava")


@pytest.fixture(scope="module")
def small_twin(tmp_path_factory) -> Path:
    """The shipped pair widened with --shape small (float32)."""
    out = tmp_path_factory.mktemp("twin") / "small"
    main(["--output_dir", str(out), "--shape", "small"])
    return out


def test_small_twin_config_doubles_every_dimension(small_twin):
    summary = json.loads((small_twin / "widen_pair.json").read_text())
    for kind in KINDS:
        src, big = summary[kind]["source_shape"], summary[kind]["shape"]
        for name in ("hidden_size", "num_layers", "num_heads", "head_dim", "intermediate_size", "vocab_size"):
            assert big[name] >= 2 * src[name], (kind, name)
    config = json.loads((small_twin / "videollava" / "config.json").read_text())
    assert config["visual_pad_tokens"] == 400  # 8 x 50 real visual tokens, doubled
    assert config["text_config"]["rms_norm_eps"] == pytest.approx(1e-6 / 4)
    assert json.loads((small_twin / "eventgpt" / "config.json").read_text())["visual_pad_tokens"] == 55
    for kind in KINDS:
        config = json.loads((small_twin / kind / "config.json").read_text())
        assert config["answer_vocab_size"] == summary[kind]["source_shape"]["vocab_size"]


def test_vocab_limited_head_scores_padding_minus_inf():
    """Rows at or above the limit are -inf; the others are the plain head's logits."""
    head = torch.nn.Linear(8, 12, bias=False)
    limited = VocabLimitedHead(head, 9)
    x = torch.randn(3, 8)
    out = limited(x)
    assert torch.equal(out[:, :9], head(x)[:, :9]) and torch.isneginf(out[:, 9:]).all()
    assert limited.weight is head.weight
    probs = torch.softmax(out, dim=-1)
    assert probs[:, 9:].sum() == 0


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_small_twin_answers_token_for_token(small_twin, kind):
    """Greedy answers identical, logits and layer-1 states close, extra hidden dims exactly zero."""
    source = load_vlm(kind, MODELS_DIR / kind, quant="fp32", device="cpu")
    twin = load_vlm(kind, small_twin / kind, quant="fp32", device="cpu")
    assert twin.visual_pad_tokens > 0 and twin.hidden_size == 4 * source.hidden_size
    samples = list(ClipDataset(default_dataset_dir()))[:2]
    for sample in samples:
        a = source.prefill(source.encode(sample), sample.question, hidden_layers=(1, -1))
        b = twin.prefill(twin.encode(sample), sample.question, hidden_layers=(1, -1))
        assert b.prompt_length == a.prompt_length + twin.visual_pad_tokens
        assert torch.allclose(b.logits[: source.vocab_size], a.logits, atol=1e-4)
        for layer in (1, -1):
            real = b.hidden[layer][twin.visual_pad_tokens:]
            assert torch.allclose(real[:, : source.hidden_size], a.hidden[layer], atol=1e-3, rtol=1e-4)
            assert real[:, source.hidden_size:].abs().max() == 0
        # padded vocabulary ids score -inf: never produced, greedy or sampled
        assert torch.isneginf(b.logits[source.vocab_size:]).all()
        assert int(b.logits.argmax()) < source.vocab_size
        ours = autoregressive_generate(source, a, max_new_tokens=200).tokens  # whole answers, long ones too
        theirs = autoregressive_generate(twin, b, max_new_tokens=200).tokens
        assert ours == theirs and ours[-1] == source.eos_token_id


def test_masked_prefix_hides_any_content(tiny_models_dir):
    """Masked prefix positions (even random, non-zero ones) change no later logit."""
    vlm = load_vlm("videollava", tiny_models_dir / "videollava", quant="fp32", device="cpu")
    runner = vlm.runner
    torch.manual_seed(0)
    prompt = torch.randn(9, vlm.hidden_size)
    plain, _ = runner.run(prompt, runner.new_cache(32, torch.float32, vlm.device))
    masked = LlamaRunner(runner.language_model, runner.lm_head, masked_prefix=5)
    cache = masked.new_cache(32, torch.float32, vlm.device)
    padded, _ = masked.run(torch.cat([torch.randn(5, vlm.hidden_size) * 3, prompt]), cache)
    assert torch.allclose(padded[5:], plain, atol=1e-5)
    step_masked = masked.run(prompt[:2], cache)[0]  # decode steps after the prompt use the mask too
    full_plain, _ = runner.run(torch.cat([prompt, prompt[:2]]), runner.new_cache(32, torch.float32, vlm.device))
    assert torch.allclose(step_masked, full_plain[-2:], atol=1e-5)


def test_head_dim_ratio_four_keeps_rotary(tiny_models_dir, tmp_path, tiny_dataset):  # noqa: F811
    """A widening with head_dim x 4 (the 7b EventGPT case) keeps logits: rotary pairs land on equal frequencies."""
    prep = prepare("eventgpt", tiny_models_dir / "eventgpt", "small")
    src = prep.src
    big = LlmShape(hidden_size=4 * src.hidden_size, num_layers=src.num_layers + 1, num_heads=src.num_heads,
                   head_dim=4 * src.head_dim, intermediate_size=src.intermediate_size + 64,
                   vocab_size=src.vocab_size + 100, max_positions=src.max_positions)
    prep.plan = WidenPlan(big, 0)
    write_widened(prep, tmp_path / "eventgpt", torch.float32, shard_bytes=2**20)  # sharded, as 7b is
    assert len(list((tmp_path / "eventgpt").glob("model-*-of-*.safetensors"))) > 1
    assert (tmp_path / "eventgpt" / "model.safetensors.index.json").is_file()
    source = load_vlm("eventgpt", tiny_models_dir / "eventgpt", quant="fp32", device="cpu")
    twin = load_vlm("eventgpt", tmp_path / "eventgpt", quant="fp32", device="cpu")
    sample = list(ClipDataset(tiny_dataset))[0]
    a = source.prefill(source.encode(sample), sample.question)
    b = twin.prefill(twin.encode(sample), sample.question)
    logits_a = source.forward(a, [5, 6, 7])
    logits_b = twin.forward(b, [5, 6, 7])
    assert torch.allclose(logits_b[:, : source.vocab_size], logits_a, atol=1e-4)


def test_7b_plan_is_vicuna_shape():
    prep = prepare("videollava", MODELS_DIR / "videollava", "7b")
    assert prep.plan.shape == LlmShape(hidden_size=4096, num_layers=32, num_heads=32, head_dim=128,
                                       intermediate_size=11008, vocab_size=32064, max_positions=4096)
    assert prep.plan.visual_tokens == 2056
    assert plan_for("eventgpt", "7b", prep.src, 55).visual_tokens == 582


def test_check_flag_reports_matches(tiny_models_dir, tiny_dataset, tmp_path, capsys):  # noqa: F811
    summary = main(["--output_dir", str(tmp_path / "w"), "--shape", "small", "--eventgpt_path",
                    str(tiny_models_dir / "eventgpt"), "--videollava_path", str(tiny_models_dir / "videollava"),
                    "--check", "1", "--dataset_dir", str(tiny_dataset), "--max_new_tokens", "6"])
    assert summary["check"]["eventgpt"] == {"match": 1, "total": 1, "mismatched_ids": []}
    assert summary["check"]["videollava"]["match"] == 1
    assert "videollava: 1/1 answers token-identical" in capsys.readouterr().out


def _copy_with_config(src: Path, dst: Path, **changes) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config.update(changes)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize("changes, reason", [
    ({"model_type": "mistral"}, "unknown architecture"),
    ({"vocab_size": 40000}, "vocabulary of 40000 ids is larger than the target shape's 32004"),
    ({"hidden_act": "gelu"}, "unknown architecture"),
])
def test_bad_input_stops_with_one_line_and_writes_nothing(tiny_models_dir, tmp_path, changes, reason):
    bad = _copy_with_config(tiny_models_dir / "eventgpt", tmp_path / "bad", **changes)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        main(["--output_dir", str(out), "--eventgpt_path", str(bad),
              "--videollava_path", str(tiny_models_dir / "videollava")])
    message = str(exc.value)
    assert "\n" not in message and str(bad / "config.json") in message and reason in message
    assert not out.exists() or not any(out.iterdir())


def test_existing_output_is_refused(tiny_models_dir, tmp_path):
    (tmp_path / "out" / "eventgpt").mkdir(parents=True)
    with pytest.raises(DataError, match="already exists"):
        from common.models.widen import widen_pair

        widen_pair(tmp_path / "out", tiny_models_dir / "eventgpt", tiny_models_dir / "videollava", "small")
