"""Experiments on the toy world: the demo (pretrain -> align -> SFT at several p) and the method grid (methods x
tasks x p x seeds with the constraints and the baselines), resumable and mergeable. The tables and plots are
`report.py`'s; choosing the settings on a dev seed is `select.py`."""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..core.baselines import AsFTPenalty, alignment_projectors, safeinstr_mix, safelora_project_
from ..core.cwac import finetune_cwac
from ..core.data import encode_docs, mix_by_tokens, shared_prefix
from ..core.drift import AUTO_SHARE, probe_targets
from ..core.evals import harmful_score, prompt_ids
from ..core.features import (READOUTS, check_sae_layer, mean_diff_directions, safety_features, score_latents,
                             select_latents)
from ..core.files import prepare_out, write_json_atomic
from ..core.sae import SAE, ce_recovered, harvest, sae_metrics, train_sae
from ..core.subspace import ALL_LINEARS, DEFAULT_TARGETS, compute_subspace, target_names
from ..hf import save_pretrained
from ..report import _clean, plot_pipeline, results_table, row, run_name, write_results
from ..model import GPT
from .evals import evaluate
from .pipeline import Recipe, Toy, clone, encode_chats, finetune, toy_models
from .world import TASKS, Example


def check_p(p: float) -> float:
    if not (isinstance(p, (int, float)) and 0.0 <= p <= 1.0):
        raise ValueError(f"harmful ratio p={p} is outside [0, 1]")
    return float(p)


def check_task(task: str) -> str:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    return task


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


# ================================================================ the method experiment: methods x tasks x p x seeds


@dataclass
class SafetyRecipe:
    """Every choice of the constraints and baselines on the toy world; [paper] and [ours] as in the method notes,
    docs/method.md#9-choices-where-the-paper-is-silent."""

    energy: float = 0.99  # subspace rank: share of trace(C) kept
    targets: tuple = DEFAULT_TARGETS  # weight targets (regex on module names); ALL_LINEARS for every linear
    sae_layer: int | None = None  # residual stream after this many blocks (default: the middle)
    d_sae: int = 1024  # 8 x hidden
    sae_k: int = 16
    sae_steps: int = 2000
    sae_lr: float = 1e-3
    m: int | str = 100  # selected latents ([paper]: 100), or "firing"
    score: str = "harmful"  # latent score: mean post-TopK value on harmful prompts, or "contrast"
    readout: str = "pre"  # what L_safety compares: pre-TopK values ("pre"), "post", "directions", "residual"
    lam: float = 0.5  # [paper]
    skip_prefix: bool = False  # calibrate and constrain without the token prefix every calibration prompt shares
    safety_batch: int = 16  # harmful prompts per step for L_safety
    safeinstr_frac: float = 0.1  # share of refusal examples mixed in
    asft_lam: float = 1.0
    safelora_threshold: float = 0.5
    safelora_share: float = 10 / 64  # "safelora-qv": the share of its targets projected (its authors' 10 of 64)
    eval_every: int = 10  # drift curve: HS on every third held-out harmful prompt, every this many steps
    probe_steps: int = 25  # "*-auto": SFT steps of the probe that chooses the weight targets (a quarter of 100)
    auto_share: float = AUTO_SHARE  # "*-auto": the kinds covering this share of the probe's dW h0

    def key(self) -> str:
        keep = ("sae_layer", "d_sae", "sae_k", "sae_steps", "sae_lr")  # what the SAE depends on
        d = {k: v for k, v in asdict(self).items() if k in keep}
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=list).encode()).hexdigest()[:10]


QV = (r"model\.layers\.\d+\.self_attn\.(q|v)_proj",)  # the LoRA targets of AsFT's and SafeLoRA's papers

