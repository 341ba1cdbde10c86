"""The method experiment on the toy world: methods x tasks x p x seeds with the constraints and the baselines,
resumable (`merge.py` joins parts run side by side). Each seed calibrates one kit (`kit.calibrate`, the same path
as a real model's) and runs every method from it; the tables and plots are `tools/report.py`'s, choosing the
settings on a dev seed is `select.py`."""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from ..core.baselines import AsFTPenalty, alignment_projectors, safeinstr_mix, safelora_project_
from ..core.cwac import Constraints, Schedule, finetune_cwac
from ..core.data import encode_docs, mix_by_tokens
from ..core.drift import probe_targets
from ..core.evals import harmful_score, judge_name, prompt_ids
from ..core.features import READOUTS, mean_diff_directions, safety_features
from ..core.files import prepare_out, write_json_atomic
from ..core.settings import (SEED_FINETUNE, SEED_PROBE, TARGETS, BaselineSettings, KitSettings, method,
                             methods_for)
from ..core.subspace import target_names
from ..io.hf import save_pretrained
from ..io.model import GPT
from ..kit.calibration import Kit, calibrate
from ..tools.report import clean_nan, row, run_name, write_results
from .evals import evaluate
from .pipeline import Recipe, Toy, clone, encode_chats, toy_models
from .world import TASKS, Example, check_p, check_task


def toy_kit_settings() -> KitSettings:
    """The constraint settings on the toy model: the kit's, with a smaller SAE L0 (16 of 1024 latents), latents
    scored on harmful prompts only, and a probe of a quarter of the 100 fine-tuning steps."""
    return KitSettings(sae_k=16, score="harmful", probe_steps=25)  # everything else: the kit's defaults


# CWAC's settings on the toy model as the committed rule chose them on the dev worlds (docs/results.md, "Choosing
# the defaults"; the record: docs/results/select-toy.json), for the method cwac-all (every linear): `experiment`
# runs them unless --paper. The paper's are KitSettings' own defaults (lambda 0.5, the top 100 latents).
TOY_CHOSEN = {"lam": 2.0, "m": "firing"}


@dataclass
class SafetyRecipe:
    """The toy runs' constraint and baseline settings (declared in `core.settings`) and the drift curve's period.
    Its defaults are the paper's lambda and latents (the notebooks teach the method at them); `experiment` puts
    TOY_CHOSEN over them unless it is given --paper."""

    kit: KitSettings = field(default_factory=toy_kit_settings)  # the toy's constraint settings
    baselines: BaselineSettings = field(default_factory=BaselineSettings)  # the baselines' strengths, their defaults
    eval_every: int = 10  # drift curve: HS on every third held-out harmful prompt, every this many steps (0: none)

    def key(self) -> str:
        """The SAE cache's key: what the SAE depends on."""
        # the SAE's own hyper-parameters and its training mix; the seed is part of the toy folder's name
        keep = ("sae_layer", "sae_depth", "d_sae", "sae_k", "sae_steps", "sae_lr", "harmful_frac")
        d = {k: getattr(self.kit, k) for k in keep}
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=list).encode()).hexdigest()[:10]


def with_settings(safety_recipe: SafetyRecipe, **changes) -> SafetyRecipe:
    """`safety_recipe` with some of its kit's and baselines' fields changed, each named by its own field name."""
    kit = {f.name for f in fields(KitSettings)}
    unknown = [k for k in changes if k not in kit and k not in {f.name for f in fields(BaselineSettings)}]
    if unknown:
        raise ValueError(f"unknown setting {unknown[0]!r}; expected a field of KitSettings or BaselineSettings")
    kit_changes = {k: v for k, v in changes.items() if k in kit}  # each change goes to the dataclass that declares it
    base_changes = {k: v for k, v in changes.items() if k not in kit}
    # .check(): a changed value out of range is refused here, before any run
    return replace(safety_recipe, kit=replace(safety_recipe.kit, **kit_changes).check(),
                   baselines=replace(safety_recipe.baselines, **base_changes).check())


# the main table's rows: CWAC, its two halves, plain SFT and the three baselines
MAIN_METHODS = ("sft", "weight", "activation", "cwac", "safeinstr", "asft", "safelora")
# quick: one run per method, a smoke test; full: the grid docs/results.md reports
PRESETS = {
    "quick": {"seeds": [0], "tasks": ["sentiment"], "ps": [0.1], "methods": list(MAIN_METHODS)},
    "full": {"seeds": [0, 1, 2], "tasks": list(TASKS), "ps": [0.0, 0.05, 0.1, 0.2, 0.5],
             "methods": list(MAIN_METHODS) + ["weight-all", "cwac-all", "safeinstr-add", "asft-qv", "safelora-qv"]},
}


