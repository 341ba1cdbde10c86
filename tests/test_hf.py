"""Hugging Face checkpoint folders: round trips, dtypes, tied weights, clear errors and atomic saves."""
from __future__ import annotations

import json
import random
import pathlib

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import minicwac.io.hf
from minicwac.io.hf import load_checkpoint, load_pretrained, save_pretrained
from minicwac.io.model import GPT
from minicwac.io.tokenizer import ChatTokenizer

from conftest import tiny_config

IDS = torch.tensor([[1, 5, 9, 33, 7, 2], [1, 4, 4, 60, 12, 3]])


@pytest.fixture
def model(tok):
    torch.manual_seed(0)
    return GPT(tiny_config(vocab_size=tok.vocab_size, initializer_range=0.2, bos_token_id=tok.bos_token_id,
                           eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)).eval()


@pytest.fixture
def ckpt(model, tok, tmp_path):
    """A saved checkpoint folder."""
    return save_pretrained(model, tok, tmp_path / "ckpt")


def test_round_trip_identical_logits(model, tok, ckpt):
    """save_pretrained -> load_pretrained gives bit-identical float32 logits and the HF file set."""
    names = {p.name for p in ckpt.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["torch_dtype"] == "float32" and cfg["hidden_size"] == 32 and cfg["vocab_size"] == tok.vocab_size
    loaded = load_pretrained(ckpt)
    assert loaded.config == model.config and not loaded.training
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    with torch.no_grad():
        assert torch.equal(loaded(IDS), model(IDS))
    m2, t2 = load_checkpoint(ckpt)
    assert t2.encode("How do I bake bread?") == tok.encode("How do I bake bread?")
    assert isinstance(t2, ChatTokenizer)


def test_load_as_bfloat16(model, ckpt):
    """dtype=torch.bfloat16 converts every parameter; the model still runs."""
    m16 = load_pretrained(ckpt, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in m16.parameters())
    for k, v in m16.state_dict().items():
        assert torch.equal(v, model.state_dict()[k].to(torch.bfloat16))
    assert m16(IDS).dtype == torch.bfloat16


def test_bfloat16_checkpoint_keeps_its_dtype(model, tmp_path):
    """A bf16 model saves as bf16 (torch_dtype in config.json) and loads back as bf16 by default."""
    m16 = GPT(model.config, dtype=torch.bfloat16)
    m16.load_state_dict(model.state_dict())
    path = save_pretrained(m16, None, tmp_path / "bf16")
    assert json.loads((path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    loaded = load_pretrained(path)
    assert all(p.dtype == torch.bfloat16 for p in loaded.parameters())
    assert torch.equal(loaded(IDS), m16.eval()(IDS))


def test_tied_round_trip(tok, tmp_path):
    """A tied model stores no lm_head (HF convention) and loads with the head tied to the embeddings again."""
    torch.manual_seed(1)
    m = GPT(tiny_config(vocab_size=tok.vocab_size, tie_word_embeddings=True, initializer_range=0.2)).eval()
    path = save_pretrained(m, tok, tmp_path / "tied")
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert "lm_head.weight" not in keys and "model.embed_tokens.weight" in keys
    loaded = load_pretrained(path)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    with torch.no_grad():
        assert torch.equal(loaded(IDS), m(IDS))
    assert loaded.num_params() == m.num_params()


def test_save_replaces_existing_checkpoint(model, tok, ckpt):
    """Saving over a folder replaces it and leaves no temporary or backup folder behind."""
    with torch.no_grad():
        model.model.norm.weight.mul_(2.0)
    save_pretrained(model, tok, ckpt)
    with torch.no_grad():
        assert torch.equal(load_pretrained(ckpt)(IDS), model(IDS))
    assert [p.name for p in ckpt.parent.iterdir()] == ["ckpt"]


# --- errors ----------------------------------------------------------------------------------------------------
def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pretrained(tmp_path / "nope")


def test_missing_config(ckpt):
    (ckpt / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"config\.json is missing"):
        load_pretrained(ckpt)


@pytest.mark.parametrize("text, match", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
])
def test_config_not_json_object(ckpt, text, match):
    (ckpt / "config.json").write_text(text)
    with pytest.raises(ValueError, match=match):
        load_pretrained(ckpt)


def test_config_binary_garbage(ckpt):
    (ckpt / "config.json").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_pretrained(ckpt)


def _edit_config(ckpt, **kw):
    f = ckpt / "config.json"
    cfg = json.loads(f.read_text())
    cfg.update(kw)
    f.write_text(json.dumps(cfg))


@pytest.mark.parametrize("mt", ["mixtral", None])
def test_unsupported_model_type(ckpt, mt):
    _edit_config(ckpt, model_type=mt)
    with pytest.raises(ValueError, match=f"model_type {mt!r} is not supported"):
        load_pretrained(ckpt)


def test_invalid_config_values(ckpt):
    _edit_config(ckpt, num_key_value_heads=3)
    with pytest.raises(ValueError, match="invalid config"):
        load_pretrained(ckpt)


def test_missing_safetensors(ckpt):
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors is missing"):
        load_pretrained(ckpt)


@pytest.mark.parametrize("how", ["garbage", "bad_header", "half", "minus_3_bytes", "4_bytes", "empty"])
def test_corrupt_safetensors(ckpt, how):
    """Garbage bytes and truncated files give one ValueError naming the file."""
    f = ckpt / "model.safetensors"
    data = f.read_bytes()
    if how == "garbage":
        new = random.Random(0).randbytes(2000)
    elif how == "bad_header":  # a plausible header length, then bytes that are not JSON
        new = (100).to_bytes(8, "little") + b"\x00not a json header" * 10
    elif how == "half":
        new = data[: len(data) // 2]
    elif how == "minus_3_bytes":
        new = data[:-3]
    elif how == "4_bytes":
        new = data[:4]
    else:
        new = b""
    f.write_bytes(new)
    with pytest.raises(ValueError, match=r"model\.safetensors is not a readable safetensors file"):
        load_pretrained(ckpt)


def _rewrite_tensors(ckpt, edit):
    f = ckpt / "model.safetensors"
    sd = load_file(str(f))
    edit(sd)
    save_file(sd, str(f))


def test_missing_tensor(ckpt):
    _rewrite_tensors(ckpt, lambda sd: sd.pop("model.layers.1.mlp.down_proj.weight"))
    with pytest.raises(ValueError, match=r"missing tensor model\.layers\.1\.mlp\.down_proj\.weight"):
        load_pretrained(ckpt)


def test_unexpected_tensor(ckpt):
    _rewrite_tensors(ckpt, lambda sd: sd.__setitem__("model.layers.7.extra.weight", torch.zeros(3)))
    with pytest.raises(ValueError, match=r"unexpected tensor model\.layers\.7\.extra\.weight"):
        load_pretrained(ckpt)


def test_wrong_shape(ckpt):
    _rewrite_tensors(ckpt, lambda sd: sd.__setitem__("model.norm.weight", torch.ones(31)))
    with pytest.raises(ValueError, match=r"model\.norm\.weight has shape \(31,\), expected \(32,\)"):
        load_pretrained(ckpt)


def test_config_disagrees_with_weights(ckpt):
    """A config.json that does not match the tensors names the first mismatching tensor."""
    _edit_config(ckpt, intermediate_size=48)
    with pytest.raises(ValueError, match=r"mlp\.\w+_proj\.weight has shape"):
        load_pretrained(ckpt)


# --- atomic save -----------------------------------------------------------------------------------------------
def test_failed_save_leaves_old_checkpoint_intact(model, tok, ckpt, monkeypatch):
    """If writing the weights fails, the old folder is untouched and loadable, and no temp folder remains."""
    with torch.no_grad():
        before = load_pretrained(ckpt)(IDS)
    files_before = {p.name: p.read_bytes() for p in ckpt.iterdir()}

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(minicwac.io.hf, "save_file", boom)
    with torch.no_grad():
        model.model.norm.weight.mul_(3.0)
    with pytest.raises(RuntimeError, match="disk full"):
        save_pretrained(model, tok, ckpt)
    assert [p.name for p in ckpt.parent.iterdir()] == ["ckpt"]
    assert {p.name: p.read_bytes() for p in ckpt.iterdir()} == files_before
    with torch.no_grad():
        assert torch.equal(load_pretrained(ckpt)(IDS), before)


def test_failed_first_save_leaves_nothing(model, tok, tmp_path, monkeypatch):
    monkeypatch.setattr(minicwac.io.hf, "save_file", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        save_pretrained(model, tok, tmp_path / "new")
    assert list(tmp_path.iterdir()) == []


def test_failed_final_rename_restores_old_checkpoint(model, tok, ckpt, monkeypatch):
    """Where the one-step swap is not available: a failure between the two renames must not leave `path`
    missing."""
    import minicwac.core.files as files
    monkeypatch.setattr(files, "_exchange", lambda a, b: False)
    real_rename = pathlib.Path.rename

    def rename(self, target):
        if ".tmp-" in self.name:  # the temp folder moving into place
            raise OSError("rename failed")
        return real_rename(self, target)

    monkeypatch.setattr(pathlib.Path, "rename", rename)
    with pytest.raises(OSError, match="rename failed"):
        save_pretrained(model, tok, ckpt)
    monkeypatch.undo()
    assert load_pretrained(ckpt) is not None


def test_save_to_unwritable_location(model, tmp_path):
    """A path below a regular file fails with an OSError naming the path."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OSError, match="cannot write"):
        save_pretrained(model, None, blocker / "ckpt")


def test_checkpoint_is_readable_by_others(ckpt):
    """The folder is 755 and its files 644 (a temporary folder is private until it is renamed into place)."""
    import stat
    assert stat.S_IMODE(ckpt.stat().st_mode) == 0o755
    for f in ckpt.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f.name
