"""The memory plan (`minicwac.tools.plan`): its figures against the bytes of real tensors after a real optimizer step, on
one process and on 2 FSDP2 ranks (gloo, CPU); its activation estimate against what autograd saves; hand
arithmetic; the presets; the errors; and the table in docs/performance.md."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_config

from minicwac.tools import plan as P
from minicwac.core.cwac import cwac_step
from minicwac.core.data import make_optimizer
from minicwac.core.lora import LoRASettings, add_lora
from minicwac.core.subspace import ALL_LINEARS, DEFAULT_TARGETS, Subspace, target_names
from minicwac.io.model import GPT

PERSISTENT = ("weights", "grads", "adam", "subspace")  # the rows counted from shapes, measured here
# odd row counts, so that 2 ranks hold ceil(d0 / 2) and floor(d0 / 2) rows: vocab 97, hidden 45 (norms, o_proj,
# down_proj, W0S of down_proj), intermediate 71 (gate, up); head_dim 8 is set apart from hidden / heads
ODD = {"vocab_size": 97, "hidden_size": 45, "intermediate_size": 71, "head_dim": 8}


def _nbytes(t: torch.Tensor) -> int:
    t = t.to_local() if hasattr(t, "to_local") else t  # a DTensor: this rank's part
    return t.numel() * t.element_size()


def random_subspace(model: GPT, patterns, rank_frac: float, seed: int = 0) -> Subspace:
    """S with orthonormal columns (QR of a random matrix), k = round(rank_frac * in), and W0S = W S."""
    g = torch.Generator().manual_seed(seed)
    modules = dict(model.named_modules())
    S, W0S = {}, {}
    for n in target_names(model, patterns):
        W = modules[n].weight.detach()
        k = max(1, round(rank_frac * W.shape[1]))
        S[n] = torch.linalg.qr(torch.randn(W.shape[1], k, generator=g))[0]
        W0S[n] = W @ S[n]
    return Subspace(S, W0S)


def one_step_bytes(model: GPT, sub: Subspace | None) -> dict:
    """One real AdamW step (cwac_step, with the projection when `sub` is given); the bytes this process holds."""
    opt = make_optimizer(model, lr=1e-3, weight_decay=0.1)
    grads = {}

    def count_grads(o, args, kwargs):  # just before opt.step: cwac_step sets the gradients to None after it
        grads["bytes"] = sum(_nbytes(p.grad) for gr in o.param_groups for p in gr["params"] if p.grad is not None)

    opt.register_step_pre_hook(count_grads)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(model.config.vocab_size, (2, 12), generator=g)
    cwac_step(model, opt, (ids, ids.clone()), subspace=sub)
    states = [t for st in opt.state.values() for t in st.values() if isinstance(t, torch.Tensor)]
    return {"weights": sum(_nbytes(p) for p in model.parameters()), "grads": grads["bytes"],
            "adam": sum(map(_nbytes, states)),
            "subspace": 0 if sub is None else sum(map(_nbytes, [*sub.S.values(), *sub.W0S.values()]))}


def measure(cfg_kw: dict, case: str, rank_frac: float, lora_r: int = 4) -> tuple[GPT, Subspace]:
    """(model, subspace) of one case: "cwac", "cwac-all" (full fine-tuning) or "lora" (minicwac's LoRA on every
    linear of every block, method cwac: the projection acts on A)."""
    torch.manual_seed(0)
    model = GPT(tiny_config(**cfg_kw))
    sub = random_subspace(model, ALL_LINEARS if case == "cwac-all" else DEFAULT_TARGETS, rank_frac)
    if case == "lora":
        add_lora(model, LoRASettings(r=lora_r))
    return model, sub


def _planned(cfg_kw: dict, case: str, gpus: int, rank_frac: float, lora_r: int = 4) -> dict:
    res = P.plan(tiny_config(**cfg_kw), gpus, method="cwac" if case == "lora" else case, rank_frac=rank_frac,
                 lora_r=lora_r if case == "lora" else None)
    return {k: res["rows"][k]["bytes"] for k in PERSISTENT}


def _assert_close(measured: dict, planned: dict, what: str):
    for k in PERSISTENT:
        assert planned[k] == pytest.approx(measured[k], rel=0.01), f"{what}: {k} planned {planned[k]}, " \
                                                                   f"measured {measured[k]}"


@pytest.mark.parametrize("case", ["cwac", "cwac-all", "lora"])
def test_plan_matches_the_bytes_of_one_real_step_on_one_process(case):
    rank_frac = 0.4
    model, sub = measure(ODD, case, rank_frac)
    got = one_step_bytes(model, sub)
    assert all(v > 0 for v in got.values())
    _assert_close(got, _planned(ODD, case, 1, rank_frac), case)


# --- 2 ranks (FSDP2 on CPU, gloo) -------------------------------------------------------------------------------
def _rank_worker(ranks, out: str, rank_frac: float) -> None:
    """One rank: shard each case's model (dist.shard_model) and its subspace, one step; rank 0 writes the bytes."""
    from minicwac.io import dist
    result = {}
    for case in ("cwac", "cwac-all", "lora"):
        model, sub = measure(ODD, case, rank_frac)
        dist.shard_model(model, ranks, "bf16-mixed")
        sub = sub.shard(model)
        result[case] = one_step_bytes(model, sub)
        if case == "cwac":  # the shards really are uneven
            result["rows"] = {"embed": model.model.embed_tokens.weight.to_local().shape[0],
                              "W0S": next(iter(sub.W0S.values())).to_local().shape[0]}
    if ranks.main:
        Path(out).write_text(json.dumps(result))


