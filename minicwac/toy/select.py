"""Choosing the constraint settings by a rule fixed in advance (`apply_rule`), on a committed grid of candidates
(`load_grid`), on dev seeds or another prompt source, never on what is reported (`run_grid`, `python -m minicwac
select`). `choose` is the same idea at one p, the form notebook 08 teaches."""
from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

from ..core.evals import hs_label, judge_name
from ..core.files import prepare_out, read_json, write_json_atomic
from ..core.settings import candidate_name, cwac_method
from ..tools.report import mean_of
from .experiments import SafetyRecipe, run_experiment, toy_safety, with_settings
from .pipeline import Recipe, toy_models
from .world import DEV_SEEDS_FROM


def choose(cands: list[dict], fa_min: float, or_max: float) -> dict | None:
    """The selection rule at one p (notebook 08's): marks each candidate "ok" when fa >= fa_min and over_refusal
    <= or_max, and returns the ok one with the lowest hs (the earliest of ties), or None when none is ok. The
    limits get 1e-9 of slack: they compare means of percentages, and a mean exactly on the limit must not fail by
    a rounding error."""
    for x in cands:
        x["ok"] = x["fa"] >= fa_min - 1e-9 and x["over_refusal"] <= or_max + 1e-9
    ok = [x for x in cands if x["ok"]]
    return min(ok, key=lambda x: x["hs"]) if ok else None  # min keeps the first of ties


def load_grid(path: str | Path) -> dict:
    """A committed candidate grid (docs/results/select-grid-*.json): the rule's p sets, margins, dev seeds and the
    candidates, weakest first (a tie goes to the earlier one)."""
    g = read_json(path, "a candidate grid (a JSON object)")
    need = ("dev_seeds", "p_hs", "p_fa", "fa_margin", "over_refusal_margin", "candidates")
    missing = [k for k in need if k not in g]
    if missing or not g["candidates"] or not g["dev_seeds"]:
        raise ValueError(f"{path}: {'no ' + missing[0] if missing else 'no candidates or no dev seeds'}; expected "
                         f"{', '.join(need)} (see docs/results.md)")
    if any(seed < DEV_SEEDS_FROM for seed in g["dev_seeds"]):
        raise ValueError(f"{path}: dev seeds {g['dev_seeds']} include a reported seed (< {DEV_SEEDS_FROM})")
    return g


def apply_rule(cands: list[dict], sft: dict, grid: dict) -> dict:
    """The rule of docs/results.md ("Choosing the defaults"), committed before its runs. cands (in grid order) and
    sft: {"runs": {seed: {p: {"hs", "fa", "over_refusal"}}}}, every seed at every p of the grid.

    Admissible: mean FA (over the seeds) >= SFT's - fa_margin at every p of p_fa, and mean over-refusal (over the
    seeds and p_fa) <= SFT's + over_refusal_margin. Score: mean HS over p_hs and the seeds. The lowest score wins,
    but an admissible candidate whose per-seed scores differ from the winner's by less than two standard errors
    of that paired difference counts as tied, and a tie goes to the earliest (the weakest constraint). Returns
    {"chosen": index or None, "rows": [...]} with each candidate's fa_short (the p it fails), admissible, score."""
    seeds, m_fa, m_or = list(grid["dev_seeds"]), grid["fa_margin"], grid["over_refusal_margin"]

    def mean(xs):
        return sum(xs) / len(xs)

    def fa(c, p):
        return mean([c["runs"][s][p]["fa"] for s in seeds])

    def per_seed(c):
        return [mean([c["runs"][s][p]["hs"] for p in grid["p_hs"]]) for s in seeds]
    sft_or = mean([sft["runs"][s][p]["over_refusal"] for s in seeds for p in grid["p_fa"]])
    rows = []
    for c in cands:
        short = [p for p in grid["p_fa"] if fa(c, p) < fa(sft, p) - m_fa - 1e-9]  # slack: means of percentages
        o = mean([c["runs"][s][p]["over_refusal"] for s in seeds for p in grid["p_fa"]])
        rows.append({"fa_short": short, "over_refusal": o, "admissible": not short and o <= sft_or + m_or + 1e-9,
                     "per_seed": per_seed(c), "score": mean(per_seed(c))})
    ok = [i for i, r in enumerate(rows) if r["admissible"]]
    if not ok:
        return {"chosen": None, "rows": rows}
    best = min(ok, key=lambda i: rows[i]["score"])  # min keeps the first of exact ties

    def tied(i):  # the paired difference within two of its standard errors (one seed: only an exact tie)
        d = [a - b for a, b in zip(rows[i]["per_seed"], rows[best]["per_seed"])]
        if len(d) < 2:
            return mean(d) == 0
        sd = (sum((x - mean(d)) ** 2 for x in d) / (len(d) - 1)) ** 0.5
        return mean(d) < 2 * sd / len(d) ** 0.5
    return {"chosen": min(i for i in ok if i == best or tied(i)), "rows": rows}


