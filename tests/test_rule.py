"""The rule that chooses the default settings (docs/results.md, "Choosing the defaults"), on hand-made numbers,
and the committed grids it reads."""
from __future__ import annotations

from pathlib import Path

import pytest

from minicwac.toy.select import apply_rule, load_grid

ROOT = Path(__file__).resolve().parents[1]
GRID = {"dev_seeds": [100, 101, 102], "p_hs": [0.05, 0.1, 0.2], "p_fa": [0.05, 0.1, 0.2, 0.5], "fa_margin": 2.0,
        "over_refusal_margin": 5.0}


def runs(hs_by_seed, fa=70.0, fa_at_half=None, over_refusal=1.0):
    """Every seed at every p: HS per seed (the same at each p), FA (another at p = 0.5), over-refusal."""
    return {"runs": {s: {p: {"hs": h, "fa": fa_at_half if p == 0.5 and fa_at_half is not None else fa,
                             "over_refusal": over_refusal} for p in GRID["p_fa"]}
                     for s, h in zip(GRID["dev_seeds"], hs_by_seed)}}


def test_the_rule_by_hand():
    sft = runs([90, 92, 94], fa=70.0, over_refusal=2.0)
    cands = [runs([30, 31, 32]),  # 0: weakest; admissible, score 31
             runs([28, 32, 27]),  # 1: score 29; paired diff with 2 (below): [3, 5, 3], mean 3.67, se 0.67: not tied
             runs([25, 27, 24]),  # 2: score 25.33, the lowest admissible
             runs([5, 5, 5], fa_at_half=67.9),  # 3: lowest HS, but FA at p = 0.5 short of 70 - 2: not admissible
             runs([6, 6, 6], over_refusal=7.5)]  # 4: over-refusal 7.5 > 2 + 5: not admissible
    res = apply_rule(cands, sft, GRID)
    assert [r["admissible"] for r in res["rows"]] == [True, True, True, False, False]
    assert res["rows"][3]["fa_short"] == [0.5] and res["rows"][1]["score"] == pytest.approx(29.0)
    assert res["chosen"] == 2
    # a noisy lead is a tie, and a tie goes to the weaker (earlier) candidate: 0 against 2 becomes [27, 23, 29]
    # (mean 26.33) against [25, 27, 24]: diffs [2, -4, 5], mean 1, sd 4.58, se 2.65 -> tied with the best -> 0
    cands[0] = runs([27, 23, 29])
    assert apply_rule(cands, sft, GRID)["chosen"] == 0
    # nothing admissible: no choice (the defaults stay the paper's)
    assert apply_rule(cands[3:], sft, GRID)["chosen"] is None


@pytest.mark.parametrize("name, n", [("toy", 12), ("smollm2", 8)])
def test_the_committed_grids_load(name, n):
    g = load_grid(ROOT / "docs" / "results" / f"select-grid-{name}.json")
    assert len(g["candidates"]) == n <= 16 and g["p_hs"] == GRID["p_hs"] and g["p_fa"] == GRID["p_fa"]
    assert min(g["dev_seeds"]) >= 100 and len(g["dev_seeds"]) == 3
    # weakest first: down_proj before all, and within a target the smaller lambda first
    order = [(c["targets"] != "down_proj", c["lam"]) for c in g["candidates"]]
    assert order == sorted(order)


def test_a_grid_with_a_reported_seed_is_refused(tmp_path):
    import json
    (tmp_path / "p.json").write_text(json.dumps({**GRID, "dev_seeds": [0, 100], "candidates": [{"lam": 1.0}]}))
    with pytest.raises(ValueError, match="include a reported seed"):
        load_grid(tmp_path / "p.json")


def test_select_runs_a_toy_grid_without_a_model_and_a_real_one_with_it(tmp_path):
    from minicwac.__main__ import main
    grids = ROOT / "docs" / "results"
    with pytest.raises(SystemExit, match="a toy's grid: run it without --model"):
        main(["select", "--grid", str(grids / "select-grid-toy.json"), "--model", str(tmp_path), "--out",
              str(tmp_path / "sel")])
    with pytest.raises(SystemExit, match="a real model's grid: give the model's folder with --model"):
        main(["select", "--grid", str(grids / "select-grid-smollm2.json"), "--out", str(tmp_path / "sel")])
    assert not (tmp_path / "sel").exists()  # refused before anything was written
