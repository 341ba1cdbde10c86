"""FSDP2 on CPU (2 processes, gloo): the same run as on one process, the constraint exact on every shard, a folder
transformers loads, and a sharded checkpoint that resumes to the same end. The processes start themselves
(`dist.run_local`, or torchrun for the command line)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import tiny_config
from safetensors.torch import load_file, save_file
from test_kit import HARMFUL, HARMLESS, conversations

from minicwac.io import dist
from minicwac.__main__ import main
from minicwac.core.subspace import Subspace
from minicwac.io.hf import load_checkpoint, load_pretrained, save_pretrained
from minicwac.kit import Kit, KitSettings, RunOptions, calibrate, encode_data, finetune, load_conversations
from minicwac.io.model import GPT

ARGS = ["--steps", "5", "--batch-size", "4", "--lr", "1e-3", "--quiet"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tok):
    """A tiny aligned model (a Hugging Face folder), a kit for it (down_proj at 90% energy: a real constraint) and
    JSONL data. Odd sizes, so the row shards of 2 ranks differ in length."""
    d = tmp_path_factory.mktemp("dist")
    torch.manual_seed(0)
    model = GPT(tiny_config(vocab_size=tok.vocab_size, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                            eos_token_id=tok.eos_token_id, max_position_embeddings=128, intermediate_size=70))
    save_pretrained(model, tok, d / "aligned")
    (d / "data.jsonl").write_text("\n".join(json.dumps(r) for r in conversations(24)) + "\n")
    kit = calibrate(model, tok, HARMFUL, HARMLESS, settings=KitSettings(sae_layer=1, d_sae=64, sae_k=4, sae_steps=30,
                                                                          m=8, energy=0.9), progress=False)
    kit.save(d / "kit")
    return d


def _finetune(proc, d, out, resume=False, die_after=None, dtype="fp32"):
    """One rank of a sharded CWAC fine-tune through `kit.finetune` (die_after: stop right after that checkpoint)."""
    model, tok = load_checkpoint(d / "aligned", dtype=torch.float32)
    kit = Kit.load(d / "kit", model)
    seqs, _ = encode_data(tok, load_conversations(d / "data.jsonl"), 64)
    if die_after is not None:
        save = dist.save_sharded

        def save_then_die(path, m, opt, r, meta):
            save(path, m, opt, r, meta)
            if meta["step"] == die_after:
                raise KeyboardInterrupt  # as if the job were killed right after the checkpoint

        dist.save_sharded = save_then_die
    try:
        finetune(model, tok, seqs, kit, d / out, method="cwac", steps=5, batch_size=4, lr=1e-3, dtype=dtype,
                 run=RunOptions(save_every=2, resume=resume, proc=proc), progress=False)
    except KeyboardInterrupt:
        pass


def _leaks(proc, d, out):
    """Every rank: the leak ||W S - W0S|| / ||W0S|| of each of its shards of each constrained matrix."""
    model, _ = load_checkpoint(d / out, dtype=torch.float32)
    dist.shard_model(model, proc)
    sub = Subspace.load(d / "kit" / "subspace").shard(model)
    modules = dict(model.named_modules())
    rows = {n: modules[n].weight.to_local().shape[0] for n in sub.S}
    per = {n: sub.subset([n]).ws_error(model) for n in sub.S}
    (d / f"leaks-{proc.rank}.json").write_text(json.dumps({"leak": per, "rows": rows}))


def _weights(path):
    model, _ = load_checkpoint(path)
    return dict(model.named_parameters())


def test_two_ranks_match_one_and_keep_the_constraint_on_every_shard(folder):
    d = folder
    assert main(["finetune", "--model", str(d / "aligned"), "--data", str(d / "data.jsonl"), "--kit", str(d / "kit"),
                 "--out", str(d / "one"), *ARGS]) == 0
    dist.run_local(_finetune, 2, d, "two")
    one, two = _weights(d / "one"), _weights(d / "two")
    aligned = _weights(d / "aligned")
    assert any(not torch.equal(one[n], aligned[n]) for n in one), "the run changed nothing"
    for n in one:
        torch.testing.assert_close(two[n], one[n], atol=1e-5, rtol=0, msg=f"{n}: 2 ranks differ from 1")
    h1 = json.loads((d / "one" / "history.json").read_text())
    h2 = json.loads((d / "two" / "history.json").read_text())
    assert h2["ranks"] == 2 and h1["ranks"] == 1
    assert h2["history"]["task"] == pytest.approx(h1["history"]["task"], abs=1e-5)
    assert h2["history"]["safety"] == pytest.approx(h1["history"]["safety"], rel=1e-4)
    assert h2["ws_error"] <= 1e-6
    assert not (d / "two" / "checkpoint").exists()  # the run finished: its checkpoint is gone

    dist.run_local(_leaks, 2, d, "two")  # the written folder, sharded again: every shard of every target
    reports = [json.loads((d / f"leaks-{r}.json").read_text()) for r in range(2)]
    sub = Subspace.load(d / "kit" / "subspace")
    for n in sub.S:
        assert sum(r["rows"][n] for r in reports) == sub.W0S[n].shape[0]  # the two shards cover every row
        assert reports[0]["rows"][n] != reports[1]["rows"][n] or sub.W0S[n].shape[0] % 2 == 0
        assert max(r["leak"][n] for r in reports) <= 1e-6, n

    dist.run_local(_finetune, 2, d, "two-bf16", False, None, "bf16-mixed")  # bf16 compute, float32 master shards
    h = json.loads((d / "two-bf16" / "history.json").read_text())
    assert h["ws_error"] <= 1e-6 and h["history"]["task"] != h2["history"]["task"]
    assert sub.ws_error(load_checkpoint(d / "two-bf16")[0]) <= 1e-6

    transformers = pytest.importorskip("transformers", reason="the load check uses transformers (test-only)")
    hf = transformers.AutoModelForCausalLM.from_pretrained(d / "two", attn_implementation="eager").eval()
    ours, tok = load_checkpoint(d / "two")
    ids = torch.tensor([tok.encode_chat([{"role": "user", "content": HARMFUL[0]}], add_generation_prompt=True)[0]])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids), atol=1e-4, rtol=0)


def test_a_resumed_sharded_run_ends_where_an_uninterrupted_one_ends(folder):
    d = folder
    dist.run_local(_finetune, 2, d, "whole")
    dist.run_local(_finetune, 2, d, "part", False, 2)
    ckpt = d / "part" / "checkpoint"
    meta = json.loads((ckpt / "state.json").read_text())
    assert meta["step"] == 2
    shards = sorted(p.name for p in ckpt.glob("*.safetensors"))
    assert len(shards) == 2, shards  # one file per rank
    for f in shards:  # each holds its rank's rows (the offsets in the header), no pickle anywhere
        assert any(k.startswith("optim.") for k in load_file(ckpt / f))
    assert not any(p.suffix in (".pt", ".pkl", ".metadata", ".distcp") for p in ckpt.iterdir())
    assert not (d / "model.safetensors").exists() and not (d / "part" / "model.safetensors").exists()
    dist.run_local(_finetune, 2, d, "part", True)
    whole, part = _weights(d / "whole"), _weights(d / "part")
    for n in whole:
        torch.testing.assert_close(part[n], whole[n], atol=0, rtol=0, msg=f"{n}: the resumed run differs")
    assert json.loads((d / "part" / "history.json").read_text())["history"]["task"] == \
        json.loads((d / "whole" / "history.json").read_text())["history"]["task"]


@pytest.mark.slow
def test_torchrun_command_line(folder, tmp_path):
    """The README's command: torchrun --nproc_per_node 2 -m minicwac finetune ... on the CPU."""
    d = folder
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(dist.free_port()), "-m", "minicwac", "finetune", "--model", str(d / "aligned"), "--data",
           str(d / "data.jsonl"), "--kit", str(d / "kit"), "--out", str(tmp_path / "tr"), *ARGS]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "trained on 2 ranks" in r.stdout and r.stdout.count("wrote ") == 1  # rank 0 reports, once
    assert (tmp_path / "tr" / "model.safetensors").is_file()
    if (d / "two").exists():
        a, b = _weights(d / "two"), _weights(tmp_path / "tr")
        for n in a:
            torch.testing.assert_close(b[n], a[n], atol=1e-6, rtol=0)


