"""`python -m minicwac demo`: the toy pipeline end to end: pretrain -> align -> plain SFT on one task at each
harmful ratio p; the table of HS, FA, over-refusal and refusal score, and every model as a Hugging Face folder."""
from __future__ import annotations

import time
from pathlib import Path

from ..core.files import prepare_out, write_json_atomic
from ..io.hf import save_pretrained
from ..tools.report import clean_nan, plot_pipeline, results_table, row
from .evals import evaluate
from .pipeline import Recipe, finetune, toy_models
from .world import TASKS, check_p, check_task


def run_demo(out: str | Path = "runs/demo", seed: int = 0, task: str = "sentiment", ps=(0.0, 0.1),
             recipe: Recipe | None = None, cache_dir: str | Path | None = None, progress: bool = True) -> list[dict]:
    """Pretrain -> align -> SFT on `task` at each p; writes results.json, results.md, pipeline.png, models/."""
    task, ps = check_task(task), [check_p(p) for p in ps]
    out = prepare_out(out)
    r = recipe or Recipe()
    t0 = time.time()
    toy = toy_models(seed, r, cache_dir, progress=progress)
    rows = []
    for stage, model in (("base", toy.base), ("aligned", toy.aligned)):
        rows.append(row(stage, "none", task, None, seed, evaluate(model, toy.tok, toy.world, task)))
        save_pretrained(model, toy.tok, out / "models" / stage)
    for p in ps:
        model, _ = finetune(toy.aligned, toy.world, toy.tok, task, p, r, seed, progress=progress)
        rows.append(row("finetuned", "sft", task, p, seed, evaluate(model, toy.tok, toy.world, task)))
        save_pretrained(model, toy.tok, out / "models" / f"sft-{task}-p{p:g}-s{seed}")
    rows = [{k: clean_nan(v) for k, v in r_.items()} for r_ in rows]
    write_json_atomic(out / "results.json", {"rows": rows, "recipe": r.__dict__, "wall_s": round(time.time() - t0, 1)})
    (out / "results.md").write_text(results_table(rows) + "\n")
    plot_pipeline(rows, out / "pipeline.png")
    return rows


def add_arguments(p) -> None:
    from ..cli import harmful_ratio
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--task", default="sentiment", choices=TASKS)
    p.add_argument("--p", type=harmful_ratio, nargs="+", default=[0.0, 0.1], help="harmful ratios (default 0 0.1)")
    p.add_argument("--cache", default=None,
                   help="cache of base/aligned models (default: $MINICWAC_CACHE or runs/cache)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args) -> None:
    rows = run_demo(args.out, args.seed, args.task, args.p, cache_dir=args.cache, progress=not args.quiet)
    print(results_table(rows))
    print(f"wrote {args.out}/results.json, results.md, pipeline.png and models/")
