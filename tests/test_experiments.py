"""End-to-end smoke test of the demo (tiny recipe, ~15 s) and the helpers that write its results."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from dataclasses import asdict

import pytest
import torch

from minicwac.__main__ import main
from minicwac.tools.report import ROW_KEYS, results_table
from minicwac.toy.demo import run_demo
from minicwac.toy.world import check_p, check_task
from minicwac.io.hf import load_checkpoint
from minicwac.toy.pipeline import Recipe, toy_models

TINY = Recipe(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_len=96, pretrain_steps=20, pretrain_batch=8, align_steps=10,
              align_batch=8, finetune_steps=5, finetune_n=40, finetune_batch=8)
MODELS = ["base", "aligned", "sft-sentiment-p0-s0", "sft-sentiment-p0.1-s0"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """Run the whole demo once with the tiny recipe: (output folder, cache folder, returned rows)."""
    root = tmp_path_factory.mktemp("demo")
    rows = run_demo(root / "out", seed=0, task="sentiment", ps=(0.0, 0.1), recipe=TINY, cache_dir=root / "cache",
                    progress=False)
    return root / "out", root / "cache", rows


def test_results_json_schema(demo, world):
    """results.json holds one row per model with exactly the documented keys, percentages in [0, 100]."""
    out, _, rows = demo
    data = json.loads((out / "results.json").read_text())
    assert data["rows"] == rows
    assert data["recipe"] == asdict(TINY) and data["wall_s"] >= 0
    assert [(r["stage"], r["method"], r["p"]) for r in rows] == [
        ("base", "none", None), ("aligned", "none", None), ("finetuned", "sft", 0.0), ("finetuned", "sft", 0.1)]
    for r in rows:
        assert set(r) == set(ROW_KEYS)
        assert r["task"] == "sentiment" and r["seed"] == 0 and r["n_harmful"] == len(world.eval_harmful)
        for k in ("hs", "comply", "fa", "over_refusal"):
            assert isinstance(r[k], float) and 0.0 <= r[k] <= 100.0, (k, r[k])
        assert isinstance(r["refusal_score"], float) and math.isfinite(r["refusal_score"])
        assert r["comply"] <= r["hs"]  # compliance is a subset of non-refusal


def test_results_table_and_plot(demo):
    out, _, rows = demo
    md = (out / "results.md").read_text().strip().splitlines()
    assert md[0].startswith("| stage | method | task | p | seed | HS (refusal matcher) %")
    assert len(md) == 2 + len(rows)
    assert md[2].startswith("| base | none | sentiment | - | 0 |")
    assert (out / "pipeline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_models_saved_and_loadable(demo):
    """models/ has base, aligned and one sft folder per p; each loads; each stage changed the weights."""
    out, _, _ = demo
    assert sorted(p.name for p in (out / "models").iterdir()) == sorted(MODELS)
    weights = {}
    for name in MODELS:
        model, tok = load_checkpoint(out / "models" / name)
        assert model.config.hidden_size == 32 and model.config.num_hidden_layers == 2
        assert model.config.vocab_size == tok.vocab_size <= 512
        assert torch.isfinite(model(torch.tensor([[tok.bos_token_id, 5, 6]]))).all()
        weights[name] = model.state_dict()["model.layers.0.mlp.down_proj.weight"]
    assert not torch.equal(weights["base"], weights["aligned"])
    assert not torch.equal(weights["aligned"], weights["sft-sentiment-p0.1-s0"])
    assert not any(p.name.startswith(".") for p in (out / "models").iterdir())  # no temp folders left


def test_toy_models_cache_reused(demo):
    """A second toy_models call with the same recipe loads the cached base/aligned models instead of training."""
    out, cache, _ = demo
    folders = list(cache.iterdir())
    assert len(folders) == 1 and (folders[0] / "history.json").is_file()
    history = json.loads((folders[0] / "history.json").read_text())
    assert len(history["pretrain"]["loss"]) == TINY.pretrain_steps and len(history["align"]["loss"]) == TINY.align_steps
    t0 = time.time()
    toy = toy_models(0, TINY, cache, progress=False)
    assert time.time() - t0 < 30
    base, _ = load_checkpoint(out / "models" / "base")
    for k, v in base.state_dict().items():
        assert torch.equal(toy.base.state_dict()[k], v)
    assert toy.history == history


def test_cli_eval_on_demo_model(demo, capsys):
    """`eval --model` on a saved model prints the five metrics, then sample answers."""
    out, _, _ = demo
    assert main(["eval", "--model", str(out / "models" / "aligned")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()[:5]
    assert [ln.rsplit(None, 1)[0] for ln in lines] == ["HS (refusal matcher)", "comply", "fa", "over_refusal",
                                                      "refusal_score"]  # HS names its judge
    assert all(math.isfinite(float(ln.split()[-1])) for ln in lines)


def test_run_demo_checks_arguments_first(tmp_path):
    """Bad p or task fail before the output folder is created or anything is trained."""
    with pytest.raises(ValueError, match=r"outside \[0, 1\]"):
        run_demo(tmp_path / "a", ps=(0.0, 2.0), recipe=TINY, cache_dir=tmp_path / "c")
    with pytest.raises(ValueError, match="unknown task 'poetry'"):
        run_demo(tmp_path / "b", task="poetry", recipe=TINY, cache_dir=tmp_path / "c")
    assert list(tmp_path.iterdir()) == []


def test_check_helpers():
    assert check_p(0) == 0.0 and check_p(1) == 1.0
    for bad in (-0.01, 1.01, float("nan"), "0.1"):
        with pytest.raises(ValueError, match="outside"):
            check_p(bad)
    assert check_task("arithmetic") == "arithmetic"


def test_results_table_formatting():
    row = {"stage": "finetuned", "method": "sft", "task": "topic", "p": 0.1, "seed": 2, "hs": 12.345,
           "comply": 0.0, "fa": None, "over_refusal": 100.0, "refusal_score": -1.26, "n_harmful": 270}
    lines = results_table([row]).splitlines()
    assert len(lines) == 3 and lines[1].count("---") == 10
    assert lines[2] == "| finetuned | sft | topic | 0.1 | 2 | 12.3 | 0.0 | - | 100.0 | -1.3 |"


@pytest.mark.parametrize("tied", [False, True])
def test_clone_is_independent(tied):
    """pipeline.clone copies the weights into new tensors (tied heads stay tied)."""
    from minicwac.toy.pipeline import clone
    from conftest import tiny_config
    from minicwac.io.model import GPT

    torch.manual_seed(0)
    m = GPT(tiny_config(tie_word_embeddings=tied))
    c = clone(m)
    ids = torch.tensor([[1, 2, 3]])
    assert torch.equal(c(ids), m.eval()(ids)) and not c.training
    assert (c.lm_head.weight is c.model.embed_tokens.weight) == tied
    with torch.no_grad():
        c.model.norm.weight.add_(1.0)
    assert torch.equal(m.model.norm.weight, torch.ones(32))


# ---------------------------------------------------------------- the method experiment (tiny smoke run)

from minicwac.toy.experiments import MAIN_METHODS, SafetyRecipe, run_experiment, with_settings  # noqa: E402
from minicwac.core.sae import SAE  # noqa: E402
from minicwac.core.subspace import Subspace  # noqa: E402

TINY_SAFETY = with_settings(SafetyRecipe(eval_every=2), d_sae=64, sae_k=4, sae_steps=30, m=10)


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    root = tmp_path_factory.mktemp("experiment")
    data = run_experiment(root / "out", "quick", ps=[0.1], methods=list(MAIN_METHODS) + ["cwac-all"], recipe=TINY,
                          safety=TINY_SAFETY, cache_dir=root / "cache", progress=False)
    return root, data


def test_experiment_writes_every_artefact(experiment):
    root, data = experiment
    out = root / "out"
    runs = [x for x in data["rows"] if x["stage"] == "finetuned"]
    assert sorted(x["method"] for x in runs) == sorted(list(MAIN_METHODS) + ["cwac-all"])
    for x in data["rows"]:
        assert set(x) == set(ROW_KEYS)
    for m in MAIN_METHODS:
        model, _ = load_checkpoint(out / "models" / f"{m}-sentiment-p0.1-s0")
        curve = data["curves"][f"{m}-sentiment-p0.1-s0"]
        assert [c["step"] for c in curve] == [0, 2, 4, 5] and all(0 <= c["hs"] <= 100 for c in curve)
    sub = Subspace.load(out / "subspace" / "s0")
    assert sorted(sub.S) == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert SAE.load(out / "sae" / "s0").cfg.d_sae == 64
    md = (out / "results.md").read_text()
    for section in ("HS (refusal matcher) and FA by p", "Component ablation", "Checks", "Safety artefacts", "Drift"):
        assert section in md
    sft = data["curves"]["sft-sentiment-p0.1-s0"]  # one run per method: the drift row is that run's curve
    assert "| sft | " + " | ".join(f"{c['hs']:.1f}" for c in sft) + " |" in md
    for png in ("hs_vs_p.png", "fa_vs_hs.png", "drift.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"


def test_every_table_names_the_judge_of_its_hs(experiment):
    from conftest import hs_tables_unnamed
    """results.md says which judge made HS wherever HS appears: the refusal matcher by default, a user's judge by
    its name (the same rows, re-labelled)."""
    from minicwac.tools.report import experiment_report
    root, data = experiment
    md = (root / "out" / "results.md").read_text()
    assert md.count("HS (refusal matcher)") >= 5 and not hs_tables_unnamed(md, "HS (refusal matcher)")
    theirs = {**data, "rows": [{**x, "judge": "guard:verdicts"} for x in data["rows"]]}
    md = experiment_report(theirs)
    assert not hs_tables_unnamed(md, "HS (guard:verdicts)") and "refusal matcher)" not in md
    assert hs_tables_unnamed("## HS by task\n\n| method | a |\n|---|---|", "HS (x)")  # the check can fail


def test_rank_summary_by_kind():
    """The artefact table's ranks: each module's k/in for a small kit; per kind of module the range of k over the
    layers for a kit on every linear (hand-computed)."""
    from minicwac.tools.report import rank_summary
    assert rank_summary({"model.layers.0.mlp.down_proj": (3, 8), "model.layers.1.mlp.down_proj": (5, 8)}) == "3/8, 5/8"
    ranks = {f"model.layers.{i}.{kind}": (k + i, d) for i in range(3)
             for kind, k, d in (("self_attn.q_proj", 10, 16), ("mlp.down_proj", 20, 64), ("mlp.up_proj", 7, 16))}
    assert rank_summary(ranks) == "q_proj 10-12/16, down_proj 20-22/64, up_proj 7-9/16"
    assert rank_summary({f"l.{i}.o_proj": (4, 16) for i in range(9)}) == "o_proj 4/16"


def test_experiment_constraints_hold_in_the_saved_models(experiment):
    """The weight-constrained runs kept W S = W0 S for the saved subspace; SFT did not."""
    root, _ = experiment
    out = root / "out"
    sub = Subspace.load(out / "subspace" / "s0")
    for method, holds in (("weight", True), ("cwac", True), ("sft", False)):
        model, _ = load_checkpoint(out / "models" / f"{method}-sentiment-p0.1-s0")
        mods = dict(model.named_modules())
        err = max(float((mods[n].weight.detach() @ S - sub.W0S[n]).abs().max()) for n, S in sub.S.items())
        assert (err < 1e-5) == holds, (method, err)


def test_experiment_resumes_and_refuses_other_settings(experiment):
    root, data = experiment
    stamp = (root / "out" / "models" / "sft-sentiment-p0.1-s0" / "model.safetensors").stat().st_mtime_ns
    again = run_experiment(root / "out", "quick", ps=[0.1], methods=["sft"], recipe=TINY, safety=TINY_SAFETY,
                           cache_dir=root / "cache", progress=False)
    assert again["rows"] == data["rows"]  # nothing re-run, nothing rewritten
    assert (root / "out" / "models" / "sft-sentiment-p0.1-s0" / "model.safetensors").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="other settings"):
        run_experiment(root / "out", "quick", recipe=TINY, safety=with_settings(SafetyRecipe(), lam=1.0), cache_dir=root / "cache",
                       progress=False)
    with pytest.raises(ValueError, match="unknown method 'magic'"):
        run_experiment(root / "other", "quick", methods=["magic"], recipe=TINY, progress=False)
    with pytest.raises(ValueError, match="unknown preset"):
        run_experiment(root / "other", "huge", recipe=TINY, progress=False)


def test_experiment_with_a_users_judge(experiment, tmp_path):
    """A user's judge (here: every answer harmful) makes every HS, drift points included, and is named in every
    row and in the settings, so that its results are neither resumed nor merged with the matcher's."""
    from minicwac.core.evals import NamedJudge
    root, data = experiment
    judge = NamedJudge(lambda prompts, answers: [True] * len(answers), "all harmful")
    part = run_experiment(tmp_path / "j", "quick", ps=[0.1], methods=["sft"], recipe=TINY, safety=TINY_SAFETY,
                          cache_dir=root / "cache", save_models=False, progress=False, judge=judge)
    assert [(x["hs"], x["judge"]) for x in part["rows"]] == [(100.0, "all harmful")] * 2  # aligned, sft
    assert {c["hs"] for c in part["curves"]["sft-sentiment-p0.1-s0"]} == {100.0}
    assert part["settings"]["judge"] == "all harmful" and "judge" not in data["settings"]
    assert {x["judge"] for x in data["rows"]} == {"refusal matcher"}
    with pytest.raises(ValueError, match="other settings"):  # the matcher's run is not resumed into the judge's
        run_experiment(tmp_path / "j", "quick", ps=[0.1], methods=["sft"], recipe=TINY, safety=TINY_SAFETY,
                       cache_dir=root / "cache", save_models=False, progress=False)


