"""scripts.pair_report: issue 14's checks from evaluate_pair statistics (no models needed)."""

from __future__ import annotations

import json

import pytest


def _model(exact: float, f1: float, key: float = 0.5) -> dict:
    return {"exact": exact, "f1": f1, "key": key}


def _block(n: int, target: dict, draft: dict, blind: dict, tokens=(10.0, 10.0), agreement=0.5) -> dict:
    return {"samples": n, "videollava": target, "eventgpt": draft, "blind": blind, "token_agreement": agreement,
            "answer_agreement": 0.1, "mean_common_prefix": 3.0,
            "mean_tokens": {"videollava": tokens[0], "eventgpt": tokens[1]}}


def _stats(draft_motion_exact: float, bench_tokens: float) -> dict:
    return {
        "overall": _block(100, _model(0.6, 0.9), _model(0.4, 0.7), _model(0.3, 0.6)),
        "groups": {"motion": _block(40, _model(0.6, 0.9), _model(draft_motion_exact, 0.8), _model(0.4, 0.6))},
        "long_questions": {
            "What are the key elements in this scene?": _block(10, _model(0, 0.8), _model(0, 0.6), _model(0, 0.5),
                                                               (bench_tokens, 50.0), 0.5),
            "What happened in this clip?": _block(10, _model(0, 0.8), _model(0, 0.6), _model(0, 0.5), (100.0, 90.0), 0.2),
        },
    }


def test_checks_pass_and_fail_on_the_measured_values():
    from scripts.pair_report import checks, long_token_agreement

    good = checks(_stats(0.5, 60.0), 12.6)
    assert [passed for _, passed, _ in good] == [True, True, True, True]
    bad = checks(_stats(0.4, 30.0), 51.0)  # short benchmark answers, draft at blind level, too big
    assert [passed for _, passed, _ in bad] == [False, True, False, False]
    assert "30.0 tokens" in bad[0][2]
    # target positions 600 (agreement 0.5) and 1000 (0.2): (300 + 200) / 1600
    assert long_token_agreement(_stats(0.5, 60.0)["long_questions"]) == pytest.approx(500 / 1600)


def test_cli_prints_the_section_and_rejects_other_files(tmp_path, capsys):
    from common.errors import DataError
    from scripts.pair_report import main

    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "weights.bin").write_bytes(b"x" * 2_000_000)
    (tmp_path / "results.json").write_text(json.dumps({"samples": [], "statistics": _stats(0.5, 60.0)}))
    text = main(["--results", str(tmp_path / "results.json"), "--models_dir", str(tmp_path / "models")])
    assert "| models/ < 50 MB | yes | 2.0 MB |" in text
    assert "Token agreement on the long answers (all long-answer questions): 0.312." in text
    (tmp_path / "bad.json").write_text("[]")
    with pytest.raises(DataError, match="bad.json"):
        main(["--results", str(tmp_path / "bad.json"), "--models_dir", str(tmp_path / "models")])