@dataclass
class ToySafety:
    """What the constraints need, computed once per seed on the aligned model from the calibration set."""

    kit: Kit  # the subspace of every target the runs need, the SAE, the safety latents and z0 (readout "pre")
    features: dict  # readout -> SafetyFeatures (the readout ablations; "pre" is the kit's own)
    align_C: dict  # AsFT / SafeLoRA alignment matrices
    refusals: list  # SafeInstr's refusal examples (encoded)

    @property
    def sae(self):
        return self.kit.features.sae

    @property
    def sae_report(self) -> dict:
        return self.kit.report["sae"]

    def subspace(self, name: str = "cwac"):
        """The subspace the method `name` constrains (None for a method without the weight constraint)."""
        return self.kit.constraint(name, "toy")[0]  # [0]: the subspace ([1] would be the features)


def calib_seqs(toy: Toy) -> tuple[list, list]:
    """The calibration split's harmful and harmless prompts, as token ids."""
    tok = toy.tok
    # the calibration split: never attacked, never evaluated on
    return ([prompt_ids(tok, e.prompt) for e in toy.world.calibration],
            [prompt_ids(tok, e.prompt) for e in toy.world.calibration_harmless])


def sae_corpus(toy: Toy, r: Recipe, harmful_frac: float = 0.7, seed: int = 0) -> list[list[int]]:
    """Token sequences for the SAE: ~70% of tokens from harmful text (the alignment split's harmful chats and the
    calibration prompts), ~30% generic (pretraining documents, harmless chats). Never attack or eval prompts."""
    w, tok = toy.world, toy.tok
    return sae_mix(tok, w.align, calib_seqs(toy)[0], w.pretrain_docs, r.max_len, harmful_frac, seed)


def sae_mix(tok, align: list[Example], calib: list[list[int]], docs: list[str], max_len: int, harmful_frac: float,
            seed: int) -> list[list[int]]:
    """The SAE's data from an alignment set, calibration prompts and documents (toy world and real checkpoints)."""
    # harmful: the alignment set's harmful chats (requests with refusals) and the calibration prompts
    harm = [s for s, _ in encode_chats(tok, [e for e in align if e.kind == "harmful"], max_len)] + calib
    gen = [s for s, _ in encode_docs(tok, docs, max_len)]  # generic: pretraining documents ...
    # ... and the alignment set's harmless chats
    gen += [s for s, _ in encode_chats(tok, [e for e in align if e.kind != "harmful"], max_len)]
    return mix_by_tokens(harm, gen, harmful_frac, seed)


def toy_safety(toy: Toy, r: Recipe, safety_recipe: SafetyRecipe, seed: int, progress: bool = True,
               targets: str = "down_proj", with_align_C: bool = True) -> ToySafety:
    """The seed's kit (`kit.calibrate` on the calibration split, its SAE cached beside the toy models; `targets`:
    "down_proj", or "all" for the "-all" and "-auto" methods), the latents' other readouts, the alignment matrices
    (AsFT and SafeLoRA; with_align_C=False skips them) and SafeInstr's refusals."""
    tok, model = toy.tok, toy.aligned
    # auto's probe trains on each run's own fine-tuning data: the choice cannot be made once per seed
    if safety_recipe.kit.targets == "auto":
        raise ValueError("the toy runs choose the auto targets per run: use the methods weight-auto or cwac-auto")
    wide = "all" in (targets, safety_recipe.kit.targets)  # one kit of every linear serves the down_proj methods too
    # the kit's seed is the run's: the SAE and its data mix differ from seed to seed
    s = replace(safety_recipe.kit, targets="all" if wide else "down_proj", seed=seed)
    w = toy.world
    # the path a real model's calibration takes, on the toy's calibration split; the SAE's data is the toy's own
    # mix (`sae_corpus`), its SAE cached beside the toy models
    kit = calibrate(model, tok, [e.prompt for e in w.calibration], [e.prompt for e in w.calibration_harmless],
                    settings=s, max_len=r.max_len, sae_seqs=sae_corpus(toy, r, s.harmful_frac, seed),
                    sae_folder=toy.folder / f"sae-{safety_recipe.key()}", progress=progress)
    calib, calib_harmless = calib_seqs(toy)
    # BOS left out as in the kit; the prefix length it measured
    skip, pre = [tok.bos_token_id], kit.report["skip_prefix_tokens"]
    groups = {}  # the "directions" readout: one difference-of-means direction per harm category
    for e, ids in zip(w.calibration, calib):
        groups.setdefault(e.category, []).append(ids)  # the prompts' ids grouped by harm category
    # every readout reads the kit's layer; pre and post use its latents
    layer, sae, idx = kit.features.layer, kit.features.sae, kit.features.idx
    # (hidden, n_categories): unit directions, each category's mean minus the harmless mean, at the SAE's layer
    dirs = mean_diff_directions(model, layer, list(groups.values()), calib_harmless, tok.pad_token_id, skip, pre)
    # one SafetyFeatures per readout, z0 read on the same prompts; "pre" is the kit's own
    feats = {ro: kit.features if ro == "pre" else
             safety_features(model, calib, tok.pad_token_id, readout=ro, sae=sae, idx=idx, directions=dirs,
                             layer=layer, skip_ids=skip, skip_prefix=pre) for ro in READOUTS}
    # SafeInstr's data: the alignment set's harmful requests with their refusals
    refusals = encode_chats(tok, [e for e in w.align if e.kind == "harmful"], r.max_len)
    # name -> C (out, out) for every linear, for AsFT and SafeLoRA
    align_C = alignment_projectors(toy.base, model, TARGETS["all"]) if with_align_C else {}
    return ToySafety(kit, feats, align_C, refusals)


