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
from minicwac.kit import finetuning
from minicwac.core.cwac import DivergedError
from minicwac.io.model import GPT
from minicwac.core.cwac import cwac_step, rank_part
from minicwac.core.data import collate

ARGS = ["--steps", "5", "--batch-size", "4", "--lr", "1e-3", "--quiet"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tok):
    """A tiny aligned model (a Hugging Face folder), a kit for it (down_proj at 90% energy: a real constraint) and
    JSONL data. Odd sizes, so the row shards of 2 ranks differ in length."""
    return _aligned_with_kit(tmp_path_factory.mktemp("dist"), tok)


@pytest.fixture(scope="module")
def tied_folder(tmp_path_factory, tok):
    """The same with a head tied to the embeddings (SmolLM2, Gemma 2: one tensor under two names)."""
    return _aligned_with_kit(tmp_path_factory.mktemp("dist-tied"), tok, tie_word_embeddings=True)


def _aligned_with_kit(d, tok, **config):
    torch.manual_seed(0)
    model = GPT(tiny_config(vocab_size=tok.vocab_size, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                            eos_token_id=tok.eos_token_id, max_position_embeddings=128, intermediate_size=70, **config))
    save_pretrained(model, tok, d / "aligned")
    (d / "data.jsonl").write_text("\n".join(json.dumps(r) for r in conversations(24)) + "\n")
    kit = calibrate(model, tok, HARMFUL, HARMLESS, settings=KitSettings(sae_layer=1, d_sae=64, sae_k=4, sae_steps=30,
                                                                          m=8, energy=0.9), progress=False)
    kit.save(d / "kit")
    return d


def _finetune(proc, d, out, resume=False, die_after=None, dtype="fp32"):
    """One rank of a sharded CWAC fine-tune through `kit.finetune` (die_after: stop right after that checkpoint);
    proc None: the same run in this one process."""
    model, tok = load_checkpoint(d / "aligned", dtype=torch.float32)
    kit = Kit.load(d / "kit", model)
    seqs, _ = encode_data(tok, load_conversations(d / "data.jsonl"), 64)
    saves = (dist, "save_sharded") if proc is not None else (finetuning, "_save_state")
    save = getattr(*saves)

    def save_then_die(*args):
        save(*args)
        if die_after in (args[-1]["step"] if proc is not None else args[3],):  # meta["step"], or step
            raise KeyboardInterrupt  # as if the job were killed right after the checkpoint

    setattr(*saves, save_then_die)
    try:
        finetune(model, tok, seqs, kit, d / out, method="cwac", steps=5, batch_size=4, lr=1e-3, dtype=dtype,
                 run=RunOptions(save_every=2, resume=resume, proc=proc), progress=False)
    except KeyboardInterrupt:
        pass
    finally:
        setattr(*saves, save)


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
    # FSDP2 computes z with bf16 weights: against a z0 read the same way L_safety starts at exactly 0 (against the
    # kit's float32 z0 it started at a floor of rounding noise, about 1e-5 of ||z0||^2 on this model)
    assert h["history"]["safety"][0] == 0.0 and h2["history"]["safety"][0] == 0.0
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


@pytest.mark.parametrize("first, then, tied", [
    pytest.param(1, 2, False, id="1-process-then-2-ranks"),
    pytest.param(2, 1, True, id="2-ranks-then-1-process-tied-head"),
])
def test_a_checkpoint_resumes_on_another_number_of_ranks(request, first, then, tied):
    """A run interrupted after its step-2 checkpoint on `first` processes, resumed on `then`: it ends where an
    uninterrupted one-process run ends (to float32 rounding: the ranks add their parts in another order). Before: the
    1-process checkpoint failed inside torch.distributed.checkpoint on every rank, and the sharded one in 1 process
    said "No such file ... params.safetensors"; a tied head could not be checkpointed sharded at all (safetensors
    refused the embeddings' tensor under two names)."""
    d = request.getfixturevalue("tied_folder" if tied else "folder")
    if not (d / "ref").exists():
        _finetune(None, d, "ref")
    out = f"{first}-then-{then}"
    dist.run_local(_finetune, first, d, out, False, 2) if first > 1 else _finetune(None, d, out, False, 2)
    meta = json.loads((d / out / "checkpoint" / "state.json").read_text())
    assert meta["step"] == 2 and meta["world_size"] == first
    assert meta["format"] == ("single" if first == 1 else "sharded")
    dist.run_local(_finetune, then, d, out, True) if then > 1 else _finetune(None, d, out, True)
    ref, resumed = _weights(d / "ref"), _weights(d / out)
    assert any(not torch.equal(ref[n], a) for n, a in _weights(d / "aligned").items())
    for n in ref:
        torch.testing.assert_close(resumed[n], ref[n], atol=1e-5, rtol=0, msg=f"{n}: the resumed run differs")
    h, h_ref = (json.loads((d / f / "history.json").read_text()) for f in (out, "ref"))
    assert h["ranks"] == then and h["history"]["step"] == h_ref["history"]["step"]
    assert h["history"]["task"] == pytest.approx(h_ref["history"]["task"], abs=1e-5)
    assert h["ws_error"] <= 1e-6 and not (d / out / "checkpoint").exists()


