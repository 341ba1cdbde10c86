"""The benchmarks run end to end and report every figure (their timings are never asserted)."""
import pytest

from minicwac import bench
from minicwac.model import Config


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