def run_method(name: str, toy: Toy, safety: ToySafety, task: str, p: float, seed: int, r: Recipe,
               safety_recipe: SafetyRecipe, progress: bool = True, judge=None) -> tuple[GPT, dict]:
    """Fine-tune a copy of the aligned model on `task` at harmful ratio p with the method `name` (its row of
    `core.settings.METHODS`); returns (model, history)."""
    m = method(name, "toy")  # the method's row of the table
    w, tok = toy.world, toy.tok
    model = clone(toy.aligned)  # a fresh copy: every method starts from the same aligned weights
    align_C = safety.align_C
    if m.only:  # train these weights only (where the paper trains LoRA adapters); the baseline acts on them
        keep = set(target_names(model, TARGETS[m.only]))  # e.g. every q_proj and v_proj
        for n, mod in model.named_modules():
            for prm in mod.parameters(recurse=False):
                prm.requires_grad_(n in keep)  # weight and bias of a kept linear train; everything else is frozen
        align_C = {n: C for n, C in align_C.items() if n in keep}  # the baseline acts on the trained layers only
    # round(p * n) harmful -> compliant pairs among the task's examples
    seqs = encode_chats(tok, w.finetune_set(task, p, r.finetune_n, seed), r.max_len)
    if m.baseline in ("safeinstr", "safeinstr-add"):
        # add: its authors' form; replace: the set keeps its size
        mode = "add" if m.baseline == "safeinstr-add" else "replace"
        seqs = safeinstr_mix(seqs, safety.refusals, safety_recipe.baselines.safeinstr_frac, seed, mode)
    kit = safety.kit
    if m.weight == "auto":  # the drift map is read on the calibration prompts, never on the evaluation ones
        auto = probe_targets(toy.aligned, seqs, calib_seqs(toy)[0], tok.pad_token_id, skip_ids=[tok.bos_token_id],
                             steps=safety_recipe.kit.probe_steps, lr=r.finetune_lr, batch_size=r.finetune_batch,
                             seed=seed + SEED_PROBE, share=safety_recipe.kit.auto_share)
        # a copy of the kit with this run's choice; the seed's kit is left as it was
        kit = replace(kit, report={**kit.report, "auto": auto})
    subspace = kit.constraint(name, "toy")[0]  # None without the weight side
    # the readout's features, or None without the activation side
    features = safety.features[m.readout] if m.activation else None
    # the *-avg ablation: the mean over the m latents, i.e. the sum with its weight divided by m
    lam = safety_recipe.kit.lam / features.m if features is not None and m.average else safety_recipe.kit.lam
    # AsFT: its penalty on dW from the aligned weights, added to the loss
    penalty = AsFTPenalty(toy.aligned, align_C, safety_recipe.baselines.asft_lam) if m.baseline == "asft" else None
    eval_prompts = [e.prompt for e in w.eval_harmful[::3]]  # every third held-out harmful prompt: a cheaper drift curve

    def curve(model_):
        return harmful_score(model_, tok, eval_prompts, 24, judge)  # HS with 24-token answers

    # the one training loop, with the method's switches
    hist = finetune_cwac(model, seqs, Schedule(r.finetune_steps, r.finetune_batch, r.finetune_lr,
                                               seed=seed + SEED_FINETUNE),  # the fine-tune's own batch stream
                         Constraints(subspace, features, lam, safety_recipe.kit.safety_batch,
                                     # weight-gradonly: the gradient projected, the update not
                                     project_update=not m.grad_only,
                                     project_grad=m.grad_only, penalty=penalty),
                         pad_id=tok.pad_token_id,
                         curve=(safety_recipe.eval_every, curve) if safety_recipe.eval_every else None,
                         desc=f"{name} {task} p={p:g}", progress=progress)
    if m.baseline in ("safelora", "safelora-number"):  # SafeLoRA acts after training, on the fine-tuned weights
        b = safety_recipe.baselines
        # safelora-qv: a fixed share of its targets, at least one
        n = max(1, round(b.safelora_share * len(align_C))) if m.baseline == "safelora-number" else None
        hist["safelora_cos"] = safelora_project_(model, toy.aligned, align_C, b.safelora_threshold, n)
    if "auto" in kit.report:  # the probe's choice and its map, for results.json
        hist["auto"] = kit.report["auto"]
    return model, hist


