"""Choosing the constraint settings on a dev seed (a world of its own), never on the seeds that are reported."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from ..core.files import prepare_out, write_json_atomic
from ..tools.report import mean_of, adaptation_notes
from ..core.settings import methods_for
from .experiments import SafetyRecipe, run_experiment, with_settings
from .pipeline import Recipe
from .world import DEV_SEEDS_FROM, TASKS, check_p, check_task


DEV_SEED = DEV_SEEDS_FROM  # a world of its own lexicon (world.lexicon_of): no prompt, topic or phrasing reported


def select_grid(n_layers: int) -> dict[str, list[dict]]:
    """The candidates `select` tries, fixed before any result: CWAC's activation side (lambda x latents x SAE
    layer: after the middle block, and after the last but one), SafeInstr's refusal share, AsFT's lambda.
    Lambda 128 and 512 and the share 0.5 widen the first grid, whose choices sat at its edge (lambda 32, 0.3)."""
    layers = sorted({n_layers // 2, n_layers - 1})
    return {"cwac": [{"sae_layer": layer, "m": m, "lam": lam} for layer in layers for m in (100, "firing")
                     for lam in (0.5, 2.0, 8.0, 32.0, 128.0, 512.0)],
            "safeinstr": [{"safeinstr_frac": f} for f in (0.1, 0.2, 0.3, 0.5)],
            "asft": [{"asft_lam": a} for a in (1.0, 10.0, 100.0)]}


def choose(cands: list[dict], fa_min: float, or_max: float) -> dict | None:
    """The selection rule: marks each candidate "ok" when fa >= fa_min and over_refusal <= or_max, and returns the
    ok one with the lowest hs (the earliest of ties), or None when none is ok. The limits get 1e-9 of slack: they
    compare means of percentages, and a mean exactly on the limit must not fail by a rounding error."""
    for x in cands:
        x["ok"] = x["fa"] >= fa_min - 1e-9 and x["over_refusal"] <= or_max + 1e-9
    ok = [x for x in cands if x["ok"]]
    return min(ok, key=lambda x: x["hs"]) if ok else None  # min keeps the first of ties


def load_grid(path: str | Path) -> dict:
    """A committed candidate grid (docs/results/select-grid-*.json): the rule's p sets, margins, dev seeds and the
    candidates, weakest first (a tie goes to the earlier one)."""
    from ..core.files import read_json
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


def run_select(out: str | Path = "runs/select", seed: int = DEV_SEED, tasks=None, p: float = 0.1,
               recipe: Recipe | None = None, safety: SafetyRecipe | None = None, grid: dict | None = None,
               fa_margin: float = 2.0, over_refusal_margin: float = 5.0, cache_dir: str | Path | None = None,
               progress: bool = True) -> dict:
    """Choose CWAC's activation settings and the baselines' strengths on the dev seed, never on the reported ones.

    Every candidate of `grid` (default: select_grid) runs `experiment` on the dev seed at harmful ratio p for every
    task (no drift curves). The rule, fixed before looking at any result: per method, the lowest HS (mean over
    tasks, on the dev world's held-out prompts) among the candidates whose FA is at least FA(SFT) - fa_margin and
    whose over-refusal is at most the aligned model's + over_refusal_margin; ties go to the earlier candidate.
    Writes out/selection.json and out/selection.md (with the `experiment` flags of the chosen settings), and the
    candidates' runs under out/runs/ (a rerun resumes)."""
    if seed < DEV_SEEDS_FROM:
        raise ValueError(f"seed {seed} builds a world of the reported lexicon; choose a dev seed >= "
                         f"{DEV_SEEDS_FROM} (default {DEV_SEED}), whose prompts share nothing with the reported ones")
    tasks = [check_task(t) for t in (list(TASKS) if tasks is None else tasks)]
    p, r = check_p(p), recipe or Recipe()
    base = replace(safety or SafetyRecipe(), eval_every=0)
    grid = select_grid(r.num_hidden_layers) if grid is None else grid
    bad = [m for m in grid if m not in methods_for("toy")]
    if bad:
        raise ValueError(f"unknown method {bad[0]!r} in the grid; expected one of {', '.join(methods_for('toy'))}")
    out = prepare_out(out)

    def measure(method: str, settings: dict) -> dict:
        name = method + "".join(f"-{k}{v}" for k, v in settings.items())
        data = run_experiment(out / "runs" / name, "quick", [seed], tasks, [p], [method], r,
                              with_settings(base, **settings), cache_dir, save_models=False, progress=progress)
        fin = [x for x in data["rows"] if x["stage"] == "finetuned"]
        aligned = [x for x in data["rows"] if x["stage"] == "aligned"]
        return {"settings": settings, **{k: mean_of([x[k] for x in fin]) for k in ("hs", "fa", "over_refusal")},
                "aligned_over_refusal": mean_of([x["over_refusal"] for x in aligned])}

    ref = measure("sft", {})
    fa_min = ref["fa"] - fa_margin
    or_max = ref["aligned_over_refusal"] + over_refusal_margin
    result = {"seed": seed, "p": p, "tasks": tasks, "steps": r.finetune_steps, "sft": ref,
              "rule": f"lowest HS with FA >= {fa_min:.1f} (SFT - {fa_margin:g}) and over-refusal <= {or_max:.1f} "
                      f"(aligned + {over_refusal_margin:g})", "candidates": {}, "chosen": {}}
    for method, cands in grid.items():
        rows = result["candidates"][method] = [measure(method, c) for c in cands]
        best = choose(rows, fa_min, or_max)
        if best is not None:
            result["chosen"][method] = best["settings"]
    chosen = {k: v for s in result["chosen"].values() for k, v in s.items()}
    result["flags"] = " ".join(f"--{k.replace('_', '-')} {f'{v:g}' if isinstance(v, float) else v}"
                               for k, v in chosen.items())  # the field sae_layer is the flag --sae-layer
    write_json_atomic(out / "selection.json", result)
    (out / "selection.md").write_text(selection_report(result))
    return result


def selection_report(res: dict) -> str:
    """selection.md: every candidate's dev HS / FA / over-refusal, the rule and the chosen settings."""
    L = [f"# Settings chosen on the dev seed {res['seed']} (p = {res['p']:g}, tasks {', '.join(res['tasks'])}, "
         f"{res['steps']} steps)", "",
         f"SFT on the dev seed: HS {res['sft']['hs']:.1f}, FA {res['sft']['fa']:.1f}, over-refusal "
         f"{res['sft']['over_refusal']:.1f} (aligned model: {res['sft']['aligned_over_refusal']:.1f}). "
         f"Rule: {res['rule']}. HS, FA, over-refusal: mean over tasks, %.", ""]
    for method, rows in res["candidates"].items():
        L += [f"## {method}", "", "| settings | HS | FA | over-refusal | allowed | chosen |",
              "|---|---|---|---|---|---|"]
        for x in rows:
            s = ", ".join(f"{k} {v}" for k, v in x["settings"].items())
            chosen = "**yes**" if res["chosen"].get(method) == x["settings"] else ""
            L.append(f"| {s} | {x['hs']:.1f} | {x['fa']:.1f} | {x['over_refusal']:.1f} | "
                     f"{'yes' if x['ok'] else 'no'} | {chosen} |")
        if method not in res["chosen"]:
            L.append(f"\nNo {method} candidate meets the rule: its settings stay the defaults.")
        notes = adaptation_notes([method])
        L += ["", *notes] if notes else []
        L.append("")
    L += ["The full experiment with these settings:", "", "```",
          f"python -m minicwac experiment --preset full {res['flags']}", "```", ""]
    return "\n".join(L)


# ---------------------------------------------------------------- python -m minicwac select


def add_arguments(p) -> None:
    from ..cli import harmful_ratio, positive_int
    p.add_argument("--seed", type=int, default=DEV_SEED, help=f"the dev seed (default {DEV_SEED})")
    p.add_argument("--tasks", nargs="+", choices=TASKS, default=None, help="default: every task")
    p.add_argument("--p", type=harmful_ratio, default=0.1, help="harmful ratio (default 0.1)")
    p.add_argument("--steps", type=positive_int, default=None, help="fine-tuning steps (default: the recipe's 100)")
    p.add_argument("--out", default="runs/select", help="output folder (default runs/select); a rerun resumes")
    p.add_argument("--cache", default=None, help="cache of base/aligned models and SAEs")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args) -> None:
    r = Recipe() if args.steps is None else Recipe(finetune_steps=args.steps)
    res = run_select(args.out, args.seed, args.tasks, args.p, r, cache_dir=args.cache, progress=not args.quiet)
    print(open(f"{args.out}/selection.md").read())
    print(f"wrote {args.out}/selection.json and selection.md; chosen: {res['flags'] or 'the defaults'}")
