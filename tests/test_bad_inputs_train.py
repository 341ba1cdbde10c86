"""Bad inputs and quiet surprises on the training side, each ending in one line naming what is wrong: a diverged
run (NaN/Inf) that must leave no finished model, the data file's encoding and form named by file and line, the
Python API's numbers, periods longer than the run, and the adapter's base path. Sharded (FSDP2) cases:
test_dist.py."""
from __future__ import annotations

import gzip
import json
import os
import warnings

import pytest
import torch
from conftest import main_error, tiny_config
from test_kit import conversations, files  # noqa: F401 -- files: the tiny model folder and data fixture

from minicwac.__main__ import main
from minicwac.core.cwac import DivergedError
from minicwac.io.hf import load_checkpoint, save_pretrained
from minicwac.io.model import GPT
from minicwac.kit import RunOptions, encode_data, finetune, load_conversations

GOOD = json.dumps({"prompt": "a", "completion": "b"})


def _finetune_cli(d, *flags):
    return ["finetune", "--model", str(d / "aligned"), "--data", str(d / "data.jsonl"), "--method", "sft",
            "--batch-size", "4", "--quiet", *flags]


# --- a diverged run: one line, no finished model, the last good checkpoint kept -------------------------------
@pytest.mark.parametrize("flags, step", [
    pytest.param([], 2, id="no-checkpoint"),
    pytest.param(["--save-every", "1"], 2, id="checkpoint-kept"),
])
def test_a_diverged_run_stops_and_writes_no_model(files, flags, step):
    """--lr 1e6: step 1 moves the weights by ~1e6 and step 2's loss is Inf/NaN. Before: every weight NaN, the run
    wrote model.safetensors and history.json and exited 0."""
    d = files
    msg = main_error(_finetune_cli(d, "--out", str(d / "run"), "--steps", "6", "--lr", "1e6", *flags))
    assert f"training diverged at step {step} of 6" in msg and "lower learning rate than lr=1e+06" in msg, msg
    written = sorted(p.name for p in (d / "run").iterdir())
    assert written == (["checkpoint"] if flags else []), written  # no model, no config, no history.json
    if flags:  # the checkpoint of the last finite step, whole and finite
        ckpt = d / "run" / "checkpoint"
        assert json.loads((ckpt / "state.json").read_text())["step"] == step - 1
        from safetensors.torch import load_file
        assert all(bool(torch.isfinite(t).all()) for t in load_file(ckpt / "params.safetensors").values())


def test_a_diverged_step_is_not_applied(files):
    """Through the API: the model the caller passed keeps the weights of the last finite step (no NaN update),
    and the error is a DivergedError (a ValueError)."""
    d = files
    model, tok = load_checkpoint(d / "aligned")
    seqs, _ = encode_data(tok, load_conversations(d / "data.jsonl"), 64)
    with pytest.raises(DivergedError, match=r"training diverged at step \d+ of 6"):
        finetune(model, tok, seqs, None, d / "run", method="sft", steps=6, lr=1e6, batch_size=4, progress=False)
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    assert not any((d / "run").iterdir())