def _diverge(proc, d, out):
    """Every rank: a CWAC run at lr 1e6; the error each rank ends with goes to a file."""
    model, tok = load_checkpoint(d / "aligned", dtype=torch.float32)
    seqs, _ = encode_data(tok, load_conversations(d / "data.jsonl"), 64)
    try:
        finetune(model, tok, seqs, Kit.load(d / "kit", model), d / out, steps=5, batch_size=4, lr=1e6,
                 run=RunOptions(save_every=1, proc=proc), progress=False)
    except DivergedError as e:
        (d / f"{out}-{proc.rank}.txt").write_text(str(e))


def test_a_diverged_sharded_run_stops_on_every_rank(folder):
    """The loss is all-reduced and the gradient norm is global: every rank stops at the same step with the same
    line, no model is written, and the last checkpoint (all finite) stays."""
    d = folder
    dist.run_local(_diverge, 2, d, "diverged")
    msgs = [(d / f"diverged-{r}.txt").read_text() for r in range(2)]
    assert msgs[0] == msgs[1] and "training diverged at step 2 of 5" in msgs[0], msgs
    assert sorted(p.name for p in (d / "diverged").iterdir()) == ["checkpoint"]
    assert json.loads((d / "diverged" / "checkpoint" / "state.json").read_text())["step"] == 1


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


# --- the gradients themselves ----------------------------------------------------------------------------------
# AdamW is nearly blind to a gradient's scale, so two runs can match to 1e-5 while their ranks average instead of
# summing, or reduce in bf16: the step then differs only where clipping binds or epsilon matters. These tests
# compare the gradients right after backward, on a model away from the aligned weights (there L_safety has a
# gradient), on 2 and on 3 ranks: with 3, every row count of the tiny model (hidden 32, MLP 70, a 512-token
# vocabulary) splits unevenly, the constrained down_proj's 32 rows as 11 + 11 + 10.
LAM = 5.0
PICK = [0, 3, 3, 5, 1, 2]  # the global safety pick (a repeated prompt counts twice, as a random draw may)


class Recorder(torch.optim.Optimizer):
    """An optimizer whose step only records the whole gradient of every parameter (gathered from the shards)."""

    def __init__(self, model):
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        super().__init__([p for _, p in self.named], {})
        self.grads = {}

    @torch.no_grad()
    def step(self, closure=None):
        for n, p in self.named:  # every rank calls full_tensor in the same order (it is a collective)
            g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            self.grads[n] = g.detach().float().clone()


def _drifted(d, dtype=torch.float32):
    """The aligned model moved by seeded noise (after `Kit.load`, which checks it is the kit's model), its kit,
    the global batch of 6 sequences and the safety pick."""
    model, tok = load_checkpoint(d / "aligned", dtype=torch.float32)
    kit = Kit.load(d / "kit", model)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * p.abs().mean() * torch.randn(p.shape, generator=g))
    seqs, _ = encode_data(tok, load_conversations(d / "data.jsonl"), 64)
    return model.to(dtype), kit, seqs[:6], torch.tensor(PICK), tok.pad_token_id


def _step_gradients(model, batch, pick, counts, sub, feats, pad, autocast_dtype=None, device="cpu"):
    """The gradients `cwac_step` takes its step with (no clipping): raw (`sub` None) or projected on S; and the
    loss terms this rank computed."""
    rec = Recorder(model)
    model.train()
    out = cwac_step(model, rec, collate(batch, pad, device), subspace=sub, features=feats, lam=LAM,
                    safety_batch=pick, grad_clip=float("inf"), project_update=False, project_grad=sub is not None,
                    autocast_dtype=autocast_dtype, **counts)
    return rec.grads, out