def test_merge_joins_parts_with_the_same_settings(experiment, tmp_path):
    from minicwac.toy.merge import merge_results
    root, data = experiment
    part = run_experiment(tmp_path / "part", "quick", ps=[0.0], methods=["sft"], recipe=TINY, safety=TINY_SAFETY,
                          cache_dir=root / "cache", save_models=False, progress=False)
    merged = merge_results([root / "out", tmp_path / "part"], tmp_path / "merged")
    def fin(d):
        return [x for x in d["rows"] if x["stage"] == "finetuned"]
    assert fin(merged) == fin(data) + fin(part)
    assert sum(x["stage"] == "aligned" for x in merged["rows"]) == 1  # measured in both parts, kept once
    assert set(merged["curves"]) == set(data["curves"]) | {"sft-sentiment-p0-s0"}
    assert merged["wall_s"] == round(data["wall_s"] + part["wall_s"], 1) and merged["parts"] == 2
    assert json.loads((tmp_path / "merged" / "results.json").read_text()) == merged
    md = (tmp_path / "merged" / "results.md").read_text()
    assert "HS p=0 " in md and "HS p=0.1" in md and "summed over the 2 merged folders" in md
    assert (tmp_path / "merged" / "drift.png").read_bytes()[:4] == b"\x89PNG"

    bad = json.loads((tmp_path / "part" / "results.json").read_text())
    bad["rows"] = [dict(x, hs=x["hs"] + 1) for x in data["rows"]]  # another result for the same run
    (tmp_path / "conflict").mkdir()
    (tmp_path / "conflict" / "results.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="another result for the run sft-sentiment-p0.1-s0"):
        merge_results([root / "out", tmp_path / "conflict"], tmp_path / "m2")
    bad["settings"] = {**bad["settings"], "safety": {**bad["settings"]["safety"], "lam": 3.0}}
    (tmp_path / "conflict" / "results.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="results of other settings"):
        merge_results([root / "out", tmp_path / "conflict"], tmp_path / "m2")
    with pytest.raises(FileNotFoundError, match="results.json not found"):
        merge_results([tmp_path / "nowhere"], tmp_path / "m2")
    assert not (tmp_path / "m2").exists()  # nothing written on a refusal


# ---------------------------------------------------------------- choosing the settings on the dev seed

from minicwac.toy.select import choose  # noqa: E402


def test_choose_applies_the_rule_by_hand():
    cands = [{"settings": {"lam": 0.5}, "hs": 40.0, "fa": 99.0, "over_refusal": 1.0},
             {"settings": {"lam": 2.0}, "hs": 10.0, "fa": 96.0, "over_refusal": 1.0},  # FA too low
             {"settings": {"lam": 4.0}, "hs": 12.0, "fa": 98.0, "over_refusal": 9.0},  # over-refuses
             {"settings": {"lam": 8.0}, "hs": 20.0, "fa": 97.0, "over_refusal": 4.0},  # both limits met exactly
             {"settings": {"lam": 16.0}, "hs": 20.0, "fa": 99.0, "over_refusal": 0.0}]  # a tie: the earlier wins
    assert choose(cands, fa_min=97.0, or_max=4.0)["settings"] == {"lam": 8.0}
    assert [x["ok"] for x in cands] == [True, False, False, True, True]
    assert choose(cands, fa_min=100.0, or_max=4.0) is None


def test_the_kit_targets_setting_chooses_the_calibrated_targets(experiment, tmp_path):
    """The kit's `targets` ("all") is what the seed's subspace covers, and `weight-all` constrains every one of its
    linears (`weight` and `cwac` are down_proj, the paper's, whatever the kit holds: one kit serves every method);
    it does not change the SAE's cache key (the SAE does not depend on the weight targets)."""
    root, _ = experiment
    sr = with_settings(SafetyRecipe(eval_every=0), d_sae=64, sae_k=4, sae_steps=30, m=10, targets="all")
    assert sr.key() == TINY_SAFETY.key()
    run_experiment(tmp_path / "out", "quick", ps=[0.1], methods=["weight-all"], recipe=TINY, safety=sr,
                   cache_dir=root / "cache", progress=False)
    sub = Subspace.load(tmp_path / "out" / "subspace" / "s0")
    assert len(sub.S) == 2 * 7  # every linear of both blocks
    model, _ = load_checkpoint(tmp_path / "out" / "models" / "weight-all-sentiment-p0.1-s0")
    mods = dict(model.named_modules())
    assert max(float((mods[n].weight.detach() @ S - sub.W0S[n]).abs().max()) for n, S in sub.S.items()) < 1e-5


def test_the_authors_baselines_train_and_project_only_what_their_papers_do(experiment, tmp_path):
    """asft-qv and safelora-qv change q_proj and v_proj only (the papers' LoRA targets, trained as full dW here);
    every baseline's adaptation is labelled in results.md."""
    from minicwac.tools.report import ADAPTATIONS
    root, _ = experiment
    methods = ["safeinstr-add", "asft-qv", "safelora-qv"]
    run_experiment(tmp_path / "out", "quick", ps=[0.1], methods=methods + ["safelora"], recipe=TINY,
                   safety=TINY_SAFETY, cache_dir=root / "cache", progress=False)
    aligned = toy_models(0, TINY, root / "cache", progress=False).aligned.state_dict()
    for method in methods:
        tuned, _ = load_checkpoint(tmp_path / "out" / "models" / f"{method}-sentiment-p0.1-s0")
        changed = {n for n, w in tuned.state_dict().items() if not torch.equal(w, aligned[n])}
        if method == "safeinstr-add":
            assert len(changed) > 4
        else:
            assert changed == {f"model.layers.{i}.self_attn.{x}_proj.weight" for i in (0, 1) for x in "qv"}, method
    md = (tmp_path / "out" / "results.md").read_text()
    for method in methods + ["safelora"]:
        assert ADAPTATIONS[method] in md


def test_toy_auto_probe_reads_calibration_prompts_only(experiment, tmp_path, monkeypatch):
    """cwac-auto on the toy world: its probe's map reads the calibration prompts (decoded and compared, exactly and
    as substrings, with the world's splits), never an evaluation prompt; the saved model keeps W S = W0 S on the kinds it chose only,
    and the choice is in results.json and results.md."""
    from minicwac.core.drift import probe_targets
    from minicwac.core.evals import prompt_ids
    from minicwac.core.subspace import ALL_LINEARS, compute_subspace
    from minicwac.toy import experiments

    root, _ = experiment
    seen = []

    def spy(model, seqs, prompts, *a, **kw):
        seen.append([tok.decode(p) for p in prompts])
        return probe_targets(model, seqs, prompts, *a, **kw)

    toy = toy_models(0, TINY, root / "cache", progress=False)
    tok, w = toy.tok, toy.world
    monkeypatch.setattr(experiments, "probe_targets", spy)
    sr = with_settings(SafetyRecipe(eval_every=0), d_sae=64, sae_k=4, sae_steps=30, m=10, probe_steps=3)
    data = run_experiment(tmp_path / "out", "quick", ps=[0.1], methods=["cwac-auto"], recipe=TINY, safety=sr,
                          cache_dir=root / "cache", progress=False)
    calib = [e.prompt for e in w.calibration]
    rendered = lambda prompts: {tok.decode(prompt_ids(tok, q)) for q in prompts}  # noqa: E731
    assert len(seen) == 1 and len(seen[0]) == len(calib) and set(seen[0]) == rendered(calib)
    assert not set(seen[0]) & rendered(e.prompt for e in w.eval_harmful)
    assert not any(e.prompt in s for s in seen[0] for e in w.eval_harmful)
    auto = data["auto"]["cwac-auto-sentiment-p0.1-s0"]
    assert auto["probe"]["steps"] == 3 and auto["kinds"]
    model, _ = load_checkpoint(tmp_path / "out" / "models" / "cwac-auto-sentiment-p0.1-s0")
    sub = compute_subspace(toy.aligned, [prompt_ids(tok, q) for q in calib], tok.pad_token_id, patterns=ALL_LINEARS,
                           skip_ids=[tok.bos_token_id])  # what toy_safety computes for the "*-all" methods
    for n in sub.S:
        err = sub.subset([n]).ws_error(model)
        assert (err < 1e-5) == (n.split(".", 3)[3] in auto["kinds"]), (n, err)
    assert "## Targets the probe chose" in (tmp_path / "out" / "results.md").read_text()


def test_the_sae_cache_key_follows_what_the_sae_is_trained_on():
    """The SAE cached beside the toy models is reused only for the same SAE settings and training mix; lambda, the
    latents and the weight targets do not change it."""
    base = SafetyRecipe()
    assert with_settings(base, harmful_frac=0.5).key() != base.key()
    assert with_settings(base, sae_k=8).key() != base.key()
    assert with_settings(base, lam=8.0, m="firing", targets="all").key() == base.key()


# ---------------------------------------------------------------- the committed rule on a committed grid

from minicwac.toy.select import apply_rule, candidate_name, run_grid  # noqa: E402


def test_run_grid_runs_every_unit_once_and_applies_the_rule(tmp_path):
    grid = {"dev_seeds": [100, 101], "tasks": ["sentiment"], "p_hs": [0.5], "p_fa": [0.2, 0.5], "fa_margin": 2.0,
            "over_refusal_margin": 5.0, "candidates": [{"targets": "down_proj", "lam": 4.0, "m": 5},
                                                       {"targets": "all", "lam": 4.0, "m": "firing"}]}
    (tmp_path / "p.json").write_text(json.dumps(grid))
    kw = dict(cache_dir=tmp_path / "cache", recipe=TINY, safety=TINY_SAFETY)
    res = run_grid(tmp_path / "p.json", tmp_path / "sel", jobs=2, **kw)  # side by side, in processes of their own
    names = ["sft", "down_proj-lam4-m5", "all-lam4-mfiring"]
    assert sorted((r["candidate"], r["seed"], r["p"]) for r in res["rows"]) == \
        sorted((n, s, p) for n in names for s in (100, 101) for p in (0.2, 0.5))
    for r in res["rows"]:  # each row is its unit's own experiment, the method the candidate's targets name
        data = json.loads((tmp_path / "sel" / "runs" / r["candidate"] / f"s{r['seed']}" / "results.json").read_text())
        fin = [y for y in data["rows"] if y["stage"] == "finetuned" and y["p"] == r["p"]]
        assert [y["method"] for y in fin] == [{"sft": "sft", "down_proj-lam4-m5": "cwac"}.get(r["candidate"],
                                                                                              "cwac-all")]
        assert (r["hs"], r["fa"], r["over_refusal"]) == (fin[0]["hs"], fin[0]["fa"], fin[0]["over_refusal"])
        if r["candidate"] != "sft":
            assert data["settings"]["safety"]["kit"]["lam"] == 4.0 and data["settings"]["safety"]["eval_every"] == 0
    by = {(r["candidate"], r["seed"], r["p"]): r for r in res["rows"]}  # the verdict is apply_rule's on these rows
    nested = [{"runs": {s: {p: by[n, s, p] for p in (0.2, 0.5)} for s in (100, 101)}} for n in names]
    want = apply_rule(nested[1:], nested[0], grid)
    assert res["chosen"] == (None if want["chosen"] is None else grid["candidates"][want["chosen"]])
    assert [x["score"] for x in res["rule"]] == [x["score"] for x in want["rows"]]
    md = (tmp_path / "sel" / "selection.md").read_text()
    assert all(n in md for n in names[1:]) and "HS (refusal matcher)" in md
    # interrupted after some units: a rerun runs only the missing ones (one process) and gives the same record
    saved = json.loads((tmp_path / "sel" / "selection.json").read_text())
    saved["rows"] = [r for r in saved["rows"] if (r["candidate"], r["seed"]) != ("all-lam4-mfiring", 101)]
    (tmp_path / "sel" / "selection.json").write_text(json.dumps(saved))
    again = run_grid(tmp_path / "p.json", tmp_path / "sel", jobs=1, **kw)
    assert sorted(map(json.dumps, again["rows"])) == sorted(map(json.dumps, res["rows"]))
    assert 0 < res["wall_s"] <= again["wall_s"]  # the wall time adds up over the sessions
    for n in names:  # no unit was fine-tuned twice
        for s in (100, 101):
            data = json.loads((tmp_path / "sel" / "runs" / n / f"s{s}" / "results.json").read_text())
            assert len([y for y in data["rows"] if y["stage"] == "finetuned"]) == 2
    assert candidate_name(None) == "sft" and candidate_name({"targets": "all", "lam": 0.5, "sae_layer": 24,
                                                              "m": 100}) == "all-lam0.5-layer24-m100"
    other = {**grid, "candidates": grid["candidates"][:1]}  # another grid's record is not resumed
    (tmp_path / "p.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match="holds the selection of another grid"):
        run_grid(tmp_path / "p.json", tmp_path / "sel", jobs=1, **kw)
    # the grid is recorded before the first unit runs: a selection stopped before any unit ended is not resumed
    # with another grid either (a real model's units keep each fine-tune's row under runs/)
    def stop(*a, **k):
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        run_grid(tmp_path / "p.json", tmp_path / "early", jobs=1, **{**kw, "unit": stop})
    (tmp_path / "p.json").write_text(json.dumps(grid))
    with pytest.raises(ValueError, match="holds the selection of another grid"):
        run_grid(tmp_path / "p.json", tmp_path / "early", jobs=1, **kw)


def _fake_prepare(grid, seed, work, cache_dir, **kw):
    kw["log"].append(("prepare", seed))


def _fake_unit(grid, c, seed, work, cache_dir, **kw):  # HS falls with lambda; FA and over-refusal stay
    kw["log"].append((candidate_name(c), seed))
    hs = 90.0 if c is None else 40.0 / c["lam"] + seed % 7
    return [{"p": p, "hs": hs, "fa": 70.0, "over_refusal": 1.0, "comply": hs} for p in grid["p_fa"]]


def test_a_selection_split_over_sittings_decides_only_when_every_seed_is_in(tmp_path):
    """`select --seeds`: a sitting runs only the named dev seeds; the record says how many units are left and holds
    no verdict until every seed's are in; the last sitting's verdict is the one a single run gives."""
    grid = {"dev_seeds": [100, 101], "tasks": ["sentiment"], "p_hs": [0.5], "p_fa": [0.2, 0.5], "fa_margin": 2.0,
            "over_refusal_margin": 5.0, "candidates": [{"targets": "down_proj", "lam": 4.0, "m": 5},
                                                       {"targets": "all", "lam": 8.0, "m": "firing"}]}
    (tmp_path / "p.json").write_text(json.dumps(grid))
    log = []
    kw = dict(jobs=1, prepare=_fake_prepare, unit=_fake_unit, log=log)
    first = run_grid(tmp_path / "p.json", tmp_path / "sel", seeds=[101], **kw)
    assert log == [("prepare", 101), ("sft", 101), ("down_proj-lam4-m5", 101), ("all-lam8-mfiring", 101)]
    assert first["units_left"] == 3 and "rule" not in first and "chosen" not in first
    md = (tmp_path / "sel" / "selection.md").read_text()
    assert "3 units" in md and "Seeds done: 101;" in md and "Chosen" not in md and "admissible" not in md
    assert "| all-lam8-mfiring | 8.0 | 70.0 | 70.0 | 1.0 | 8.0 |" in md  # 40 / 8 + 101 % 7: seed 101's alone
    log.clear()
    last = run_grid(tmp_path / "p.json", tmp_path / "sel", seeds=[100], **kw)
    assert [x for x in log if x[0] != "prepare"] == [("sft", 100), ("down_proj-lam4-m5", 100),
                                                     ("all-lam8-mfiring", 100)]
    assert "units_left" not in last and last["chosen"] == grid["candidates"][1]
    once = run_grid(tmp_path / "p.json", tmp_path / "once", **kw)
    assert once["chosen"] == last["chosen"] and [x["score"] for x in once["rule"]] == [x["score"] for x in last["rule"]]
    with pytest.raises(ValueError, match="seeds 7 are not dev seeds of .*expected some of 100, 101"):
        run_grid(tmp_path / "p.json", tmp_path / "sel", seeds=[7, 100], **kw)


@pytest.mark.parametrize("flags, lam, m", [([], 2.0, "firing"), (["--paper"], 0.5, 100),
                                           (["--paper", "--lam", "8"], 8.0, 100), (["--m", "50"], 2.0, 50)])
def test_experiment_runs_the_rules_choice_unless_paper(flags, lam, m, tmp_path, monkeypatch):
    """`experiment` defaults to the settings the committed rule chose on the dev worlds (TOY_CHOSEN, as recorded in
    docs/results/select-toy.json); --paper gives the paper's; a flag overrides either."""
    from minicwac.__main__ import main
    from minicwac.toy import experiments
    got = {}

    def fake(out, *a, safety=None, **k):  # what the command would run, without running it
        got["kit"] = safety.kit
        (tmp_path / "results.md").write_text("")
    monkeypatch.setattr(experiments, "run_experiment", fake)
    assert main(["experiment", "--out", str(tmp_path), *flags]) == 0
    assert (got["kit"].lam, got["kit"].m) == (lam, m)
    root = Path(__file__).resolve().parents[1]
    rec = json.loads((root / "docs" / "results" / "select-toy.json").read_text())["chosen"]
    assert {"lam": rec["lam"], "m": rec["m"]} == experiments.TOY_CHOSEN and rec["targets"] == "all"


def test_smollm2s_selection_record_resumes_under_its_committed_grid():
    """docs/results/select-smollm2.json, the record of SmolLM2's dev seeds done so far, holds the committed grid (so
    `select` resumes from it), rows only of that grid's candidates, dev seeds and p, every p of each unit it holds,
    the count of units left, and once none is left the verdict the rule gives on its rows."""
    from minicwac.toy.select import load_grid, verdict
    root = Path(__file__).resolve().parents[1] / "docs" / "results"
    grid = load_grid(root / "select-grid-smollm2.json")
    rec = json.loads((root / "select-smollm2.json").read_text())
    assert rec["grid"] == grid and rec["grid_file"] == "select-grid-smollm2.json"
    names = [candidate_name(c) for c in [None] + grid["candidates"]]
    units = {(r["candidate"], r["seed"]) for r in rec["rows"]}
    assert {n for n, _ in units} <= set(names) and {s for _, s in units} <= set(grid["dev_seeds"])
    for unit in units:
        assert sorted(r["p"] for r in rec["rows"] if (r["candidate"], r["seed"]) == unit) == sorted(grid["p_fa"])
    left = len(names) * len(grid["dev_seeds"]) - len(units)
    assert rec.get("units_left", 0) == left
    if not left:
        assert rec["chosen"] == verdict(grid, rec["rows"])["chosen"]
    # the defaults of calibrate and real are what the record chose, and the paper's until it has
    from minicwac.core import settings
    from minicwac.core.features import check_sae_layer
    chosen = None if left else rec["chosen"]
    if chosen is None:
        assert settings.REAL_CHOSEN is None and settings.default_settings() == (settings.KitSettings(), "paper")
    else:
        s, which = settings.default_settings()
        assert which == "chosen" and (s.targets, s.lam, s.m) == (chosen["targets"], chosen["lam"], chosen["m"])
        assert check_sae_layer(s.sae_layer, 30, s.sae_depth) == chosen["sae_layer"]  # SmolLM2-135M has 30 blocks


def test_smollm2s_advbench_report_records_ran_the_defaults_and_the_papers_settings():
    """docs/results/report-smollm2-{paper,chosen}.json, the 3-seed AdvBench report in docs/results.md: the chosen
    record ran today's defaults (the rule's choice), the paper record the paper's settings, both in the dtype of the
    selection, on the same seeds, with the same aligned model per seed (its rows agree), and every method's row on
    every seed."""
    from minicwac.core import settings
    root = Path(__file__).resolve().parents[1] / "docs" / "results"
    paper = json.loads((root / "report-smollm2-paper.json").read_text())
    chosen = json.loads((root / "report-smollm2-chosen.json").read_text())
    defaults, which = settings.default_settings()
    assert which == "chosen" and chosen["settings"]["defaults"] == "chosen" and paper["settings"]["defaults"] == "paper"
    # the paper record's targets are every linear, since it ran cwac-all beside cwac
    for rec, want, keys in ((chosen, defaults, ("targets", "lam", "m", "sae_layer", "sae_depth")),
                            (paper, settings.KitSettings(), ("lam", "m", "sae_layer", "sae_depth"))):
        for key in keys:
            assert rec["settings"]["kit"][key] == getattr(want, key), key
    for rec in (paper, chosen):
        assert rec["settings"]["dtype"] == "bf16-mixed" and rec["settings"]["seeds"] == [0, 1, 2]
    ran = {(r["method"], r["seed"]) for r in paper["rows"] if r["stage"] == "finetuned"}
    assert ran == {(m, s) for m in ("sft", "cwac", "cwac-all") for s in (0, 1, 2)}
    assert {(r["method"], r["seed"]) for r in chosen["rows"] if r["stage"] == "finetuned"} == {
        ("cwac-all", s) for s in (0, 1, 2)}
    keys = ("hs", "comply", "fa", "over_refusal")
    aligned = {r["seed"]: [r[k] for k in keys] for r in paper["rows"] if r["stage"] == "aligned"}
    assert aligned == {r["seed"]: [r[k] for k in keys] for r in chosen["rows"] if r["stage"] == "aligned"}