# method name -> switches. "activation-*"/"cwac-*" variants change the readout, "*-all" the weight targets,
# "*-avg" averages L_safety over the latents instead of summing (lam / m).
METHOD_SWITCHES = {
    "sft": {}, "weight": {"weight": True}, "activation": {"act": True}, "cwac": {"weight": True, "act": True},
    "safeinstr": {"safeinstr": True}, "asft": {"asft": True}, "safelora": {"safelora": True},
    "weight-all": {"weight": True, "targets": ALL_LINEARS}, "cwac-all": {"weight": True, "act": True, "targets": ALL_LINEARS},
    # "*-auto": the module kinds a short SFT probe on the run's own data lets the most drift through (`probe_targets`)
    "weight-auto": {"weight": True, "targets": ALL_LINEARS, "auto": True},
    "cwac-auto": {"weight": True, "act": True, "targets": ALL_LINEARS, "auto": True},
    "weight-gradonly": {"weight": True, "grad_only": True},
    "activation-post": {"act": True, "readout": "post"}, "cwac-post": {"weight": True, "act": True, "readout": "post"},
    "activation-dirs": {"act": True, "readout": "directions"},
    "cwac-dirs": {"weight": True, "act": True, "readout": "directions"},
    "activation-residual": {"act": True, "readout": "residual"},
    "activation-avg": {"act": True, "avg": True}, "cwac-avg": {"weight": True, "act": True, "avg": True},
    # the baselines as their authors wrote them, except that their LoRA adapters on q/v are full dW on q/v: the AsFT
    # penalty and the SafeLoRA projection (core/baselines.py) act on a module's full weight, not on core/lora.py's
    # adapters, and the reported -qv numbers were made this way (docs/method.md#6-baselines)
    "safeinstr-add": {"safeinstr": "add"}, "asft-qv": {"asft": True, "only": QV},
    "safelora-qv": {"safelora": "number", "only": QV},
}
MAIN_METHODS = ("sft", "weight", "activation", "cwac", "safeinstr", "asft", "safelora")
PRESETS = {
    "quick": {"seeds": [0], "tasks": ["sentiment"], "ps": [0.1], "methods": list(MAIN_METHODS)},
    "full": {"seeds": [0, 1, 2], "tasks": list(TASKS), "ps": [0.0, 0.05, 0.1, 0.2, 0.5],
             "methods": list(MAIN_METHODS) + ["weight-all", "cwac-all", "safeinstr-add", "asft-qv", "safelora-qv"]},
}


def method_targets(method: str, sr: SafetyRecipe) -> tuple:
    """The weight targets of a method: the "*-all" methods constrain every linear, the others `sr.targets`."""
    return tuple(METHOD_SWITCHES[method].get("targets", sr.targets))


@dataclass
class ToySafety:
    """What the constraints need, computed once per seed on the aligned model from the calibration set."""

    subspaces: dict  # targets tuple -> Subspace
    sae: SAE
    sae_report: dict
    features: dict  # readout -> SafetyFeatures
    align_C: dict  # AsFT / SafeLoRA alignment matrices
    refusals: list  # SafeInstr's refusal examples (encoded)


def _calib_seqs(toy: Toy) -> tuple[list, list]:
    tok = toy.tok
    return ([prompt_ids(tok, e.prompt) for e in toy.world.calibration],
            [prompt_ids(tok, e.prompt) for e in toy.world.calibration_harmless])


def sae_corpus(toy: Toy, r: Recipe, harmful_frac: float = 0.7, seed: int = 0) -> list[list[int]]:
    """Token sequences for the SAE: ~70% of tokens from harmful text (the alignment split's harmful chats and the
    calibration prompts), ~30% generic (pretraining documents, harmless chats). Never attack or eval prompts."""
    w, tok = toy.world, toy.tok
    return sae_mix(tok, w.align, _calib_seqs(toy)[0], w.pretrain_docs, r.max_len, harmful_frac, seed)


def sae_mix(tok, align: list[Example], calib: list[list[int]], docs: list[str], max_len: int, harmful_frac: float,
            seed: int) -> list[list[int]]:
    """The SAE's data from an alignment set, calibration prompts and documents (toy world and real checkpoints)."""
    harm = [s for s, _ in encode_chats(tok, [e for e in align if e.kind == "harmful"], max_len)] + calib
    gen = [s for s, _ in encode_docs(tok, docs, max_len)]
    gen += [s for s, _ in encode_chats(tok, [e for e in align if e.kind != "harmful"], max_len)]
    return mix_by_tokens(harm, gen, harmful_frac, seed)


