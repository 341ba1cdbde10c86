"""Experiments that write results: the toy demo (pretrain -> align -> SFT at several p), its table and plot.

Every result is a row of results.json:
{"stage": "base|aligned|finetuned", "method": "none|sft|...", "task": ..., "p": ..., "seed": ..., "hs": ...,
 "comply": ..., "fa": ..., "over_refusal": ..., "refusal_score": ..., "n_harmful": ...}
with hs, comply, fa and over_refusal in percent.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

from .evals import evaluate
from .hf import save_pretrained
from .pipeline import Recipe, finetune, toy_models
from .world import TASKS

ROW_KEYS = ("stage", "method", "task", "p", "seed", "hs", "comply", "fa", "over_refusal", "refusal_score",
            "n_harmful")


def prepare_out(out: str | Path) -> Path:
    """Create the output folder and check it is writable, before any long computation starts."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise OSError(f"output folder {out} is not writable ({e.strerror or e}); choose another with --out") from None
    return out


def check_p(p: float) -> float:
    if not (isinstance(p, (int, float)) and 0.0 <= p <= 1.0):
        raise ValueError(f"harmful ratio p={p} is outside [0, 1]")
    return float(p)


def check_task(task: str) -> str:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    return task


def row(stage: str, method: str, task: str, p: float | None, seed: int, ev: dict) -> dict:
    return {"stage": stage, "method": method, "task": task, "p": p, "seed": seed,
            **{k: ev[k] for k in ROW_KEYS[5:]}}


def write_json_atomic(path: Path, obj) -> None:
    """Write JSON to a temporary file and rename it, so a crash never leaves a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, allow_nan=False, default=lambda x: None))
    tmp.replace(path)


def _clean(v):
    return None if isinstance(v, float) and math.isnan(v) else v


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
    rows = [{k: _clean(v) for k, v in r_.items()} for r_ in rows]
    write_json_atomic(out / "results.json", {"rows": rows, "recipe": r.__dict__, "wall_s": round(time.time() - t0, 1)})
    (out / "results.md").write_text(results_table(rows) + "\n")
    plot_pipeline(rows, out / "pipeline.png")
    return rows


def results_table(rows: list[dict]) -> str:
    """A markdown table of the rows (one line per model)."""
    def f(v):
        return "-" if v is None else (f"{v:.1f}" if isinstance(v, float) else str(v))

    head = "| stage | method | task | p | seed | HS % | comply % | FA % | over-refusal % | refusal score |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append("| " + " | ".join(f(r[k]) for k in ROW_KEYS[:-1]) + " |")
    return "\n".join(lines)


def plot_pipeline(rows: list[dict], path: str | Path) -> None:
    """HS, compliance and FA for each model of the pipeline, as grouped bars."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["stage"] if r["stage"] != "finetuned" else f"{r['method']} p={r['p']:g}" for r in rows]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    w = 0.27
    for j, (key, label) in enumerate((("hs", "HS"), ("comply", "compliance"), ("fa", "FA"))):
        vals = [r[key] if r[key] is not None else 0.0 for r in rows]
        ax.bar([i + (j - 1) * w for i in range(len(rows))], vals, w, label=label)
    ax.set_xticks(range(len(rows)), names)
    ax.set_ylabel("%")
    ax.set_ylim(0, 105)
    ax.set_title(f"toy pipeline, task {rows[0]['task']}, seed {rows[0]['seed']}")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