def toy_unit(grid: dict, c: dict | None, seed: int, work: Path, cache_dir=None, recipe: Recipe | None = None,
             safety: SafetyRecipe | None = None) -> list[dict]:
    """One candidate (None: SFT) on one dev seed: every task at every p of p_fa, as `experiment` runs them (no
    drift curve, no saved models; a rerun resumes). Returns one row per p: HS, FA and over-refusal, mean over
    the grid's tasks."""
    settings = {} if c is None else {"lam": float(c["lam"]), "m": c["m"]}
    safety = with_settings(replace(safety or SafetyRecipe(), eval_every=0), **settings)
    data = run_experiment(work / candidate_name(c) / f"s{seed}", "quick", [seed], grid["tasks"], grid["p_fa"],
                          [cwac_method(c and c["targets"])], recipe, safety, cache_dir=cache_dir, save_models=False,
                          progress=False)
    fin = [x for x in data["rows"] if x["stage"] == "finetuned"]
    return [{"p": p, **{k: mean_of([x[k] for x in fin if x["p"] == p]) for k in RULE_KEYS}} for p in grid["p_fa"]]


def toy_prepare(grid: dict, seed: int, work: Path, cache_dir=None, recipe: Recipe | None = None,
                safety: SafetyRecipe | None = None) -> None:
    """A dev seed's toy models and SAE, made once before its candidates run side by side (they share the cache)."""
    r = recipe or Recipe()
    toy = toy_models(seed, r, cache_dir, progress=False)
    toy_safety(toy, r, safety or SafetyRecipe(), seed, progress=False, with_align_C=False)


RULE_KEYS = ("hs", "fa", "over_refusal")
SELECTION_FILES = ("selection.json", "selection.md", "runs")


def _one_thread() -> None:
    import torch
    torch.set_num_threads(1)  # parallel one-thread processes: a second thread each would only contend