def toy_safety(toy: Toy, r: Recipe, sr: SafetyRecipe, seed: int, progress: bool = True,
               targets_needed=(DEFAULT_TARGETS,), with_align_C: bool = True) -> ToySafety:
    """Subspaces, SAE (cached beside the toy models), selected features with z0, alignment matrices (AsFT and
    SafeLoRA; with_align_C=False skips them), refusals."""
    tok, model = toy.tok, toy.aligned
    skip = [tok.bos_token_id]
    calib, calib_harmless = _calib_seqs(toy)
    pre = shared_prefix(calib) if sr.skip_prefix else 0  # e.g. a chat template's system line
    subspaces = {t: compute_subspace(model, calib, tok.pad_token_id, patterns=t, energy=sr.energy, skip_ids=skip,
                                     skip_prefix=pre, model_folder=str(toy.folder / "aligned")) for t in targets_needed}
    layer = check_sae_layer(sr.sae_layer, model.config.num_hidden_layers)
    folder = toy.folder / f"sae-{sr.key()}"
    if (folder / "cfg.json").is_file():
        sae = SAE.load(folder)
        report = json.loads((folder / "cfg.json").read_text())["report"]
    else:
        seqs = sae_corpus(toy, r, seed=seed)
        n_test = len(seqs) // 10
        x_train = harvest(model, seqs[n_test:], layer, tok.pad_token_id, skip)
        x_test = harvest(model, seqs[:n_test], layer, tok.pad_token_id, skip)
        sae, hist = train_sae(x_train, sr.d_sae, sr.sae_k, layer, steps=sr.sae_steps, lr=sr.sae_lr, seed=seed,
                              progress=progress)
        met = sae_metrics(sae, x_test)
        ce = ce_recovered(model, sae, seqs[:n_test], tok.pad_token_id)
        report = {"held_out_tokens": len(x_test), "train_tokens": len(x_train), "l0": met["l0"], "fvu": met["fvu"],
                  "dead_fraction": met["dead_fraction"],  # never fired on the held-out tokens
                  # the field's definition: not fired in the last cfg.dead_tokens training tokens
                  "dead_fraction_train": hist["dead_fraction"][-1] if hist["dead_fraction"] else None,
                  "ce_clean": ce["clean"], "ce_sae": ce["sae"],
                  "ce_zero": ce["zero"], "ce_recovered": ce["recovered"], "history": hist}
        sae.save(folder, extra={"report": report})
        sae = SAE.load(folder)  # the folded SAE: exactly what a user loads later
    scores = score_latents(model, sae, calib, calib_harmless, tok.pad_token_id, skip, how=sr.score, skip_prefix=pre)
    idx = select_latents(scores, sr.m)
    groups = {}
    for e, s in zip(toy.world.calibration, calib):
        groups.setdefault(e.category, []).append(s)
    dirs = mean_diff_directions(model, layer, list(groups.values()), calib_harmless, tok.pad_token_id, skip, pre)
    feats = {ro: safety_features(model, calib, tok.pad_token_id, readout=ro, sae=sae, idx=idx, directions=dirs,
                                 layer=layer, skip_ids=skip, skip_prefix=pre) for ro in READOUTS}
    refusals = encode_chats(tok, [e for e in toy.world.align if e.kind == "harmful"], r.max_len)
    align_C = alignment_projectors(toy.base, model, ALL_LINEARS) if with_align_C else {}
    return ToySafety(subspaces, sae, report, feats, align_C, refusals)


