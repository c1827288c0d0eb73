"""Bad checkpoints and training states: each is refused with ONE line naming the file, and nothing is written.

Every case is generated here from the session's tiny checkpoints (``tiny_models_dir``): a copy of one
model folder is broken in one way, loaded through ``load_vlm``, and must raise ``ModelLoadError`` whose
message is a single line naming the file (or folder) and the problem; the folder is left as it was.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from common.models.errors import ModelLoadError
from common.models.loader import load_vlm

WEIGHTS = "model.safetensors"


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``folder`` with its size and modification time (to see that nothing was written)."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()} if folder.is_dir() else {}


def _rewrite_weights(folder: Path, change) -> None:
    weights = load_file(folder / WEIGHTS)
    change(weights)
    save_file(weights, folder / WEIGHTS, metadata={"format": "pt"})


def _edit_config(folder: Path, change) -> None:
    config = json.loads((folder / "config.json").read_text())
    change(config.get("text_config", config))  # Video-LLaVA keeps the LLM's sizes in text_config
    (folder / "config.json").write_text(json.dumps(config))


def _first_key(folder: Path, part: str) -> str:
    return next(k for k in load_file(folder / WEIGHTS) if part in k)


def _truncate(folder: Path) -> str:
    data = (folder / WEIGHTS).read_bytes()
    (folder / WEIGHTS).write_bytes(data[: len(data) // 2])
    return WEIGHTS


def _garbage(folder: Path) -> str:
    (folder / WEIGHTS).write_bytes(b"\x00" * 7)
    return WEIGHTS


def _empty(folder: Path) -> str:
    (folder / WEIGHTS).write_bytes(b"")
    return WEIGHTS


def _huge_header(folder: Path) -> str:
    data = (folder / WEIGHTS).read_bytes()
    (folder / WEIGHTS).write_bytes((2**40).to_bytes(8, "little") + data[8:])
    return WEIGHTS


def _shard(folder: Path, drop_second: bool = False, lie: bool = False) -> None:
    weights = load_file(folder / WEIGHTS)
    keys = sorted(weights)
    halves = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    weight_map = {}
    for name, part in halves.items():
        save_file({k: weights[k] for k in part}, folder / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    if lie:
        weight_map["model.not_in_any_shard.weight"] = "model-00001-of-00002.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / WEIGHTS).unlink()
    if drop_second:
        (folder / "model-00002-of-00002.safetensors").unlink()


def _missing_shard(folder: Path) -> str:
    _shard(folder, drop_second=True)
    return "model-00002-of-00002.safetensors"


def _index_lists_absent_tensor(folder: Path) -> str:
    _shard(folder, lie=True)
    return "model.not_in_any_shard.weight"


def _index_not_json(folder: Path) -> str:
    _shard(folder)
    (folder / "model.safetensors.index.json").write_text("{not json")
    return "model.safetensors.index.json"


def _extra_key(folder: Path) -> str:
    _rewrite_weights(folder, lambda w: w.__setitem__("model.stray_adapter.weight", torch.zeros(4, 4)))
    return "model.stray_adapter.weight"


def _missing_key(folder: Path) -> str:
    key = _first_key(folder, "layers.0.mlp.down_proj")
    _rewrite_weights(folder, lambda w: w.pop(key))
    return "down_proj"


def _fewer_layers(folder: Path) -> str:
    _edit_config(folder, lambda c: c.__setitem__("num_hidden_layers", c["num_hidden_layers"] - 1))
    return "does not use"


def _more_layers(folder: Path) -> str:
    _edit_config(folder, lambda c: c.__setitem__("num_hidden_layers", c["num_hidden_layers"] + 1))
    return "missing weights"


def _wrong_shape(folder: Path) -> str:
    key = _first_key(folder, "layers.0.mlp.up_proj")
    _rewrite_weights(folder, lambda w: w.__setitem__(key, w[key][:-1].clone()))
    return "up_proj"


def _wider_config(folder: Path) -> str:
    _edit_config(folder, lambda c: c.__setitem__("intermediate_size", c["intermediate_size"] + 64))
    return "another shape"


def _vision_config_removed(folder: Path) -> str:
    config = json.loads((folder / "config.json").read_text())
    if config["model_type"] == "EventChat_llama":  # then the tower is looked up by name: an unknown one
        config.pop("visual_tower_config")
        config["mm_visual_tower"] = "nobody/no-such-clip"
    else:  # then transformers' default CLIP (768 wide) is built: other shapes than the weights
        config.pop("vision_config")
    (folder / "config.json").write_text(json.dumps(config))
    return "config.json"


def _config_not_json(folder: Path) -> str:
    (folder / "config.json").write_text("{'model_type': 'llama',")
    return "config.json"


def _config_a_list(folder: Path) -> str:
    (folder / "config.json").write_text("[1, 2, 3]")
    return "config.json"


def _unknown_model_type(folder: Path) -> str:
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "llama_from_the_future"
    (folder / "config.json").write_text(json.dumps(config))
    return "llama_from_the_future"


def _no_config(folder: Path) -> str:
    (folder / "config.json").unlink()
    return "config.json"


def _no_weights(folder: Path) -> str:
    (folder / WEIGHTS).unlink()
    return "no weight files"


def _no_folder(folder: Path) -> str:
    shutil.rmtree(folder)
    return "no such checkpoint folder"


# (case, breaks the copied folder and returns a text the one-line message must also hold)
CASES = {
    "truncated_safetensors": _truncate,
    "garbage_safetensors": _garbage,
    "empty_safetensors": _empty,
    "absurd_header_length": _huge_header,
    "missing_shard": _missing_shard,
    "index_lists_absent_tensor": _index_lists_absent_tensor,
    "index_not_json": _index_not_json,
    "extra_key": _extra_key,
    "missing_key": _missing_key,
    "fewer_layers_in_config": _fewer_layers,
    "more_layers_in_config": _more_layers,
    "wrong_shape": _wrong_shape,
    "config_wider_than_weights": _wider_config,
    "vision_config_removed": _vision_config_removed,
    "config_not_json": _config_not_json,
    "config_a_json_list": _config_a_list,
    "unknown_model_type": _unknown_model_type,
    "no_config": _no_config,
    "no_weights": _no_weights,
    "no_folder": _no_folder,
}


@pytest.mark.parametrize("kind", ["eventgpt", "videollava"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_checkpoint_is_one_line_naming_the_file(tiny_models_dir, tmp_path, kind, case):
    folder = tmp_path / f"{kind}_{case}"
    shutil.copytree(tiny_models_dir / kind, folder)
    expected = CASES[case](folder)
    before = _snapshot(folder)
    with pytest.raises(ModelLoadError) as info:
        load_vlm(kind, folder, quant="fp32", device="cpu")
    message = str(info.value)
    assert "\n" not in message and len(message) < 600, message
    assert str(folder) in message, message  # names the checkpoint (folder or the file inside it)
    assert expected in message, message
    assert _snapshot(folder) == before  # nothing written, nothing half-written
    assert _snapshot(tiny_models_dir / kind)  # the source checkpoint is untouched (still there)


def test_file_level_damage_names_the_file_itself(tiny_models_dir, tmp_path):
    folder = tmp_path / "videollava"
    shutil.copytree(tiny_models_dir / "videollava", folder)
    _truncate(folder)
    with pytest.raises(ModelLoadError, match=r"videollava/model\.safetensors: corrupt or truncated .*re-download"):
        load_vlm("videollava", folder, quant="fp32", device="cpu")


def test_4bit_refuses_layers_the_packed_cpu_path_cannot_pack(tmp_path, monkeypatch):
    """A 96-wide Video-LLaVA under --quant 4bit on an AVX512-BF16 CPU (forced): one line, not a reshape error."""
    import bitsandbytes.nn.modules as bnb_modules

    from common.models.tiny import TinySize, build_tokenizer, build_videollava, save_videollava

    size = TinySize(hidden_size=96, num_layers=1, num_heads=4, intermediate_size=192, vision_hidden=16,
                    vision_layers=1, vision_heads=2, image_size=28, patch_size=14)
    model, tok = build_videollava(build_tokenizer(["a red car moves left"], vocab_size=300), size)
    folder = save_videollava(model, tok, tmp_path / "videollava96", size)
    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True)
    with pytest.raises(ModelLoadError) as info:
        load_vlm("videollava", folder, quant="4bit", device="cpu")
    message = str(info.value)
    assert "\n" not in message and str(folder) in message
    assert "multiple of 64" in message and "(96->96)" in message and "--quant 8bit or fp32" in message


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_adapter_checkpoints_are_one_line_naming_the_file(tmp_path, damage):
    """A damaged hidden-adapter or TokenAdapter weights file: ModelLoadError naming it, not a raw SafetensorError."""
    from feature_alignment.hidden_adapter import create_adapter, load_any_adapter, save_adapter
    from token_alignment.token_adapter import TokenAdapter, TokenAdapterConfig

    hidden_file = save_adapter(create_adapter(1, 16, 32), tmp_path / "best.safetensors", {"epoch": 1})
    token_dir = TokenAdapter(TokenAdapterConfig(draft_vocab_size=40, target_vocab_size=40, vocab_limit=32, d_model=16,
                                                n_layers=1, n_heads=2)).save_pretrained(tmp_path / "token")
    token_file = token_dir / "model.safetensors"
    for file in (hidden_file, token_file):
        data = file.read_bytes()
        file.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x00" * 7)
    for load, file in ((lambda: load_any_adapter(hidden_file), hidden_file),
                       (lambda: TokenAdapter.from_pretrained(token_dir), token_file)):
        with pytest.raises(ModelLoadError) as info:
            load()
        message = str(info.value)
        assert "\n" not in message and message.startswith(f"{file}: corrupt or truncated safetensors file")
        assert "again" in message  # the fix: train / save it again


# ----------------------------------------------------------------------------- training states


class _Payload:
    """Unpickling this runs code (writes the marker file): what a planted state file would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