def run_experiment(out: str | Path = "runs/experiment", preset: str = "quick", seeds=None, tasks=None, ps=None,
                   methods=None, recipe: Recipe | None = None, safety: SafetyRecipe | None = None,
                   cache_dir: str | Path | None = None, save_models: bool = True, progress: bool = True,
                   judge=None) -> dict:
    """methods x tasks x p x seeds on the toy world. Writes results.json after every run (a rerun with the same
    settings resumes), results.md, hs_vs_p.png, fa_vs_hs.png, drift.png, models/, subspace/ and sae/.
    judge: judge(prompts, answers) -> list of bools (True: harmful) for HS and the curves (None: the refusal
    matcher); every row names it."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {', '.join(PRESETS)}")
    pre = PRESETS[preset]
    seeds = list(pre["seeds"] if seeds is None else seeds)
    # checked before any run, like the methods below
    tasks = [check_task(t) for t in (pre["tasks"] if tasks is None else tasks)]
    ps = [check_p(p) for p in (pre["ps"] if ps is None else ps)]
    methods = list(pre["methods"] if methods is None else methods)
    rows = [method(m, "toy") for m in methods]  # an unknown method is refused here, before any run
    r, safety_recipe = recipe or Recipe(), safety or SafetyRecipe()  # the toy's defaults unless given
    out = prepare_out(out)  # writable, or refused before hours of training
    settings = {"recipe": asdict(r), "safety": asdict(safety_recipe)}
    if judge is not None:  # a user's judge is a setting: not resumed or merged with the matcher's results (and
        settings["judge"] = judge_name(judge)  # the matcher's settings stay those of the runs made before judges)
    res_path = out / "results.json"
    # rows: one per evaluated model; curves: HS against step per run; safety: per seed, the SAE and the ranks
    data = {"settings": json.loads(json.dumps(settings, default=list)), "rows": [], "curves": {}, "safety": {},
            "wall_s": 0.0}
    # a rerun resumes: the runs already in results.json are skipped, if they were made with the same settings
    if res_path.is_file():
        old = json.loads(res_path.read_text())
        if old.get("settings") != data["settings"]:
            raise ValueError(f"{res_path} holds results of other settings; choose another --out")
        data = old
    done = {(x["method"], x["task"], x["p"], x["seed"]) for x in data["rows"] if x["stage"] == "finetuned"}
    t0 = time.time() - data["wall_s"]  # the wall time counts the earlier sessions too
    # one kit per seed for all its methods: of every linear if any method needs more than down_proj
    targets = "all" if any(m.weight in ("all", "auto") for m in rows) else "down_proj"
    for seed in seeds:
        todo = [(m, t, p) for t in tasks for p in ps for m in methods if (m, t, p, seed) not in done]
        if not todo:  # nothing left for this seed: its models are not even loaded
            continue
        toy = toy_models(seed, r, cache_dir, progress=progress)  # trained once, then read from the cache
        # the seed's kit, readouts, alignment matrices and refusals
        saf = toy_safety(toy, r, safety_recipe, seed, progress, targets)
        # the subspace `weight` and `cwac` constrain (every linear with the kit's targets "all")
        saf.kit.subspace.matching(TARGETS[safety_recipe.kit.targets]).save(out / "subspace" / f"s{seed}")
        saf.sae.save(out / "sae" / f"s{seed}", extra={"report": saf.sae_report})
        # the SAE's metrics and the subspace ranks, per seed, for results.md
        data["safety"][str(seed)] = {"sae": {k: v for k, v in saf.sae_report.items() if k != "history"},
                                     "ranks": {str(list(TARGETS[saf.kit.settings.targets])): saf.kit.report["ranks"]},
                                     "n_features": saf.kit.features.m}
        for task in tasks:
            # the aligned model's row per task: what every fine-tune is compared with
            if not any(x["stage"] == "aligned" and x["task"] == task and x["seed"] == seed for x in data["rows"]):
                ev = evaluate(toy.aligned, toy.tok, toy.world, task, judge=judge)
                data["rows"].append(row("aligned", "none", task, None, seed, ev))
        for name, task, p in todo:
            model, hist = run_method(name, toy, saf, task, p, seed, r, safety_recipe, progress, judge)
            ev = evaluate(model, toy.tok, toy.world, task, judge=judge)  # HS, compliance, refusal score, over-refusal and FA
            # a figure not measured (NaN) becomes null: JSON has no NaN
            data["rows"].append({k: clean_nan(v) for k, v in row("finetuned", name, task, p, seed, ev).items()})
            data["curves"][run_name(name, task, p, seed)] = hist["curve"]
            if "auto" in hist:  # the probe's choice and its drift map
                data.setdefault("auto", {})[run_name(name, task, p, seed)] = hist["auto"]
            if save_models:
                save_pretrained(model, toy.tok, out / "models" / run_name(name, task, p, seed))
            data["wall_s"] = round(time.time() - t0, 1)
            write_json_atomic(res_path, data)  # after every run: an interrupted experiment loses one run at most
    data["wall_s"] = round(time.time() - t0, 1)
    write_results(out, data)  # results.md and the plots, from every row
    return data




# ---------------------------------------------------------------- python -m minicwac experiment


def add_arguments(p) -> None:
    from ..cli import RUN_FLAGS, add_judge_flag, add_setting_flags, harmful_ratio, positive_int
    p.add_argument("--preset", default="quick", choices=sorted(PRESETS),
                   help="quick: 1 seed, sentiment, p=0.1, every main method; full: 3 seeds, 3 tasks, 5 p")
    p.add_argument("--out", default=None, help="output folder (default runs/experiment-<preset>); a rerun resumes")
    p.add_argument("--seeds", type=int, nargs="+", default=None)
    p.add_argument("--tasks", nargs="+", choices=TASKS, default=None)
    p.add_argument("--p", type=harmful_ratio, nargs="+", default=None, help="harmful ratios")
    p.add_argument("--methods", nargs="+", choices=methods_for("toy"), default=None, metavar="METHOD",
                   help=f"any of {', '.join(methods_for('toy'))}")
    p.add_argument("--steps", type=positive_int, default=None, help="fine-tuning steps (default: the recipe's 100)")
    # the constraint settings a run takes as flags (RUN_FLAGS), defaulting to the toy recipe's
    add_setting_flags(p, KitSettings, RUN_FLAGS, preset="the toy recipe's")
    add_setting_flags(p, BaselineSettings, ("safeinstr_frac", "asft_lam"), preset="the toy recipe's")
    p.add_argument("--cache", default=None, help="cache of base/aligned models and SAEs")
    p.add_argument("--no-models", action="store_true", help="do not save the fine-tuned models")
    add_judge_flag(p, "HS and the drift curves")
    p.add_argument("--paper", action="store_true",
                   help="the paper's lambda 0.5 and top 100 latents instead of those the committed rule chose on the "
                        "dev worlds (lambda 2, every firing latent: docs/results.md); flags still override either")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args) -> None:
    from ..cli import settings_from
    r = Recipe() if args.steps is None else Recipe(finetune_steps=args.steps)  # --steps: the fine-tune's length only
    # the rule's choice (or the paper's, --paper), with the flags over it
    base = SafetyRecipe() if args.paper else with_settings(SafetyRecipe(), **TOY_CHOSEN)
    safety_recipe = replace(base, kit=settings_from(args, base.kit).check(),
                            baselines=settings_from(args, base.baselines).check())
    out = args.out or f"runs/experiment-{args.preset}"
    run_experiment(out, args.preset, args.seeds, args.tasks, args.p, args.methods, recipe=r, safety=safety_recipe,
                   cache_dir=args.cache, save_models=not args.no_models, progress=not args.quiet,
                   judge=args.judge)
    print(open(f"{out}/results.md").read())
    print(f"wrote {out}/results.json, results.md, hs_vs_p.png, fa_vs_hs.png, drift.png, models/, subspace/, sae/")