def run_method(method: str, toy: Toy, safety: ToySafety, task: str, p: float, seed: int, r: Recipe,
               sr: SafetyRecipe, progress: bool = True) -> tuple[GPT, dict]:
    """Fine-tune a copy of the aligned model on `task` at harmful ratio p with `method`; returns (model, history)."""
    if method not in METHOD_SWITCHES:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHOD_SWITCHES)}")
    sw = METHOD_SWITCHES[method]
    w, tok = toy.world, toy.tok
    model = clone(toy.aligned)
    align_C = safety.align_C
    if sw.get("only"):  # train these weights only (where the paper trains LoRA adapters); the baseline acts on them
        keep = set(target_names(model, sw["only"]))
        for n, mod in model.named_modules():
            for prm in mod.parameters(recurse=False):
                prm.requires_grad_(n in keep)
        align_C = {n: C for n, C in align_C.items() if n in keep}
    seqs = encode_chats(tok, w.finetune_set(task, p, r.finetune_n, seed), r.max_len)
    if sw.get("safeinstr"):
        mode = "add" if sw["safeinstr"] == "add" else "replace"
        seqs = safeinstr_mix(seqs, safety.refusals, sr.safeinstr_frac, seed, mode)
    subspace = safety.subspaces[method_targets(method, sr)] if sw.get("weight") else None
    auto = None
    if sw.get("auto"):  # the drift map is read on the calibration prompts, never on the evaluation ones
        auto = probe_targets(toy.aligned, seqs, _calib_seqs(toy)[0], tok.pad_token_id, skip_ids=[tok.bos_token_id],
                             steps=sr.probe_steps, lr=r.finetune_lr, batch_size=r.finetune_batch, seed=seed + 3,
                             share=sr.auto_share)
        subspace = subspace.matching(auto["patterns"])
    features = safety.features[sw.get("readout", sr.readout)] if sw.get("act") else None
    lam = sr.lam / features.m if features is not None and sw.get("avg") else sr.lam
    penalty = None
    if sw.get("asft"):
        penalty = AsFTPenalty(toy.aligned, align_C, sr.asft_lam)
    eval_prompts = [e.prompt for e in w.eval_harmful[::3]]

    def curve(m):
        return harmful_score(m, tok, eval_prompts, 24)

    hist = finetune_cwac(model, seqs, steps=r.finetune_steps, batch_size=r.finetune_batch, lr=r.finetune_lr,
                         pad_id=tok.pad_token_id, subspace=subspace, features=features, lam=lam,
                         safety_batch=sr.safety_batch, project_grad=bool(sw.get("grad_only")),
                         project_update=not sw.get("grad_only"), penalty=penalty, seed=seed + 2, eval_every=sr.eval_every,
                         eval_fn=curve if sr.eval_every else None, desc=f"{method} {task} p={p:g}", progress=progress)
    if sw.get("safelora"):
        n = max(1, round(sr.safelora_share * len(align_C))) if sw["safelora"] == "number" else None
        hist["safelora_cos"] = safelora_project_(model, toy.aligned, align_C, sr.safelora_threshold, n)
    if auto is not None:
        hist["auto"] = auto
    return model, hist