def run_grid(grid_path: str | Path, out: str | Path = "runs/select", jobs: int = 2, cache_dir=None,
             prepare=toy_prepare, unit=toy_unit, seeds: list[int] | None = None, **opts) -> dict:
    """The committed rule (`apply_rule`) on a committed grid (`load_grid`): SFT and every candidate on every dev
    seed at every p of p_fa, `jobs` one-thread processes side by side (the seeds' models and SAEs made first).
    prepare(grid, seed, work, cache_dir, **opts) and unit(grid, candidate, seed, work, cache_dir, **opts) -> rows:
    the toy world's by default (opts: recipe, safety); a real model's are `tools.real.real_prepare` and `real_unit`.

    Writes out/selection.json after every finished unit (a unit: one candidate on one seed; a rerun skips the
    units it holds, so an interrupted selection resumes) and, once every unit is in, the rule's verdict in it
    and out/selection.md. The units' own runs go under out/runs/. `seeds`: run only these dev seeds' units now
    (a selection split over several sittings); the rule decides once every dev seed's units are in."""
    grid = load_grid(grid_path)
    bad = sorted(set(seeds or []) - set(grid["dev_seeds"]))
    if bad:
        raise ValueError(f"seeds {', '.join(map(str, bad))} are not dev seeds of {grid_path}; "
                         f"expected some of {', '.join(map(str, grid['dev_seeds']))}")
    out = prepare_out(out, SELECTION_FILES)
    path = out / "selection.json"
    record = {"grid_file": Path(grid_path).name, "grid": grid,
              "about": "HS, FA, over-refusal in % per candidate, dev seed and p", "rows": []}
    if path.is_file():
        old = read_json(path, "a selection record (selection.json)")
        if old.get("grid") != grid:
            raise ValueError(f"{path} holds the selection of another grid than {grid_path}; choose another --out")
        record["rows"], record["wall_s"] = old["rows"], old.get("wall_s", 0.0)
    else:  # written before any run: the units' kept rows under out/runs/ belong to this grid, and to no other
        write_json_atomic(path, record)
    t0 = time.time() - record.get("wall_s", 0.0)  # the wall time counts the earlier sessions too
    done = {(r["candidate"], r["seed"]) for r in record["rows"]}
    cands = [None] + list(grid["candidates"])
    todo = [(c, s) for s in grid["dev_seeds"] for c in cands
            if (candidate_name(c), s) not in done and (not seeds or s in seeds)]
    work = out / "runs"

    def add(c, s, rows):
        record["rows"] += [{"candidate": candidate_name(c), "seed": s, **r} for r in rows]
        record["wall_s"] = round(time.time() - t0, 1)
        write_json_atomic(path, record)

    if jobs <= 1:
        for s in sorted({s for _, s in todo}):
            prepare(grid, s, work, cache_dir, **opts)
        for c, s in todo:
            add(c, s, unit(grid, c, s, work, cache_dir, **opts))
    else:
        import multiprocessing
        from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
        with ProcessPoolExecutor(jobs, multiprocessing.get_context("spawn"), initializer=_one_thread) as ex:
            # a seed's units are queued as soon as its own models are made: no process waits for another seed's
            pending = {ex.submit(prepare, grid, s, work, cache_dir, **opts): ("prepare", s)
                       for s in sorted({s for _, s in todo})}
            while pending:
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for f in finished:
                    (kind, key), res = pending.pop(f), f.result()
                    if kind == "prepare":  # a seed's models are made: its units are queued
                        pending.update({ex.submit(unit, grid, c, s, work, cache_dir, **opts): ("unit", (c, s))
                                        for c, s in todo if s == key})
                    else:
                        add(*key, res)
    left = len(cands) * len(grid["dev_seeds"]) - len({(r["candidate"], r["seed"]) for r in record["rows"]})
    record.update(verdict(grid, record["rows"]) if not left else {"units_left": left})
    write_json_atomic(path, record)
    (out / "selection.md").write_text(grid_report(grid, record))
    return record


def verdict(grid: dict, rows: list[dict]) -> dict:
    """`apply_rule` on a selection's rows: {"chosen": the settings or None, "rule": one row per candidate}."""
    def runs(name):
        return {"runs": {s: {r["p"]: r for r in rows if r["candidate"] == name and r["seed"] == s}
                         for s in grid["dev_seeds"]}}
    res = apply_rule([runs(candidate_name(c)) for c in grid["candidates"]], runs("sft"), grid)
    chosen = None if res["chosen"] is None else grid["candidates"][res["chosen"]]
    return {"chosen": chosen, "rule": [{"settings": c, **r} for c, r in zip(grid["candidates"], res["rows"])]}