def test_plan_matches_rank_0s_bytes_on_two_fsdp2_ranks(tmp_path):
    from minicwac.io import dist
    rank_frac = 0.4
    out = tmp_path / "rank0.json"
    dist.run_local(_rank_worker, 2, str(out), rank_frac)
    got = json.loads(out.read_text())
    assert got["rows"] == {"embed": 49, "W0S": 23}  # ceil(97 / 2), ceil(45 / 2)
    for case in ("cwac", "cwac-all", "lora"):
        _assert_close(got[case], _planned(ODD, case, 2, rank_frac), f"{case} on 2 ranks")


# --- the activation estimate against what autograd saves ----------------------------------------------------------
def saved_bytes(model: GPT, ids: torch.Tensor) -> int:
    """Bytes of the tensors the forward saves for backward (each storage once, parameters left out)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids)
    return sum(seen.values())


@pytest.mark.parametrize("lora", [None, P.LINEARS, ("q_proj", "v_proj")], ids=["full", "lora-all", "lora-qv"])
def test_activation_estimate_matches_what_a_bf16_model_saves(lora):
    # one k/v head per query head: on the CPU, SDPA then takes its flash path (no T x T matrix), as on a GPU
    cfg = tiny_config(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=4)
    torch.manual_seed(0)
    model = GPT(cfg).to(torch.bfloat16).train()  # as FSDP2's bf16-mixed computes: bf16 parameters
    r = 8
    if lora is not None:
        add_lora(model, LoRASettings(r=r, target_modules=lora))
    ids = torch.randint(cfg.vocab_size, (2, 24))
    a = P.layer_activation_bytes(cfg, 2, r if lora else None, lora or P.LINEARS)
    once = P.once_activation_bytes(cfg, 2, full=lora is None)
    expected = ids.numel() * (cfg.num_hidden_layers * a + once)
    assert saved_bytes(model, ids) == pytest.approx(expected, rel=0.01)
    res = P.plan(cfg, 1, batch_size=2, seq_len=24, lora_r=r if lora else None, lora_targets=lora or P.LINEARS)
    assert res["rows"]["activations"]["bytes"] == expected


# --- hand arithmetic ------------------------------------------------------------------------------------------
def test_figures_equal_hand_arithmetic_for_the_tiny_config():
    cfg = tiny_config()  # vocab 97, hidden 32, intermediate 64, 2 layers, 4 heads (head_dim 8), 2 kv heads
    # embed 97 x 32 and head 97 x 32; per block q 32x32, k 16x32, v 16x32, o 32x32, gate/up 64x32, down 32x64,
    # two norms of 32; the final norm 32
    block = 1024 + 512 + 512 + 1024 + 2048 + 2048 + 2048 + 64
    numel = 2 * 3104 + 2 * block + 32
    res = P.plan(cfg, 1, method="cwac", rank_frac=0.5, batch_size=2, seq_len=10)
    b = {k: r["bytes"] for k, r in res["rows"].items()}
    assert res["params"] == numel == 24800
    assert b["weights"] == b["grads"] == 4 * numel
    assert b["adam"] == 8 * numel + 4 * 21  # 21 trainable tensors: embed, head, final norm, 9 per block
    assert b["subspace"] == 2 * 4 * (64 * 32 + 32 * 32)  # per down_proj: S 64 x 32, W0S 32 x 32 (k = 0.5 x 64)
    assert b["compute"] == 2 * (2 * block + 2 * 3104 + 32)  # bf16: two blocks + the root unit
    assert b["grad_buffers"] == 2 * (2 * 3104 + 32) + 6 * block
    a = 2 * (8 * 32 + 4 * 64 + 2 * 32 + 2 * 16) + 4 * 4 + 8  # per token and layer: 1240 bytes
    once = 8 + 2 * 2 * 8 + 4 * 32 + 4 + 2 * 2 * 32
    assert b["activations"] == 20 * (2 * a + once)
    assert b["logits"] == 3 * 4 * 20 * 97
    assert b["safety"] == 16 * 64 * (1 * a + 8 + 2 * 2 * 8)  # 16 prompts x 64 tokens through 1 of 2 blocks
    assert res["gpu_bytes"] == sum(b.values()) and res["cpu_bytes"] == 0

    two = P.plan(cfg, 2, method="cwac", rank_frac=0.5)["rows"]
    # ceil(97 / 2) = 49 rows of embed and head; per block every tensor's rows halve (all even); final norm 16
    assert two["weights"]["bytes"] == 4 * (2 * 49 * 32 + block + 16)
    assert two["subspace"]["bytes"] == 2 * 4 * (64 * 32 + 16 * 32)  # S whole, W0S: 16 of 32 rows

    ck = P.plan(cfg, 1, checkpointing=True, batch_size=2, seq_len=10)["rows"]["activations"]["bytes"]
    assert ck == 20 * (2 * 2 * 32 + a + once)  # each block's bf16 input + one block's activations

    off = P.plan(cfg, 2, offload=True)
    moved = ("weights", "grads", "adam", "subspace")
    assert all(off["rows"][k]["device"] == "cpu" for k in moved)
    assert off["cpu_bytes"] == sum(off["rows"][k]["bytes"] for k in moved)
    assert off["gpu_bytes"] == sum(r["bytes"] for k, r in off["rows"].items() if k not in moved)

    lora = P.plan(cfg, 1, lora_r=4, method="cwac", rank_frac=0.5)["rows"]
    lora_numel = 2 * (4 * 32 + 32 * 4 + 4 * 32 + 16 * 4 + 4 * 32 + 16 * 4 + 4 * 32 + 32 * 4 + 2 * (4 * 32 + 64 * 4)
                      + 4 * 64 + 32 * 4)
    assert lora["weights"]["bytes"] == 4 * (numel + lora_numel)
    assert lora["grads"]["bytes"] == 4 * lora_numel
    assert lora["adam"]["bytes"] == 8 * lora_numel + 4 * 28  # A and B on 7 linears x 2 blocks
    assert lora["subspace"]["bytes"] == b["subspace"]  # the kit's S and W0S, held as with full fine-tuning


def test_sft_has_no_subspace_and_no_safety_forward():
    b = P.plan(tiny_config(), 1, method="sft")["rows"]
    assert b["subspace"]["bytes"] == 0 and b["safety"]["bytes"] == 0


# --- presets ------------------------------------------------------------------------------------------------------
def test_llama_presets_have_their_known_sizes():
    r8 = P.plan("llama-8b", 1, method="cwac")
    assert r8["params"] == pytest.approx(8.03e9, rel=0.002)
    assert r8["rows"]["weights"]["bytes"] / 1e9 == pytest.approx(32.1, abs=0.1)  # fp32 master weights
    assert r8["rows"]["subspace"]["bytes"] / 1e9 == pytest.approx(  # S: 32 x 14336 x 7168, W0S: 32 x 4096 x 7168
        4 * 32 * 7168 * (14336 + 4096) / 1e9)
    r70 = P.plan("llama-70b", 8, method="cwac", lora_r=16)
    assert r70["params"] == pytest.approx(70.55e9, rel=0.002)
    assert r70["rows"]["weights"]["bytes"] == pytest.approx(4 * (70.55e9 + r70["lora_params"]) / 8, rel=0.002)
    assert P.plan("llama-1b", 1)["params"] == pytest.approx(1.236e9, rel=0.002)  # tied head counted once


def test_a_model_folder_is_read_as_its_config_json(tmp_path):
    cfg = tiny_config()
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
    assert P.plan(str(tmp_path), 2)["rows"] == P.plan(cfg, 2)["rows"]


# --- errors -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, words", [
    ({"shape": "llama-9b"}, ["'llama-9b'", "preset", "config.json"]),
    ({"gpus": 0}, ["gpus=0", ">= 1"]),
    ({"gpus": 1.5}, ["gpus=1.5", "integer"]),
    ({"rank_frac": 0}, ["rank_frac=0", "(0, 1]"]),
    ({"rank_frac": 1.5}, ["rank_frac=1.5", "(0, 1]"]),
    ({"lora_r": 0}, ["lora_r=0", ">= 1"]),
    ({"method": "dpo"}, ["'dpo'", "cwac-all"]),
    ({"dtype": "fp16"}, ["'fp16'", "bf16-mixed"]),
    ({"batch_size": 0}, ["batch_size=0"]),
    ({"lora_r": 8, "lora_targets": ["qkv"]}, ["'qkv'", "q_proj"]),
], ids=["shape", "gpus-0", "gpus-float", "rank-frac-0", "rank-frac-1.5", "lora-r-0", "method", "dtype", "batch-size",
        "lora-targets"])
def test_bad_values_give_one_line_errors_naming_them(kw, words):
    kw = {"shape": tiny_config(), "gpus": 1, **kw}
    with pytest.raises(ValueError) as e:
        P.plan(kw.pop("shape"), kw.pop("gpus"), **kw)
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


def test_a_folder_without_config_json_is_refused(tmp_path):
    with pytest.raises(ValueError, match="neither a preset"):
        P.plan(str(tmp_path), 1)


# --- command line -----------------------------------------------------------------------------------------------
def _args(*argv) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    P.add_arguments(p)
    return p.parse_args(list(argv))


def test_run_formats_the_plan_and_reads_a_kit(tmp_path):
    text = P.plan_text(_args("--shape", "tiny", "--gpus", "2", "--lora-r", "8", "--offload", "--gpu-mem", "24"))
    assert "CPU GB per rank" in text and "24 GB GPU: fits" in text and "LoRA r=8" in text
    assert "estimate" in text and "95%" in text
    kit = tmp_path / "kit"
    kit.mkdir()
    (kit / "kit.json").write_text(json.dumps({"report": {"ranks": {"a": [30, 100], "b": [50, 100]}}}))
    assert P.kit_rank_frac(kit) == pytest.approx(0.4)
    via_kit = P.plan_text(_args("--shape", "llama-8b", "--gpus", "8", "--kit", str(kit)))
    assert via_kit == P.format_plan(P.plan("llama-8b", 8, rank_frac=0.4))
    with pytest.raises(ValueError, match="kit.json not found"):
        P.plan_text(_args("--shape", "tiny", "--gpus", "1", "--kit", str(tmp_path / "none")))
    with pytest.raises(SystemExit):  # argparse: --rank-frac and --kit exclude each other
        _args("--shape", "tiny", "--gpus", "1", "--kit", str(kit), "--rank-frac", "0.3")
    with pytest.raises(ValueError, match="gpus=0"):
        P.plan_text(_args("--shape", "tiny", "--gpus", "0"))


def test_format_plan_says_fits_or_not_with_the_headroom():
    res = P.plan("llama-8b", 1)
    text = P.format_plan(res, gpu_mems=(80, 1000))
    assert "80 GB GPU: does not fit" in text and "1000 GB GPU: fits" in text
    ok, room = P.fits(res, 1000)
    assert ok and room == pytest.approx(0.95 * 1000e9 - res["gpu_bytes"])
    assert f"{res['gpu_bytes'] / 1e9:.1f}" in text
    with pytest.raises(ValueError, match="gpu memory"):
        P.format_plan(res, gpu_mems=(0,))


def test_the_docs_tables_are_the_codes_output_and_checkpointing_changes_no_verdict_in_the_first():
    doc = (Path(__file__).parent.parent / "docs" / "performance.md").read_text()
    for table in P.doc_tables():
        assert table in doc, "regenerate the tables in docs/performance.md with minicwac.tools.plan.doc_tables()"
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    # the README shows some of the first table's rows, each as the code writes it
    full = P.doc_tables()[0].splitlines()
    shown = readme[readme.index(full[0]):].split("\n\n")[0].splitlines()
    assert shown[:2] == full[:2] and len(shown) > 4 and set(shown[2:]) <= set(full[2:]), \
        "regenerate the README's plan table from rows of minicwac.tools.plan.doc_tables()[0]"
    a8 = P.plan("llama-8b", 1)["activation_per_token_layer"]
    assert f"{a8} bytes per token and block" in doc
    for kw in P.DOC_CONFIGS:  # the docs show the first table without checkpointing and say why
        kw = dict(kw)
        shape, gpus = kw.pop("shape"), kw.pop("gpus")
        off, on = P.plan(shape, gpus, **kw), P.plan(shape, gpus, checkpointing=True, **kw)
        assert on["gpu_bytes"] < off["gpu_bytes"]
        assert all(P.fits(off, m)[0] == P.fits(on, m)[0] for m in P.DEFAULT_GPU_MEMS), (shape, gpus, kw)