def run_experiment(out: str | Path = "runs/experiment", preset: str = "quick", seeds=None, tasks=None, ps=None,
                   methods=None, recipe: Recipe | None = None, safety: SafetyRecipe | None = None,
                   cache_dir: str | Path | None = None, save_models: bool = True, progress: bool = True) -> dict:
    """methods x tasks x p x seeds on the toy world. Writes results.json after every run (a rerun with the same
    settings resumes), results.md, hs_vs_p.png, fa_vs_hs.png, drift.png, models/, subspace/ and sae/."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {', '.join(PRESETS)}")
    pre = PRESETS[preset]
    seeds = list(pre["seeds"] if seeds is None else seeds)
    tasks = [check_task(t) for t in (pre["tasks"] if tasks is None else tasks)]
    ps = [check_p(p) for p in (pre["ps"] if ps is None else ps)]
    methods = list(pre["methods"] if methods is None else methods)
    bad = [m for m in methods if m not in METHOD_SWITCHES]
    if bad:
        raise ValueError(f"unknown method {bad[0]!r}; expected one of {', '.join(METHOD_SWITCHES)}")
    r, sr = recipe or Recipe(), safety or SafetyRecipe()
    out = prepare_out(out)
    settings = {"recipe": asdict(r), "safety": asdict(sr)}
    res_path = out / "results.json"
    data = {"settings": json.loads(json.dumps(settings, default=list)), "rows": [], "curves": {}, "safety": {},
            "wall_s": 0.0}
    if res_path.is_file():
        old = json.loads(res_path.read_text())
        if old.get("settings") != data["settings"]:
            raise ValueError(f"{res_path} holds results of other settings; choose another --out")
        data = old
    done = {(x["method"], x["task"], x["p"], x["seed"]) for x in data["rows"] if x["stage"] == "finetuned"}
    t0 = time.time() - data["wall_s"]
    need_targets = tuple(dict.fromkeys(method_targets(m, sr) for m in methods))
    for seed in seeds:
        todo = [(m, t, p) for t in tasks for p in ps for m in methods if (m, t, p, seed) not in done]
        if not todo:
            continue
        toy = toy_models(seed, r, cache_dir, progress=progress)
        saf = toy_safety(toy, r, sr, seed, progress, need_targets)
        saf.subspaces[tuple(sr.targets) if tuple(sr.targets) in saf.subspaces else need_targets[0]].save(
            out / "subspace" / f"s{seed}")
        saf.sae.save(out / "sae" / f"s{seed}", extra={"report": saf.sae_report})
        data["safety"][str(seed)] = {"sae": {k: v for k, v in saf.sae_report.items() if k != "history"},
                                     "ranks": {str(list(t)): s.cfg["ranks"] for t, s in saf.subspaces.items()},
                                     "n_features": saf.features[sr.readout].m}
        for task in tasks:
            if not any(x["stage"] == "aligned" and x["task"] == task and x["seed"] == seed for x in data["rows"]):
                data["rows"].append(row("aligned", "none", task, None, seed, evaluate(toy.aligned, toy.tok, toy.world, task)))
        for method, task, p in todo:
            model, hist = run_method(method, toy, saf, task, p, seed, r, sr, progress)
            ev = evaluate(model, toy.tok, toy.world, task)
            data["rows"].append({k: _clean(v) for k, v in row("finetuned", method, task, p, seed, ev).items()})
            data["curves"][run_name(method, task, p, seed)] = hist["curve"]
            if "auto" in hist:  # the probe's choice and its drift map
                data.setdefault("auto", {})[run_name(method, task, p, seed)] = hist["auto"]
            if save_models:
                save_pretrained(model, toy.tok, out / "models" / run_name(method, task, p, seed))
            data["wall_s"] = round(time.time() - t0, 1)
            write_json_atomic(res_path, data)
    data["wall_s"] = round(time.time() - t0, 1)
    write_results(out, data)
    return data


RESULTS_KEYS = {"settings": dict, "rows": list, "curves": dict, "safety": dict, "wall_s": (int, float)}
ROW_KEYS = ("stage", "method", "task", "p", "seed")


def _read_results(path: Path) -> dict:
    """An experiment's results.json, checked for what `merge_results` reads; every error names the file."""
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise ValueError(f"{path} is not valid JSON ({type(e).__name__}); expected a results.json written by "
                         "experiment") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path} holds {type(d).__name__}, expected the object experiment writes")
    for k, kind in RESULTS_KEYS.items():
        if not isinstance(d.get(k), kind):
            raise ValueError(f"{path}: {k!r} is missing or not a {getattr(kind, '__name__', 'number')}; expected "
                             "a results.json written by experiment")
    for i, r in enumerate(d["rows"]):
        if not isinstance(r, dict) or any(k not in r for k in ROW_KEYS):
            raise ValueError(f"{path}: row {i} lacks one of {', '.join(ROW_KEYS)}")
    return d


def merge_results(srcs: list[str | Path], out: str | Path) -> dict:
    """One results folder from several `experiment` folders with the same settings (e.g. methods or seeds run in
    parallel processes): rows, drift curves and per-seed safety reports are joined, results.json, results.md and
    the plots written to `out`. Models stay where they are. A run found twice must have the same result."""
    if not srcs:
        raise ValueError("nothing to merge; expected one or more folders written by experiment")
    datas = []
    for src in srcs:
        path = Path(src) / "results.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found; expected a folder written by experiment")
        datas.append(_read_results(path))
        if datas[-1].get("settings") != datas[0].get("settings"):
            raise ValueError(f"{src} holds results of other settings than {srcs[0]}; only runs with the same "
                             "settings can be merged")
    merged = {"settings": datas[0]["settings"], "rows": [], "curves": {}, "safety": {},
              "wall_s": round(sum(d["wall_s"] for d in datas), 1), "parts": len(datas)}
    seen = {}
    for src, d in zip(srcs, datas):
        for x in d["rows"]:
            key = (x["stage"], x["method"], x["task"], x["p"], x["seed"])
            if key not in seen:
                seen[key] = x
                merged["rows"].append(x)
            elif x["stage"] == "finetuned" and x != seen[key]:  # the aligned model's row is re-measured per part
                raise ValueError(f"{src} has another result for the run {run_name(*key[1:])}")
        merged["curves"].update(d["curves"])
        merged["safety"].update(d["safety"])
        if d.get("auto"):
            merged.setdefault("auto", {}).update(d["auto"])
    write_results(prepare_out(out), merged)
    return merged