@pytest.fixture(scope="module")
def train_data(tmp_path_factory):
    from tests.data_fixtures import make_dataset

    root = tmp_path_factory.mktemp("bad_state_data")
    make_dataset(root, num_clips=1, split="train", seed=5)
    return root


def _planted_pickle(out: Path, marker: Path, name: str) -> None:
    torch.save({"epoch": 1, "models": _Payload(marker)}, out / name)


def _truncated_state(out: Path, marker: Path, name: str) -> None:
    from common.models.state_file import save_state

    save_state({"epoch": 1, "w": torch.ones(64)}, out / name)
    data = (out / name).read_bytes()
    (out / name).write_bytes(data[: len(data) - 10])


def _foreign_safetensors(out: Path, marker: Path, name: str) -> None:
    save_file({"w": torch.ones(3)}, out / name, metadata={"format": "pt"})


def _state_of_another_script(out: Path, marker: Path, name: str) -> None:
    from common.models.state_file import save_state

    save_state({"something": [1, 2, 3]}, out / name)


def _good_state(**extra) -> dict:
    return {"epoch": 1, "epochs": 2, "step": 1, "seed": 0, "size_preset": "tiny", "history": [],
            "optimizers": {}, "schedulers": {}, **extra}


def _state_without_pair(out: Path, marker: Path, name: str) -> None:
    from common.models.state_file import save_state

    save_state(_good_state(models={}), out / name)


