"""Checkpoints as Hugging Face folders: config.json, model.safetensors, tokenizer.json, tokenizer_config.json.

Because the model's modules carry Hugging Face's names, saving and loading is a key-for-key copy, guarded by
checks that name what is wrong. Nothing is ever pickled. Writes go to a temporary folder that is renamed into
place at the end, so an interrupted save never leaves a half-written checkpoint.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .model import GPT, Config
from .tokenizer import ChatTokenizer

SUPPORTED_MODEL_TYPES = ("llama",)


def _read_config(path: Path) -> Config:
    f = path / "config.json"
    if not path.is_dir():
        raise FileNotFoundError(f"model folder {path} does not exist; expected a folder with config.json and "
                                "model.safetensors")
    if not f.is_file():
        raise FileNotFoundError(f"{f} is missing; expected a Hugging Face model folder")
    try:
        d = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{f} is not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{f} holds {type(d).__name__}, expected a JSON object")
    mt = d.get("model_type")
    if mt not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"{f}: model_type {mt!r} is not supported; expected one of {SUPPORTED_MODEL_TYPES}")
    try:
        return Config.from_dict(d)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{f}: invalid config ({e})") from None


def load_pretrained(path: str | Path, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None) -> GPT:
    """Load a Hugging Face folder into the minicwac model, on `device`, in the checkpoint's dtype unless `dtype`.

    The model is built on the meta device and the tensors are assigned, so no second (float32) copy of the
    weights is ever made.
    """
    path = Path(path)
    cfg = _read_config(path)
    st = path / "model.safetensors"
    if not st.is_file():
        raise FileNotFoundError(f"{st} is missing; expected the weights as model.safetensors")
    with torch.device("meta"):
        model = GPT(cfg, device="meta")
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        expected.pop("lm_head.weight")
    sd = {}
    try:
        with safe_open(str(st), framework="pt", device=str(device)) as f:
            keys = set(f.keys())
            missing, unexpected = sorted(set(expected) - keys), sorted(keys - set(expected))
            if missing:
                raise ValueError(f"{st}: missing tensor {missing[0]} ({len(missing)} missing in all)")
            if unexpected:
                raise ValueError(f"{st}: unexpected tensor {unexpected[0]} ({len(unexpected)} unexpected in all)")
            for k in expected:
                t = f.get_tensor(k)
                if tuple(t.shape) != expected[k]:
                    raise ValueError(f"{st}: {k} has shape {tuple(t.shape)}, expected {expected[k]} from config.json")
                sd[k] = t.to(dtype) if dtype is not None else t
    except SafetensorError as e:
        raise ValueError(f"{st} is not a readable safetensors file ({e})") from None
    if cfg.tie_word_embeddings:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    model.load_state_dict(sd, assign=True)
    if cfg.tie_word_embeddings:  # assign replaced the parameter objects: tie them again
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()


@contextmanager
def atomic_folder(path: str | Path):
    """Yield a temporary folder beside `path`; on success it replaces `path` (an old one is removed only after
    the new one is in place), on any error it is deleted and `path` is left as it was."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    except OSError as e:
        raise OSError(f"cannot write {path}: {e.strerror or e}") from None
    old = path.with_name(f".{path.name}.old")
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp makes the folder private; a checkpoint is meant to be shared
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not path.exists():  # interrupted between the two renames: put the old one back
            old.rename(path)
        raise


def save_pretrained(model: GPT, tokenizer: ChatTokenizer | None, path: str | Path) -> Path:
    """Write model (and tokenizer) as a Hugging Face folder at `path`, replacing it atomically if it exists."""
    with atomic_folder(path) as tmp:
        sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            sd.pop("lm_head.weight")  # HF convention: the tied head is not stored
        save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(
            {**model.config.to_dict(), "torch_dtype": str(next(model.parameters()).dtype).removeprefix("torch.")},
            indent=2))
        (tmp / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": model.config.bos_token_id, "eos_token_id": model.config.eos_token_id,
             "pad_token_id": model.config.pad_token_id}, indent=2))
        if tokenizer is not None:
            tokenizer.save(tmp)
    return Path(path)


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None) -> tuple[GPT, ChatTokenizer]:
    """Model and tokenizer from one folder."""
    return load_pretrained(path, device, dtype), ChatTokenizer.load(path)