def _sharded_gradients(proc, d, out):
    """Every rank: one CWAC step's gradients on its part of the global batch, fp32 and bf16-mixed, raw and
    projected; rank 0 writes them whole, with the global loss terms."""
    for dtype in ("fp32", "bf16-mixed"):
        model, kit, seqs, pick, pad = _drifted(d)
        dist.shard_model(model, proc, dtype)
        sub, feats = kit.constraint("cwac")
        sub = sub.shard(model)
        part, part_pick, counts = rank_part(seqs, pick, feats, proc.rank, proc.world_size)
        raw, terms = _step_gradients(model, part, part_pick, counts, None, feats, pad)
        projected, _ = _step_gradients(model, part, part_pick, counts, sub, feats, pad)
        total = torch.tensor([terms["task"], terms["safety"]], dtype=torch.float64)
        torch.distributed.all_reduce(total)
        if proc.main:
            save_file({**{f"raw.{n}": g for n, g in raw.items()}, **{f"projected.{n}": g for n, g in projected.items()},
                       "terms": total}, d / f"{out}-{dtype}.safetensors")


def _rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.mark.parametrize("ranks", [2, 3])
def test_the_ranks_gradients_are_one_process_gradients(folder, ranks):
    """fp32: k ranks give the gradients of one process on the whole batch, raw and projected, and the same loss
    terms. bf16-mixed: FSDP2 computes with bf16 copies of the weights and reduces in float32, so k ranks give the
    float32 sum of the bf16 gradients one process gets on the same k parts of the batch; and, to bf16 precision,
    one process's bf16-autocast gradients on the whole batch."""
    d = folder
    dist.run_local(_sharded_gradients, ranks, d, f"grads-{ranks}")
    model, kit, seqs, pick, pad = _drifted(d)
    sub, feats = kit.constraint("cwac")
    assert feats is not None and sub is not None
    raw, terms = _step_gradients(model, seqs, pick, {}, None, feats, pad)
    projected, _ = _step_gradients(model, seqs, pick, {}, sub, feats, pad)
    sharded = load_file(d / f"grads-{ranks}-fp32.safetensors")
    assert sharded["terms"].tolist() == pytest.approx([terms["task"], terms["safety"]], rel=1e-5)
    assert terms["safety"] > 1e-3 * terms["task"]  # away from the aligned weights: L_safety is not zero
    assert float(raw["model.embed_tokens.weight"].norm()) > 0
    for n in raw:
        assert _rel(sharded[f"raw.{n}"], raw[n]) < 1e-5, f"{n}: the {ranks} ranks' gradient differs from 1 process"
        assert _rel(sharded[f"projected.{n}"], projected[n]) < 1e-5, n
    for n in sub.S:  # the projection acted on the uneven shards: the gradient has no component on S left
        assert float((sharded[f"projected.{n}.weight"] @ sub.S[n]).norm()) < 1e-5 * float(raw[f"{n}.weight"].norm())
        assert _rel(sharded[f"projected.{n}.weight"], sharded[f"raw.{n}.weight"]) > 1e-3  # it did remove something

    # bf16-mixed: the same parts on one process, each with bf16 weights (what FSDP2 computes with), summed in float32
    low = {}
    for r in range(ranks):
        part, part_pick, counts = rank_part(seqs, pick, feats, r, ranks)
        bf16 = _drifted(d, torch.bfloat16)[0]
        grads, _ = _step_gradients(bf16, part, part_pick, counts, None, feats, pad)
        low = {n: low.get(n, 0) + g for n, g in grads.items()}
    autocast, _ = _step_gradients(model, seqs, pick, {}, None, feats, pad, torch.bfloat16)
    sharded = load_file(d / f"grads-{ranks}-bf16-mixed.safetensors")
    for n in raw:
        assert _rel(sharded[f"raw.{n}"], low[n]) < 1e-6, f"{n}: not the float32 sum of the parts' bf16 gradients"
        assert _rel(sharded[f"raw.{n}"], autocast[n]) < 0.1, f"{n}: not one process's bf16-mixed gradient"
        assert _rel(sharded[f"raw.{n}"], raw[n]) < 0.1, n


@pytest.mark.slow
def test_torchrun_prints_an_error_once(tmp_path):
    """A bad argument under torchrun on 2 processes: a non-zero exit and one `minicwac: error:` line, not one per
    rank (the launcher's own failure report follows it; torch prints that)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(dist.free_port()), "-m", "minicwac", "finetune", "--model", str(tmp_path / "nope"),
           "--data", str(tmp_path / "data.jsonl"), "--out", str(tmp_path / "out"), "--quiet"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode != 0
    assert (r.stdout + r.stderr).count("minicwac: error:") == 1, r.stderr[-3000:]