def grid_report(grid: dict, record: dict) -> str:
    """selection.md: per candidate its FA at every p and HS against SFT's, the rule's verdict, the choice. While
    units are left (`run_grid(seeds=...)`): the means over the seeds done so far, with no verdict."""
    rows, final = record["rows"], "rule" in record
    have = {(r["candidate"], r["seed"]) for r in rows}
    seeds = [s for s in grid["dev_seeds"]
             if all((candidate_name(c), s) in have for c in [None] + grid["candidates"])]

    def mean(name, k, p=None):
        return mean_of([r[k] for r in rows if r["candidate"] == name and r["seed"] in seeds and p in (None, r["p"])])

    def cells(name):
        return (" | ".join(f"{mean(name, 'hs', p):.1f}" for p in grid["p_hs"]) + " | "
                + " | ".join(f"{mean(name, 'fa', p):.1f}" for p in grid["p_fa"]))
    head = (f"# Settings chosen by the committed rule ({record['grid_file']}, dev seeds {', '.join(map(str, seeds))})"
            if final else f"# Selection in progress ({record['grid_file']}): {record['units_left']} units (a candidate "
            f"on a dev seed) left; the rule decides once every unit is in")
    L = [head, "", f"{hs_label()}, FA and over-refusal in %, means over the dev seeds"
         + (" and the tasks" if "tasks" in grid else "") + "; score: mean HS over p in "
         + ", ".join(f"{p:g}" for p in grid["p_hs"]) + " (docs/results.md, \"Choosing the defaults\")."
         + ("" if final else f" Seeds done: {', '.join(map(str, seeds)) or 'none'}; a seed decides nothing alone."),
         "", f"| candidate (HS: {judge_name(None)}) | " + " | ".join(f"HS p={p:g}" for p in grid["p_hs"]) + " | "
         + " | ".join(f"FA p={p:g}" for p in grid["p_fa"]) + " | over-refusal | score |" + (" admissible |" * final),
         "|---" * (len(grid["p_hs"]) + len(grid["p_fa"]) + 3 + final) + "|"]
    if not seeds:
        return "\n".join(L[:3]) + "\n"
    L.append(f"| SFT | {cells('sft')} | {mean('sft', 'over_refusal'):.1f} | |" + " |" * final)
    for i, c in enumerate(grid["candidates"]):
        name = candidate_name(c)
        score = mean_of([mean(name, "hs", p) for p in grid["p_hs"]])
        if not final:
            L.append(f"| {name} | {cells(name)} | {mean(name, 'over_refusal'):.1f} | {score:.1f} |")
            continue
        x = record["rule"][i]
        ok = "yes" if x["admissible"] else "no: FA short at p = " + ", ".join(f"{p:g}" for p in x["fa_short"]) \
            if x["fa_short"] else "no: over-refusal"
        mark = " **chosen**" if c == record["chosen"] else ""
        L.append(f"| {name}{mark} | {cells(name)} | {x['over_refusal']:.1f} | {x['score']:.1f} | {ok} |")
    if final:
        L += ["", f"Chosen: {candidate_name(record['chosen'])}." if record["chosen"] else
              "No candidate is admissible: the defaults stay the paper's."]
    return "\n".join(L) + "\n"


# ---------------------------------------------------------------- python -m minicwac select


def add_arguments(p) -> None:
    from ..cli import positive_int
    p.add_argument("--grid", required=True,
                   help="a committed candidate grid, e.g. docs/results/select-grid-toy.json (docs/results.md)")
    p.add_argument("--out", default="runs/select", help="output folder (default runs/select); a rerun resumes")
    p.add_argument("--jobs", type=positive_int, default=2, help="one-thread processes side by side (default 2)")
    p.add_argument("--model", default=None,
                   help="a real model's grid (e.g. select-grid-smollm2.json): its Hugging Face folder")
    p.add_argument("--device", default="cpu", help="with --model: cpu or cuda")
    p.add_argument("--cache", default=None, help="the toy world's cache of base/aligned models and SAEs")
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="run only these dev seeds' units now (the rule decides once every seed's are in)")


def run(args) -> None:
    toy = "tasks" in load_grid(args.grid)  # a toy grid names its tasks; a real model's runs its preset's
    if toy == bool(args.model):
        raise ValueError(f"{args.grid} is a {'toy' if toy else 'real model'}'s grid: "
                         + ("run it without --model" if toy else "give the model's folder with --model"))
    if toy:
        res = run_grid(args.grid, args.out, args.jobs, args.cache, seeds=args.seeds)
    else:
        from ..tools.real import real_prepare, real_unit
        res = run_grid(args.grid, args.out, args.jobs, args.cache, real_prepare, real_unit, seeds=args.seeds,
                       model=args.model, device=args.device)
    print(open(f"{args.out}/selection.md").read())
    if "rule" not in res:
        print(f"wrote {args.out}/selection.json; {res['units_left']} units left: run again without --seeds")
        return
    chosen = candidate_name(res["chosen"]) if res["chosen"] else "none (the paper's defaults stay)"
    print(f"wrote {args.out}/selection.json and selection.md; chosen: {chosen}")