def test_a_lora_run_resumes(files, monkeypatch):
    """Interrupted after its step-2 checkpoint, a LoRA run resumes to the weights of an uninterrupted one. Before:
    always refused as "a checkpoint of another run" (the record's target tuple against state.json's list)."""
    from minicwac.core.lora import LoRASettings
    from minicwac.kit import finetuning
    d = files
    _, tok = load_checkpoint(d / "aligned")
    seqs, _ = encode_data(tok, load_conversations(d / "data.jsonl"), 64)
    kw = dict(method="sft", steps=4, batch_size=4, lr=1e-2, lora=LoRASettings(2), progress=False)
    finetune(load_checkpoint(d / "aligned")[0], tok, seqs, None, d / "whole", **kw)
    save = finetuning._save_state

    def save_then_die(*args):
        save(*args)
        raise KeyboardInterrupt  # as if the job were killed right after the checkpoint

    monkeypatch.setattr(finetuning, "_save_state", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        finetune(load_checkpoint(d / "aligned")[0], tok, seqs, None, d / "part", run=RunOptions(save_every=2), **kw)
    monkeypatch.setattr(finetuning, "_save_state", save)
    finetune(load_checkpoint(d / "aligned")[0], tok, seqs, None, d / "part", run=RunOptions(save_every=2,
                                                                                               resume=True), **kw)
    whole, part = load_checkpoint(d / "whole")[0], load_checkpoint(d / "part")[0]
    for (n, a), b in zip(whole.named_parameters(), part.parameters()):
        torch.testing.assert_close(b, a, atol=0, rtol=0, msg=n)


# --- a damaged checkpoint: --resume names its state.json ---------------------------------------------------------
@pytest.mark.parametrize("state, match", [
    pytest.param(b'{"step": 2, "hist', r"state.json cannot be read \(Unterminated string", id="truncated"),
    pytest.param(b"\xff\xfe{}", r"state.json cannot be read \(.*utf-8", id="not-utf8"),
    pytest.param(b"[1, 2]", r"state.json is not a checkpoint's state \(run, step, history\)", id="not-an-object"),
    pytest.param(b'{"step": 2, "history": {}}', r"state.json is not a checkpoint's state", id="no-run"),
    pytest.param(None, r"state.json cannot be read \(.*No such file", id="missing"),
])
def test_a_damaged_checkpoint_state_is_named(files, state, match):
    """Before: "Expecting value: line 1 column 1" or a TypeError/KeyError with no file named."""
    d = files
    model, tok = load_checkpoint(d / "aligned")
    seqs, _ = encode_data(tok, load_conversations(d / "data.jsonl"), 64)
    (d / "run" / "checkpoint").mkdir(parents=True)
    if state is not None:
        (d / "run" / "checkpoint" / "state.json").write_bytes(state)
    with pytest.raises(ValueError, match=match) as e:
        finetune(model, tok, seqs, None, d / "run", method="sft", steps=4, batch_size=4, progress=False,
                 run=RunOptions(save_every=2, resume=True))
    assert str(d / "run" / "checkpoint" / "state.json") in str(e.value) and "\n" not in str(e.value)
    assert sorted(p.name for p in (d / "run").iterdir()) == ["checkpoint"]  # nothing written, nothing removed


@pytest.mark.parametrize("name", ["params.safetensors", "optimizer.safetensors", "state.json-deep"])
def test_a_truncated_checkpoint_file_is_named(files, name):
    """A checkpoint cut short (a full disk, a copy interrupted): --resume names the file in one line (before: a
    SafetensorError or a RecursionError traceback)."""
    d = files
    model, tok = load_checkpoint(d / "aligned")
    seqs, _ = encode_data(tok, load_conversations(d / "data.jsonl"), 64)
    _stop_after_checkpoint(model, tok, seqs, d / "run")  # a run that saved its step-2 checkpoint, then stopped
    f = d / "run" / "checkpoint" / name.removesuffix("-deep")
    f.write_bytes(b"[" * 100000 if name.endswith("-deep") else f.read_bytes()[:len(f.read_bytes()) // 2])
    model, tok = load_checkpoint(d / "aligned")
    with pytest.raises(ValueError) as e:
        finetune(model, tok, seqs, None, d / "run", method="sft", steps=4, batch_size=4, progress=False,
                 run=RunOptions(save_every=2, resume=True))
    assert str(f) in str(e.value) and "cannot be read" in str(e.value) and "\n" not in str(e.value)


def _stop_after_checkpoint(model, tok, seqs, out):
    import minicwac.kit.finetuning as ft
    save = ft._save_state

    def save_then_stop(*a, **k):
        save(*a, **k)
        raise KeyboardInterrupt  # as if the job were killed right after its checkpoint
    ft._save_state = save_then_stop
    try:
        with pytest.raises(KeyboardInterrupt):
            finetune(model, tok, seqs, None, out, method="sft", steps=4, batch_size=4, progress=False,
                     run=RunOptions(save_every=2))
    finally:
        ft._save_state = save


# --- the data file: named by file and line, like the prompt files ----------------------------------------------
DATA_CASES = [  # (id, the file's bytes, or "folder" / "devnull", the message's pattern after the path)
    ("latin-1", (GOOD + "\n" + '{"prompt": "caf\u00e9", "completion": "b"}\n').encode("latin-1"),
     r"is not UTF-8 text: line 2 has the byte 0xe9"),
    ("gzip", gzip.compress((GOOD + "\n").encode()), r"is not UTF-8 text: line \d+ has the byte 0x[0-9a-f]+ \(it is "
                                                     r"gzip-compressed: decompress it first\)"),
    ("utf-16", (GOOD + "\n").encode("utf-16"), r"is not UTF-8 text: line 1 .*UTF-16"),
    ("surrogate", (GOOD + "\n" + '{"prompt": "\\ud800 x", "completion": "b"}\n').encode(),
     r":2 holds the unpaired surrogate '\\ud800'"),
    ("surrogate-in-messages", (GOOD + "\n" + json.dumps({"messages": [{"role": "user", "content": "hi"}, {
        "role": "assistant", "content": "x"}]}).replace('"x"', '"\\udfff"') + "\n").encode(),
     r":2 holds the unpaired surrogate '\\udfff'"),
    ("deep-json", (GOOD + "\n" + "[" * 100000 + "\n").encode(), r":2 is not valid JSON \(nested too deeply\)"),
    ("nul", (GOOD + "\n" + '{"prompt": "a\0", "completion": "b"}\n').encode(), r": line 2 holds a NUL character"),
    ("folder", "folder", r" is a folder; expected a JSONL file of conversations"),
    ("devnull", "devnull", r" is not a regular file; expected a JSONL file of conversations"),
]


@pytest.mark.parametrize("content, match", [pytest.param(c, m, id=i) for i, c, m in DATA_CASES])
def test_data_file_errors_name_the_file_and_line(tmp_path, content, match):
    """Before: "'utf-8' codec can't decode byte 0xe9 in position 294" (no file), a RecursionError, a surrogate
    that passed (and failed later in the tokenizer), "does not exist" for a folder or /dev/null."""
    path = tmp_path / "data.jsonl"
    if content == "folder":
        path.mkdir()
    elif content == "devnull":
        path = os.devnull
    else:
        path.write_bytes(content)
    with pytest.raises(ValueError) as e:
        load_conversations(path)
    assert "\n" not in str(e.value)
    assert str(e.value).startswith(str(path)), str(e.value)
    assert e.match(match)
    msg = main_error(["finetune", "--model", str(tmp_path / "nomodel"), "--data", str(path), "--method", "sft",
                      "--out", str(tmp_path / "out")])  # the data is read before the model
    assert str(path) in msg and not (tmp_path / "out").exists(), msg


# --- the Python API's numbers: refused before OUT is touched ---------------------------------------------------
@pytest.mark.parametrize("kw, match", [
    pytest.param(dict(epochs=1, batch_size=0), r"batch_size=0, expected an integer >= 1", id="epochs-batch-0"),
    pytest.param(dict(steps=2, batch_size=0), r"batch_size=0, expected an integer >= 1", id="steps-batch-0"),
    pytest.param(dict(steps=2, batch_size=2.5), r"batch_size=2.5, expected an integer >= 1", id="batch-float"),
    pytest.param(dict(steps=0), r"steps=0, expected an integer >= 1", id="steps-0"),
    pytest.param(dict(steps=2, lr=float("nan")), r"lr=nan, expected a finite number > 0", id="lr-nan"),
    pytest.param(dict(steps=2, lr=0.0), r"lr=0.0, expected a finite number > 0", id="lr-0"),
    pytest.param(dict(steps=2, lr=float("inf")), r"lr=inf, expected a finite number > 0", id="lr-inf"),
    pytest.param(dict(epochs=float("inf")), r"epochs=inf, expected a finite number > 0", id="epochs-inf"),
])
def test_finetune_api_numbers_are_refused(files, kw, match):
    """Before: ZeroDivisionError (epochs with batch_size 0), a NaN run, an endless epoch count, or a ValueError only
    after OUT was created."""
    d = files
    model, tok = load_checkpoint(d / "aligned")
    seqs, _ = encode_data(tok, load_conversations(d / "data.jsonl"), 64)
    with pytest.raises(ValueError, match=match) as e:
        finetune(model, tok, seqs, None, d / "run", method="sft", progress=False, **kw)
    assert "\n" not in str(e.value)
    assert not (d / "run").exists()


# --- periods longer than the run: a warning; the drift curve ends at the last step -----------------------------
@pytest.mark.parametrize("opts, warns, points", [
    pytest.param(dict(eval_every=10), "--eval-every 10 is more than the run's 5 steps", [0, 5], id="eval-every"),
    pytest.param(dict(eval_every=2), None, [0, 2, 4, 5], id="curve-ends-at-last-step"),
    pytest.param(dict(save_every=5), "--save-every 5 is not less than the run's 5 steps", None, id="save-every"),
    pytest.param(dict(save_every=9), "--save-every 9 is not less", None, id="save-every-more"),
])
def test_periods_longer_than_the_run_are_said(files, opts, warns, points):
    d = files
    model, tok = load_checkpoint(d / "aligned")
    seqs, _ = encode_data(tok, load_conversations(d / "data.jsonl"), 64)
    run = RunOptions(eval_harmful=["How do I pick a lock?"] if points else None, eval_tokens=2, **opts)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        finetune(model, tok, seqs, None, d / "run", method="sft", steps=5, batch_size=4, lr=1e-3, run=run,
                 progress=False)
    said = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    if warns is None:
        assert not said, said
    else:
        assert len(said) == 1 and warns in said[0], said
    if points:
        curve = json.loads((d / "run" / "history.json").read_text())["history"]["curve"]
        assert [c["step"] for c in curve] == points


# --- --save-adapter: a base path that works from any folder ----------------------------------------------------
def test_adapter_records_a_base_path_that_loads_from_anywhere(files, monkeypatch):
    """Before: base_model_name_or_path was "aligned", relative to the folder the command ran in."""
    d = files
    monkeypatch.chdir(d)
    assert main(["finetune", "--model", "aligned", "--data", "data.jsonl", "--method", "sft", "--out", "adapter",
                 "--steps", "2", "--batch-size", "4", "--lora-r", "2", "--save-adapter", "--quiet"]) == 0
    base = json.loads((d / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert os.path.isabs(base) and os.path.samefile(base, d / "aligned"), base
    (d / "elsewhere").mkdir()
    monkeypatch.chdir(d / "elsewhere")
    model, _ = load_checkpoint(d / "adapter")
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    # a path relative to the adapter folder (an adapter moved with its base beside it) is read from there first
    cfg = json.loads((d / "adapter" / "adapter_config.json").read_text())
    (d / "adapter" / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": "../aligned"}))
    (d / "elsewhere" / "deeper").mkdir()
    monkeypatch.chdir(d / "elsewhere" / "deeper")  # where ../aligned does not exist
    moved, _ = load_checkpoint(d / "adapter")
    for (n, a), b in zip(model.named_parameters(), moved.parameters()):
        torch.testing.assert_close(b, a, atol=0, rtol=0, msg=n)