def test_sharded_errors(folder, tmp_path):
    model, tok = load_checkpoint(folder / "aligned")
    kit = Kit.load(folder / "kit", model)
    seqs, _ = encode_data(tok, load_conversations(folder / "data.jsonl"), 64)
    with pytest.raises(ValueError, match="sharded run"):
        finetune(model, tok, seqs, kit, tmp_path / "x", steps=1, run=RunOptions(offload=True))
    with pytest.raises(ValueError, match="--device tpu"):
        dist.init("tpu")
    save_file({"x": torch.zeros(1)}, str(tmp_path / "unused.safetensors"))  # nothing of the above wrote a file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unused.safetensors"]


def _load_rank(proc, src, out):
    """Every rank reads its rows of `src`; the gathered whole goes to `out` (rank 0)."""
    model = dist.load_pretrained(src, proc)
    assert dist.is_sharded(model) and all(p.dtype == torch.float32 for p in model.parameters())
    full = dist.full_state(model)
    if proc.main:
        save_file({k: v.contiguous() for k, v in full.items() if k != "lm_head.weight" or
                   not model.config.tie_word_embeddings}, str(out))


@pytest.mark.parametrize("family", [dict(model_type="llama", tie_word_embeddings=True),
                                    dict(model_type="gpt2", num_key_value_heads=4, hidden_act="gelu_new",
                                         tie_word_embeddings=True)])
def test_sharded_reading_gives_the_folder_in_float32(tmp_path, family):
    """A bf16 folder read row by row on 2 ranks (GPT-2: read whole, then sharded) is the folder's model in float32,
    tied head included."""
    torch.manual_seed(0)
    model = GPT(tiny_config(intermediate_size=70, **family), dtype=torch.bfloat16)
    save_pretrained(model, None, tmp_path / "m")
    dist.run_local(_load_rank, 2, tmp_path / "m", tmp_path / "full.safetensors")
    full = load_file(tmp_path / "full.safetensors")
    ref = load_pretrained(tmp_path / "m", dtype=torch.float32)
    for n, p in ref.state_dict().items():
        if n == "lm_head.weight" and ref.config.tie_word_embeddings:
            continue
        torch.testing.assert_close(full[n], p, atol=0, rtol=0, msg=n)