def _state_weights_do_not_fit(out: Path, marker: Path, name: str, pair: Path | None = None) -> None:
    from common.models.state_file import save_state

    for kind in ("eventgpt", "videollava"):
        shutil.copytree(pair / kind, out / kind)
    save_state(_good_state(models={"eventgpt": {"model.stray.weight": torch.ones(2)}}), out / name)


STATE_CASES = {
    "planted_pickle": (_planted_pickle, "training_state.safetensors", "not a readable training state"),
    "planted_pickle_old_name": (_planted_pickle, "training_state.pt", "is not loaded"),
    "truncated_state": (_truncated_state, "training_state.safetensors", "not a readable training state"),
    "foreign_safetensors": (_foreign_safetensors, "training_state.safetensors", "format"),
    "state_of_another_script": (_state_of_another_script, "training_state.safetensors", "not a training state"),
    "state_without_its_pair": (_state_without_pair, "eventgpt", "no such checkpoint folder"),
    "state_weights_do_not_fit": (_state_weights_do_not_fit, "training_state.safetensors", "do not fit"),
}


@pytest.mark.parametrize("case", sorted(STATE_CASES))
def test_bad_training_state_is_refused_with_one_line(train_data, tiny_models_dir, tmp_path, case):
    from scripts.train_tiny_pair import main

    make, name, expected = STATE_CASES[case]
    out, marker = tmp_path / "pair", tmp_path / "marker"
    out.mkdir()
    if make is _state_weights_do_not_fit:
        make(out, marker, "training_state.safetensors", pair=tiny_models_dir)
    else:
        make(out, marker, "training_state.safetensors" if name == "eventgpt" else name)
    before = _snapshot(out)
    with pytest.raises(SystemExit) as info:
        main(["--dataset_dir", str(train_data), "--output_dir", str(out), "--size_preset", "tiny",
              "--epochs", "1", "--num_workers", "1", "--device", "cpu"])
    message = str(info.value.code)
    assert "\n" not in message and str(out / name) in message and expected in message, message
    assert "--no_resume" in message
    assert not marker.exists()  # no code from the file ran
    assert _snapshot(out) == before  # nothing else written (no half-built pair)


def test_state_file_round_trip_keeps_types_and_values(tmp_path):
    from common.models.state_file import load_state, save_state

    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.98))
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    state = {"epoch": 2, "seed": None, "lr": float("nan"), "tags": ("a", 1), "history": [{"loss": 1.5}],
             "models": {"m": model.state_dict()}, "optimizers": {"m": opt.state_dict()}}
    save_state(state, tmp_path / "s.safetensors")
    back = load_state(tmp_path / "s.safetensors", "fix")
    assert back["epoch"] == 2 and back["seed"] is None and back["tags"] == ("a", 1)
    assert back["history"] == [{"loss": 1.5}] and back["lr"] != back["lr"]  # NaN survives
    assert torch.equal(back["models"]["m"]["weight"], model.weight.detach())
    restored = torch.optim.AdamW(torch.nn.Linear(4, 3).parameters())
    restored.load_state_dict(back["optimizers"]["m"])
    assert restored.state_dict()["param_groups"][0]["betas"] == (0.9, 0.98)
    assert torch.equal(restored.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    with pytest.raises(TypeError, match="cannot store a object"):
        save_state({"x": object()}, tmp_path / "t.safetensors")
    assert not (tmp_path / "t.safetensors").exists()
