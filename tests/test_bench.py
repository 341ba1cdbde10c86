"""The benchmarks run end to end and report every figure (their timings are never asserted), and what the step
bench times is the package's training step."""
import os

import pytest
import torch

from minicwac.tools import bench
from minicwac.core.cwac import Constraints, Schedule, finetune_cwac
from minicwac.io.config import Config
from minicwac.toy.pipeline import clone


def test_bench_model_smoke():
    res = bench.bench_model("tiny", batch=1, seq=16, repeats=1, warmup=0, calib_prompts=8, safety_len=8)
    assert set(res["rows"]) >= {"minicwac SFT", "minicwac CWAC"}
    for r in res["rows"].values():
        assert r["ms"] > 0 and r["tokens_s"] > 0 and r["mfu"] is None  # no peak FLOP/s known for a CPU
    assert res["cwac_over_sft"] > 0 and res["subspace_s"] > 0
    text = bench.format_model(res)
    assert "CWAC / SFT" in text and "subspace extraction" in text


def test_bench_model_bad_options():
    with pytest.raises(ValueError, match="shape='llama-70b'"):
        bench.bench_model("llama-70b")
    with pytest.raises(ValueError, match="dtype='fp8'"):
        bench.bench_model("tiny", dtype="fp8")


def test_step_flops_by_hand():
    """6 N per token for the matrices + 12 L d T for attention, N counting q, k, v, o, the MLP and the head."""
    cfg = Config(vocab_size=10, hidden_size=4, intermediate_size=8, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1)  # head_dim 2: q 4x4, k 4x2, v 4x2, o 4x4 = 48; MLP 3 x 4x8 = 96; head 40
    n = 2 * (48 + 96) + 40
    assert bench.step_flops(cfg, tokens=6, seq=3) == 6 * (6 * n + 12 * 2 * 4 * 3)


@pytest.mark.parametrize("which", ["cwac", "sft"])
def test_bench_step_is_the_package_step(which):
    """The step the bench times is finetune_cwac's first step on the same data: the same loss, bit for bit the same
    weights after it (for CWAC, W S = W0 S; for SFT, not)."""
    st = bench.step_setup(m=20, layer=3)
    ref = clone(st["model"])
    W0 = {n: p.detach().clone() for n, p in st["model"].named_parameters()}
    c = Constraints(st["subspace"], st["features"], bench.LAM, 16) if which == "cwac" else None
    hist = finetune_cwac(ref, st["seqs"], Schedule(1, st["recipe"].finetune_batch, st["recipe"].finetune_lr, seed=0), c,
                         pad_id=st["tok"].pad_token_id, progress=False)
    st["model"].train()
    out = st[which]()
    assert out["loss"] == hist["loss"][0] and out["safety"] == hist["safety"][0]
    got, want = dict(st["model"].named_parameters()), dict(ref.named_parameters())
    for n in want:
        assert torch.equal(got[n], want[n]), n
    assert any(not torch.equal(got[n], W0[n]) for n in want)  # the step did change the weights
    # the weight side acted in the CWAC step only (L_safety is 0 at the first step: z0 is the model's own reading)
    assert (st["subspace"].ws_error(st["model"]) < 1e-6) == (which == "cwac")


def test_bench_step_smoke():
    res = bench.bench_step(repeats=1, warmup=0)
    assert res["sft_ms"] > 0 and res["cwac_ms"] > 0 and res["ratio"] > 0
    assert "ratio CWAC / SFT" in bench.format_step(res)


def test_bench_step_at_a_later_layer_with_more_latents():
    res = bench.bench_step(repeats=1, warmup=0, m=500, layer=3)
    assert (res["m"], res["layer"]) == (500, 3) and res["cwac_ms"] > 0
    assert "500 latents after block 3 of 4" in bench.format_step(res)
    with pytest.raises(ValueError, match="m=0 latents"):
        bench.bench_step(m=0)


@pytest.mark.slow
def test_bench_step_fsdp_reports_the_sharded_step():
    """bench --what step --fsdp: 2 CPU processes (gloo) time the sharded SFT and CWAC steps; the constraint held."""
    from minicwac.tools.bench import bench_step_fsdp, format_step_fsdp
    res = bench_step_fsdp(2, repeats=2, warmup=1, m=8)
    assert res["ranks"] == 2 and res["sft_ms"] > 0 and res["cwac_ms"] > 0
    assert res["ratio"] == pytest.approx(res["cwac_ms"] / res["sft_ms"])
    assert res["ws_error"] <= 1e-6
    assert "ratio CWAC / SFT" in format_step_fsdp(res)
    with pytest.raises(ValueError, match="at least 2"):
        bench_step_fsdp(1)


@pytest.mark.slow
def test_bench_sharded_under_torchrun(tmp_path):
    """bench --what sharded, as a GPU session runs it, on 2 CPU processes: SFT and CWAC steps timed, the plan's
    figure beside them, the leak on every shard."""
    import json
    import subprocess
    import sys

    from minicwac.io.dist import free_port
    port = free_port()
    out = tmp_path / "sharded.json"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                        "127.0.0.1", "--master_port", str(port), "-m", "minicwac", "bench", "--what", "sharded",
                        "--shape", "tiny", "--repeats", "3", "--seq", "32", "--json", str(out)],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["ranks"] == 2 and res["sft_ms"] > 0 and res["cwac_ms"] > 0 and res["ws_error"] <= 1e-6
    assert res["cwac_peak_gb"] is None and res["cwac_plan_gb"] > res["sft_plan_gb"] > 0  # no GPU: no peak
    assert r.stdout.count("ratio CWAC / SFT") == 1  # rank 0 reports
