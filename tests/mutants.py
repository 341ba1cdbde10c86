"""Mutation testing for minicwac (`make mutants`): plant one small, realistic bug at a time in the method's code and
check that the fast tests catch it. A mutant the tests do not catch ("survived") marks a fault a user could ship.

    python tests/mutants.py                      # every mutant, 2 at a time (what `make mutants` runs)
    python tests/mutants.py --list               # the list, checked, nothing run
    python tests/mutants.py --only lam-dropped top-m-smallest --json PATH
    python tests/mutants.py --kind subspace -j 1

Each mutant runs in a fresh temporary copy of the git-tracked files (never .venv, runs/ or .git): its edit is
applied there, the edited file compiled, then `python -m pytest -q -x -m "not slow" <its tests>` runs in the copy
with PYTHONPATH set to it (a canary run first checks that the copy, not the installed package, is what the tests
import) and MINICWAC_CACHE inside it. A baseline run of the unmutated copy must pass first. Killed: a test failed
(or it timed out, marked so); survived: every test passed. Exit status 0 when every non-equivalent mutant died.

Adding a mutant: append a `Mutant(...)` to MUTANTS with a unique kebab-case name, one of KINDS, the file (relative
to the repository root), `old`, an exact snippet that occurs exactly once in that file (lengthen it until it is
unique: the script refuses the list otherwise, so that it stays honest as the code moves), `new`, the bug, `tests`,
the test files or node ids that should catch it (fast ones: each run should stay under a minute), and `why`, the
harm a user would meet. Run `python tests/mutants.py --only NAME`. If it survives, write the smallest test that
kills it; give `equivalent` a one-line argument only when the edit provably cannot change behaviour.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("step", "projection", "subspace", "safety-loss", "latents", "sae", "lora", "fsdp", "drift", "kit-wiring",
         "kit-checks")


@dataclass(frozen=True)
class Mutant:
    name: str  # kebab-case id
    kind: str  # one of KINDS
    file: str  # relative to the repository root
    old: str  # occurs exactly once in `file`
    new: str  # what it becomes: the bug
    tests: tuple[str, ...]  # files or node ids that should catch it (run with -m "not slow")
    equivalent: str | None = None  # why it cannot change behaviour (then never a survivor)
    why: str = ""  # what a user would meet if the bug shipped


CWAC, SUB, FEAT, SAE_, LORA, DRIFT = (f"minicwac/core/{m}.py" for m in ("cwac", "subspace", "features", "sae", "lora",
                                                                         "drift"))
DATA, CAL, FT = "minicwac/core/data.py", "minicwac/kit/calibration.py", "minicwac/kit/finetuning.py"
T = {k: (f"tests/test_{k}.py",) for k in ("activation", "cwac", "subspace", "features", "sae", "lora", "drift", "train",
                                          "kit")}
STEP = T["activation"] + T["cwac"]


def tests_of(file: str, without: str) -> tuple[str, ...]:
    """The node ids of a test file's tests, those whose name contains `without` left out (a slow multi-process one)."""
    names = re.findall(r"^def (test_\w+)", (ROOT / file).read_text(), re.M)
    return tuple(f"{file}::{n}" for n in names if without not in n)


# test_lora.py without its 2-process test (~25 s): the rest kill every lora mutant
T["lora"] = tests_of("tests/test_lora.py", without="two_ranks")
DIST = ("tests/test_dist.py::test_two_ranks_match_one_and_keep_the_constraint_on_every_shard",)
GRADS = ("tests/test_dist.py::test_the_ranks_gradients_are_one_process_gradients",)  # 2 and 3 ranks, ~30 s
DIST_PY = "minicwac/io/dist.py"

MUTANTS = [
    # ---- step: the loss, the order of the step, the schedule and the data behind it (core/cwac.py, core/data.py)
    Mutant("lam-dropped", "step", CWAC, "else task + lam * safety", "else task + safety", STEP,
           why="lambda has no effect: every --lam trains with weight 1"),
    Mutant("safety-on-every-prompt", "step", CWAC, "features.loss(model, safety_batch, n_safety)",
           "features.loss(model, None, n_safety)", STEP,
           why="L_safety forwards every calibration prompt at every step (slow, and not the sampled objective)"),
    Mutant("safety-pick-reseeded", "step", CWAC, "(c.safety_batch,), generator=g)",
           "(c.safety_batch,), generator=g.manual_seed(sch.seed + SEED_SAFETY))", STEP,
           why="the same safety prompts at every step: L_safety holds z0 on a handful of prompts only"),
    Mutant("clip-before-grad-projection", "step", CWAC,
           "        subspace.project_grad_(model)  # g <- g - (g S) S^T\n"
           "    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)",
           "        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)\n"
           "        subspace.project_grad_(model)\n"
           "    else:\n"
           "        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)", STEP,
           why="the clip norm counts the discarded part of g: constrained runs take smaller steps than asked"),
    Mutant("nan-update-applied", "step", CWAC, "    if math.isfinite(norm):  # a NaN/Inf gradient",
           "    if True:  # a NaN/Inf gradient", ("tests/test_bad_inputs_train.py",),
           why="a NaN gradient is applied: the caller's model is NaN after a diverged step"),
    Mutant("divergence-unchecked", "step", CWAC, "    if not (math.isfinite(out[\"loss\"]) and math.isfinite(norm)):",
           "    if False:", ("tests/test_bad_inputs_train.py",),
           why="a diverged run trains on, saves a NaN model and reports success"),
    Mutant("grad-projection-only-when-asked", "step", CWAC,
           "if subspace is not None and (project_update or project_grad):", "if subspace is not None and project_grad:",
           STEP,
           why="with the update projection the in-subspace gradient reaches the clip norm and AdamW's moments"),
    Mutant("update-projection-skipped", "step", CWAC, "subspace.project_(model)  # exact",
           "pass  # exact", STEP + T["subspace"],
           why="the weight constraint is not applied: (W - W0) S drifts under AdamW"),
    Mutant("biases-not-frozen", "step", CWAC, "b.requires_grad_(False)", "b.requires_grad_(True)", STEP,
           why="a target's bias trains and shifts its outputs on the protected inputs"),
    Mutant("biases-not-restored", "step", CWAC, "            b.requires_grad_(True)", "            pass", STEP,
           why="after a run (or a failed one) the target biases stay frozen for whatever trains next"),
    Mutant("resume-skips-safety-draws", "step", CWAC, "        next(data), draw()\n", "        next(data)\n",
           T["kit"], why="a resumed run draws other safety prompts than the uninterrupted one"),
    Mutant("lr-schedule-first-group-only", "step", CWAC, "for group in opt.param_groups:  # one schedule",
           "for group in opt.param_groups[:1]:  # one schedule", STEP + T["train"],
           why="norm gains and biases train at the peak lr throughout: no warmup, no decay"),
    Mutant("lm-loss-no-shift", "step", DATA, "logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten()",
           "logits[:, :-1].flatten(0, 1).float(), labels[:, :-1].flatten()", T["train"],
           why="the model learns to copy the current token instead of predicting the next"),
    Mutant("warmup-off-by-one", "step", DATA, "return lr * (step + 1) / warmup", "return lr * step / warmup",
           T["train"], why="the first step trains with lr 0 (a one-step run trains nothing)"),
    Mutant("cosine-floor-dropped", "step", DATA, "lr * (min_ratio + (1 - min_ratio) * 0.5",
           "lr * ((1 - min_ratio) * 0.5", T["train"], why="the schedule ends below its floor"),
    Mutant("default-warmup-10pc", "step", CWAC, "max(1, sch.steps // 20) if sch.warmup is None",
           "max(1, sch.steps // 10) if sch.warmup is None", STEP + T["train"],
           why="the default warmup is 10% of the steps, not the documented 5%"),
    Mutant("weight-decay-on-biases", "step", DATA, "p.requires_grad and p.dim() >= 2]",
           "p.requires_grad and p.dim() >= 1]", T["train"] + T["cwac"],
           why="norm gains and biases decay towards 0"),
    Mutant("adamw-betas", "step", DATA, "betas=(0.9, 0.95))", "betas=(0.9, 0.999))", T["train"] + T["cwac"],
           why="AdamW's second moment averages over ~1000 steps instead of ~20 (a documented choice silently off)"),
    Mutant("rank-part-local-task-count", "step", CWAC,
           '    counts = {"n_task": n_targets(batch), '
           '"n_safety": int(feats.keep[pick].sum()) if feats is not None else None}\n'
           "    batch = batch[rank * len(batch) // world_size:(rank + 1) * len(batch) // world_size]",
           "    batch = batch[rank * len(batch) // world_size:(rank + 1) * len(batch) // world_size]\n"
           '    counts = {"n_task": n_targets(batch), '
           '"n_safety": int(feats.keep[pick].sum()) if feats is not None else None}', DIST,
           why="N ranks weigh the task tokens per rank, not over the global batch: N ranks train another run than 1"),
    # ---- subspace: the covariance, the eigenvectors, the rank (core/subspace.py)
    Mutant("eigvecs-small-end", "subspace", SUB, "evecs.flip(1)", "evecs", T["subspace"],
           why="S spans the directions harmful prompts use least: the constraint protects nothing"),
    Mutant("rank-minus-one", "subspace", SUB, "return int(hit[0]) + 1 if len(hit)", "return int(hit[0]) if len(hit)",
           T["subspace"], why="one direction fewer than the energy asks for"),
    Mutant("rank-plus-one", "subspace", SUB, "Sk = evecs[:, :kk].to(dtype)", "Sk = evecs[:, :kk + 1].to(dtype)",
           T["subspace"], why="one direction more than the energy rule (and than the ranks it records)"),
    Mutant("centred-covariance", "subspace", SUB, "x = acts[name][keep].double()  # (tokens, in)",
           "x = acts[name][keep].double()  # (tokens, in)\n            x = x - x.mean(0)", T["subspace"],
           why="C loses the mean input direction, often the strongest one harmful prompts share"),
    Mutant("energy-compare-flipped", "subspace", SUB, "(cum >= energy - 1e-6)", "(cum <= energy - 1e-6)",
           T["subspace"], why="rank 1 whatever the energy"),
    Mutant("energy-tolerance-dropped", "subspace", SUB, "(cum >= energy - 1e-6)", "(cum >= energy)", T["subspace"],
           why="float32 round-off adds a direction: energy 0.99 on eigenvalues summing to exactly 0.99"),
    Mutant("shard-first-rows", "subspace", SUB, "DTensor.from_local(d.to_local().to(dev)",
           "DTensor.from_local(self.W0S[name].detach()[:d.to_local().shape[0]].to(dev)", DIST,
           why="on N ranks every rank pins its rows of W S to rank 0's rows of W0 S"),
    # ---- projection: the weight and gradient projections (core/subspace.py)
    Mutant("project-sign-flipped", "projection", SUB, "W.copy_(Wf - (Wf @ S - W0S) @ S.T)",
           "W.copy_(Wf + (Wf @ S - W0S) @ S.T)", T["subspace"] + T["cwac"],
           why="the projection doubles the drift on S instead of removing it"),
    Mutant("project-w0s-dropped", "projection", SUB, "W.copy_(Wf - (Wf @ S - W0S) @ S.T)",
           "W.copy_(Wf - (Wf @ S) @ S.T)", T["subspace"] + T["cwac"],
           why="W S is set to 0, not to W0 S: the layer's response to harmful inputs is erased"),
    Mutant("project-grad-wrong-side", "projection", SUB, "project_out_(_local(W.grad), S)  # (out, in)",
           "project_out_(_local(W.grad).T, S)  # (out, in)", T["subspace"] + T["cwac"],
           why="g S^T S on the output side: wrong shape, or (square layers) the wrong directions"),
    Mutant("project-out-sign", "projection", SUB, "x.copy_(xf - (xf @ S) @ S.T)", "x.copy_(xf + (xf @ S) @ S.T)",
           T["cwac"] + T["subspace"] + T["lora"], why="gradient and adapter projections add the subspace part back"),
    # ---- safety-loss: L_safety and the readout it compares (core/features.py)
    Mutant("latents-mean", "safety-loss", FEAT, "((z - z0) ** 2).sum(-1)[keep]", "((z - z0) ** 2).mean(-1)[keep]",
           T["features"] + T["activation"], why="the constraint weakens by 1/m as more latents are protected"),
    Mutant("padding-in-mean", "safety-loss", FEAT, "((z - z0) ** 2).sum(-1)[keep]",
           "((z - z0) ** 2).sum(-1).flatten()", T["features"] + T["activation"],
           why="padding and skipped tokens dilute L_safety (and its strength depends on the batch's lengths)"),
    Mutant("autocast-not-disabled", "safety-loss", FEAT, "with torch.autocast(ids.device.type, enabled=False):",
           'with __import__("contextlib").nullcontext():', T["features"] + T["activation"],
           why="under bf16-mixed L_safety starts at a rounding floor: its early gradient is noise"),
    Mutant("dropout-left-on", "safety-loss", FEAT, "off = [m for m in dropout_modules(model) if m.training]",
           "off = []", T["features"] + T["activation"],
           why="z is read with dropout, z0 without: L_safety is never zero and pulls towards noise"),
    Mutant("pre-reads-post", "safety-loss", FEAT, "return self.sae.pre_acts(x, self.idx)  # only",
           "return self.sae.encode(x)[..., self.idx]  # only", T["features"] + T["activation"],
           why='readout "pre" loses the gradient of a latent that left the TopK'),
    Mutant("safety-global-count-ignored", "safety-loss", FEAT,
           "per_token.mean() if n_tokens is None else per_token.sum() / n_tokens", "per_token.mean()", DIST,
           why="on N ranks L_safety is each rank's mean summed: N times as strong as on 1"),
    Mutant("last-safety-column-dropped", "safety-loss", FEAT, "T = int(keep.any(0).nonzero().max()) + 1",
           "T = int(keep.any(0).nonzero().max())", T["features"] + T["activation"],
           why="the last token of the longest prompt never counts"),
    # ---- latents: scoring and selection (core/features.py, kit/calibration.py)
    Mutant("contrast-ignores-harmless", "latents", CAL, "calib_harmless, pad, skip, how=score,",
           'calib_harmless, pad, skip, how="harmful",', T["kit"],
           why="calibrate with harmless prompts still picks chat-format latents that fire everywhere"),
    Mutant("contrast-sign", "latents", FEAT, "d = s - latent_means(model, sae, harmless,",
           "d = s + latent_means(model, sae, harmless,", T["features"] + T["kit"],
           why="contrast rewards latents that fire on harmless prompts"),
    Mutant("top-m-smallest", "latents", FEAT, "scores.topk(min(m, len(scores))).indices",
           "scores.topk(min(m, len(scores)), largest=False).indices", T["features"] + T["kit"],
           why="the least safety-related latents are protected"),
    Mutant("firing-includes-zero", "latents", FEAT, "idx = (scores > 0).nonzero()", "idx = (scores >= 0).nonzero()",
           T["features"], why='m="firing" protects latents that never fire'),
    Mutant("latent-means-count-padding", "latents", FEAT, "        n += len(z)\n", "        n += keep.numel()\n",
           T["features"] + T["kit"], why="padding dilutes the scores: long and short prompt sets are weighed apart"),
    Mutant("z0-on-sae-mix", "latents", CAL, "feats = safety_features(model, calib, pad,",
           "feats = safety_features(model, sae_seqs, pad,", T["kit"],
           why="z0 and L_safety's prompts are the SAE's training mix, generic text included"),
    # ---- sae: the TopK SAE (core/sae.py)
    Mutant("decoder-not-renormalised", "sae", SAE_, "self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True))",
           "self.W_dec.div_(1.0)", T["sae"], why="TopK compares latents whose decoder rows differ in norm"),
    Mutant("topk-k-minus-one", "sae", SAE_, "pre.topk(self.cfg.k, dim=-1)", "pre.topk(self.cfg.k - 1, dim=-1)",
           T["sae"], why="L0 is k - 1, not the k asked for"),
    Mutant("b-dec-added", "sae", SAE_, "h = x.float() * self.scale - self.b_dec",
           "h = x.float() * self.scale + self.b_dec",
           T["sae"] + T["features"], why="the encoder reads uncentred inputs: every latent value is off"),
    Mutant("b-enc-wrong-latents", "sae", SAE_, "+ self.b_enc[idx])", "+ self.b_enc[:len(idx)])",
           T["sae"] + T["features"], why="the selected latents get other latents' biases in L_safety's readout"),
    Mutant("b-dec-not-in-decode", "sae", SAE_, "x_hat = z @ self.W_dec + self.b_dec", "x_hat = z @ self.W_dec",
           T["sae"], why="reconstructions miss the data's centre"),
    Mutant("fold-scale-b-dec", "sae", SAE_, "self.b_dec.div_(s)", "self.b_dec.mul_(s)", T["sae"],
           why="a saved SAE reads raw activations with a wrongly scaled centre"),
    Mutant("aux-loss-alive-latents", "sae", SAE_, "pre.masked_fill(~dead, 0.0)", "pre.masked_fill(dead, 0.0)",
           T["sae"], why="AuxK trains the live latents, so dead latents never come back"),
    # ---- lora: the adapter, its constraint and its merge (core/lora.py, core/subspace.py)
    Mutant("ws-error-lora-scale-dropped", "lora", SUB, "err = err + m.scale * _local(m.lora_B)",
           "err = err + _local(m.lora_B)", T["lora"], why="a LoRA model's W S = W0 S check is off by alpha / r"),
    Mutant("lora-a-not-projected", "lora", SUB, "project_out_(_local(m.lora_A), S)  # (r, in)",
           "pass  # (r, in)", T["lora"], why="LoRA + CWAC leaves the weight side unconstrained"),
    Mutant("merge-scale-dropped", "lora", LORA, "return self.weight + self.scale * self.lora_B @ self.lora_A",
           "return self.weight + self.lora_B @ self.lora_A", T["lora"],
           why="the merged model differs from the trained adapters"),
    Mutant("lora-default-alpha", "lora", LORA, "(2 * self.r if self.alpha is None", "(self.r if self.alpha is None",
           T["lora"], why="the default scale is 1, not the documented 2 (alpha 2r)"),
    Mutant("lora-grad-projection-on-w0", "lora", SUB, 'W = getattr(m, "lora_A", m.weight)  # with LoRA',
           "W = m.weight  # with LoRA", T["lora"] + T["cwac"],
           why="the gradient-only variant leaves LoRA's A unprojected (W0 is frozen: no gradient to project)"),
    # ---- drift: the drift map and the auto rule (core/drift.py)
    Mutant("drift-ignores-lora", "drift", DRIFT, "return (merged() if callable(merged) else m.weight).detach().float()",
           "return m.weight.detach().float()", T["lora"] + T["drift"],
           why="the drift map of an unmerged LoRA model shows no weight change"),
    Mutant("drift-db-dropped", "drift", DRIFT, "db = {n: _bias(tuned, n, W0[n]) - _bias(base, n, W0[n])",
           "db = {n: _bias(base, n, W0[n]) - _bias(base, n, W0[n])", T["drift"],
           why="bias changes (Qwen2's q/k/v, GPT-2) are invisible in the map and to the auto rule"),
    Mutant("choose-by-exact", "drift", DRIFT, 'by_kind.get(kind, 0.0) + terms["dW_h0"] + terms.get("db", 0.0)',
           'by_kind.get(kind, 0.0) + terms["exact"]', T["drift"],
           why="auto constrains where drift arrives from upstream, not where a weight constraint acts"),
    Mutant("w0-dh-with-tuned-weight", "drift", DRIFT, '"W0_dh": dh @ W0[n].T', '"W0_dh": dh @ (W0[n] + dW[n]).T',
           T["drift"], why="the upstream term includes the second-order part: the decomposition no longer adds up"),
    # ---- kit-wiring: what finetune hands the loop (kit/calibration.py, kit/finetuning.py)
    Mutant("features-for-every-method", "kit-wiring", CAL, "return sub, (self.features if act else None)",
           "return sub, self.features", T["kit"],
           why="`weight` and `weight-all` also get L_safety: the ablation is void"),
    Mutant("finetune-lam-ignored", "kit-wiring", FT, "if kit is not None else 0.0) if lam is None else lam",
           "if kit is not None else 0.0)", T["kit"], why="--lam is ignored: a lambda sweep is flat"),
    Mutant("cwac-gets-no-subspace", "kit-wiring", FT, "else Constraints(sub, feats, lam,",
           "else Constraints(None, feats, lam,", T["kit"], why="cwac trains without the weight constraint"),
    Mutant("lam-not-recorded", "kit-wiring", FT, '"lam": lam, "dtype": dtype,',
           '"lam": None if kit is None else kit.settings.lam, "dtype": dtype,', T["kit"],
           why="history.json records the kit's lambda, not the one the run used"),
    Mutant("auto-patterns-ignored", "kit-wiring", CAL, 'self.report["auto"]["patterns"] if targets == "auto"',
           'TARGETS["all"] if targets == "auto"', T["kit"], why="weight-auto constrains every linear"),
    # ---- kit-checks: what refuses a wrong model or precision (kit/, core/cwac.py, core/subspace.py)
    Mutant("kit-load-tolerance", "kit-checks", CAL, "if not err <= 1e-4:  # the bound", "if not err <= 1e-1:  # the bound",
           T["kit"], why="a kit loads on weights it was not made from (a 1% change passes)"),
    Mutant("bf16-warning-never", "kit-checks", CWAC, "    if low:\n", "    if low and sub is None:\n", STEP,
           why="bf16 constrained weights train without a word: W S = W0 S holds only to bf16"),
    Mutant("finetune-accepts-bf16", "kit-checks", FT, "if next(model.parameters()).dtype != torch.float32:",
           "if next(model.parameters()).dtype == torch.float16:", T["kit"],
           why="finetune trains bf16 weights: the projected values are rounded off at every step"),
    Mutant("kit-s-not-orthonormal-accepted", "kit-checks", SUB, "if not err <= ORTHONORMAL_TOL:",
           "if not err <= 10.0:", ("tests/test_bad_inputs_kit.py",),
           why="a kit whose S is zeroed or scaled loads: the projection then restores nothing, or overshoots"),
    Mutant("kit-digests-unchecked", "kit-checks", CAL, "        if file_sha256(f) != digest:",
           "        if False:", ("tests/test_bad_inputs_kit.py",),
           why="a flipped byte in the SAE or the features loads silently"),
    # ---- fsdp: the ranks' gradients and the sharded forward (io/dist.py, core/cwac.py, kit/finetuning.py)
    Mutant("fsdp-ranks-averaged", "fsdp", DIST_PY, "        unit.set_gradient_divide_factor(1.0)", "        pass",
           GRADS, why="the ranks' gradients are averaged: every gradient is 1/N of the global mean's (AdamW hides "
           "it except where clipping binds and near epsilon)"),
    Mutant("fsdp-bf16-mixed-reduced-in-bf16", "fsdp", DIST_PY, "reduce_dtype=torch.float32)",
           "reduce_dtype=torch.bfloat16)", GRADS, why="bf16-mixed sums the ranks' gradients in bf16"),
    Mutant("fsdp-fp32-reduced-in-bf16", "fsdp", DIST_PY, "else MixedPrecisionPolicy()}",
           "else MixedPrecisionPolicy(reduce_dtype=torch.bfloat16)}", GRADS,
           why="an fp32 run sums the ranks' gradients in bf16"),
    Mutant("fsdp-safety-pick-not-split", "fsdp", CWAC, "pick.chunk(world_size)[rank] if feats",
           "pick if feats", GRADS, why="every rank computes L_safety on the whole safety batch: N times its weight"),
    Mutant("fsdp-z0-not-rebased", "fsdp", FT, "            feats = feats.rebased(model)  # so that",
           "            pass  # so that", DIST,
           why="a sharded bf16-mixed run starts with L_safety at a floor of rounding noise, not at 0"),
    Mutant("fsdp-no-reshard-after-a-stopped-forward", "fsdp", "minicwac/core/hooks.py",
           "        model.reset_iter_state()", "        pass", DIST,
           why="after a no-grad partial forward the optimizer holds gathered weights: the checkpoint fails"),
    Mutant("ws-error-last-target-only", "kit-checks", SUB,
           "out = max(out, float(err.norm() / W0S.norm().clamp(min=1e-30)))",
           "out = float(err.norm() / W0S.norm().clamp(min=1e-30))", T["kit"] + T["lora"],
           why="W S = W0 S is checked on the last target only: a kit loads on a model with its first target changed"),
]


class ListError(SystemExit):
    """A defect of the mutant list (not of the code under test)."""


def mutated_source(m: Mutant) -> str:
    """The file with the edit applied, after checking the entry: a known kind, `old` exactly once, and it compiles."""
    if m.kind not in KINDS:
        raise ListError(f"mutant {m.name}: kind {m.kind!r}, expected one of {', '.join(KINDS)}")
    if not re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", m.name) or not m.tests or m.old == m.new:
        raise ListError(f"mutant {m.name}: needs a kebab-case name, tests, and new != old")
    path = ROOT / m.file
    src = path.read_text()
    n = src.count(m.old)
    if n != 1:
        raise ListError(f"mutant {m.name}: its old snippet occurs {n} times in {m.file}, expected exactly once")
    for t in m.tests:
        if not (ROOT / t.split("::")[0]).is_file():
            raise ListError(f"mutant {m.name}: no test file {t.split('::')[0]}")
    out = src.replace(m.old, m.new)
    try:
        compile(out, m.file, "exec")
    except SyntaxError as e:
        raise ListError(f"mutant {m.name}: the edited {m.file} does not compile ({e})") from None
    return out


def tracked_files() -> list[str]:
    """The git-tracked files that exist in the working tree, runs/ left out."""
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.decode()
    return [f for f in out.split("\0") if f and not f.startswith(("runs/", ".venv/")) and (ROOT / f).is_file()]


def make_copy(files: list[str]) -> Path:
    """A fresh temporary copy of `files`."""
    dest = Path(tempfile.mkdtemp(prefix="minicwac-mutant-"))
    for f in files:
        (dest / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, dest / f)
    return dest


def run_pytest(copy: Path, tests: list[str], timeout: float) -> tuple[int | None, str, float]:
    """pytest on `tests` inside `copy`, importing the copy; returns (exit code, None on a timeout; output; seconds)."""
    env = {**os.environ, "PYTHONPATH": str(copy), "OMP_NUM_THREADS": "1",
           "MINICWAC_CACHE": str(copy / "runs" / "cache")}  # a mutant never writes into a real cache
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-m", "not slow", "-p", "no:cacheprovider", *tests]
    t0 = time.monotonic()
    # a session of its own: a timeout ends the whole group (test_dist's ranks included)
    p = subprocess.Popen(cmd, cwd=copy, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    try:
        out, _ = p.communicate(timeout=timeout)
        return p.returncode, out, time.monotonic() - t0
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, _ = p.communicate()
        return None, out, time.monotonic() - t0


def first_failure(out: str) -> str:
    """The first failing test id in pytest's short summary (or the line that says what went wrong)."""
    hit = re.search(r"^(?:FAILED|ERROR) (\S+)", out, re.M)
    if hit:
        return hit.group(1)
    lines = [ln for ln in out.splitlines() if ln.strip()]
    return lines[-1][:120] if lines else "(no output)"


def run_mutant(m: Mutant, files: list[str], timeout: float) -> dict:
    """Apply `m` in a fresh copy, run its tests; the verdict: killed, survived, equivalent or timeout."""
    copy = make_copy(files)
    try:
        (copy / m.file).write_text(mutated_source(m))
        rc, out, secs = run_pytest(copy, list(m.tests), timeout)
    finally:
        shutil.rmtree(copy, ignore_errors=True)
    if rc is None:
        status, failure = "timeout", f"timed out after {timeout:.0f} s"
    elif rc in (1, 2):  # tests failed, or a test module failed to import
        status, failure = "killed", first_failure(out)
    elif rc == 0:
        status, failure = ("equivalent" if m.equivalent else "survived"), None
    else:  # 3-5: pytest's own error, a usage error, no tests collected: a defect of the entry
        status, failure = "error", f"pytest exit {rc}: {first_failure(out)}"
    return {"name": m.name, "kind": m.kind, "status": status, "seconds": round(secs, 1), "first_failure": failure,
            "file": m.file, "tests": list(m.tests), "equivalent": m.equivalent, "why": m.why,
            "output_tail": out[-3000:] if status in ("survived", "error") else ""}


def baseline(files: list[str], tests: list[str], timeout: float) -> None:
    """The unmutated copy passes every test the mutants use, and a broken copy fails (so the copy is imported)."""
    copy = make_copy(files)
    try:
        probe = subprocess.run([sys.executable, "-c", "import minicwac; print(minicwac.__file__)"], cwd=copy,
                               env={**os.environ, "PYTHONPATH": str(copy)}, capture_output=True, text=True)
        where = Path(probe.stdout.strip() or ".").resolve()
        if copy.resolve() not in where.parents:
            raise SystemExit(f"in the copy `import minicwac` resolves to {where}, not to the copy: mutants would "
                             "test the installed package")
        print(f"baseline: {len(tests)} test files on the unmutated copy ...", flush=True)
        rc, out, secs = run_pytest(copy, tests, timeout)
        if rc != 0:
            raise SystemExit(f"the unmutated code fails its tests (exit {rc}, {first_failure(out)}); fix that "
                             f"first:\n{out[-3000:]}")
        # the canary: a copy whose package cannot be imported must fail, or the tests read another minicwac
        init = copy / "minicwac" / "__init__.py"
        init.write_text(init.read_text() + '\nraise ImportError("mutation canary")\n')
        rc2, out2, _ = run_pytest(copy, [tests[0]], timeout)
        if rc2 == 0 or "mutation canary" not in out2:
            raise SystemExit("the tests did not import the copy's minicwac (the canary went unnoticed)")
        print(f"baseline: passed in {secs:.0f} s; the tests import the copy", flush=True)
    finally:
        shutil.rmtree(copy, ignore_errors=True)


def summary(results: list[dict]) -> int:
    """Print the kill rate (overall and by kind) and the survivors; the exit status."""
    counted = [r for r in results if r["status"] != "equivalent"]
    dead = [r for r in counted if r["status"] in ("killed", "timeout")]
    pct = 100 * len(dead) / max(1, len(counted))
    print(f"\nkilled {len(dead)} of {len(counted)} ({pct:.0f}%)"
          + (f", {len(results) - len(counted)} equivalent" if len(results) > len(counted) else ""))
    for kind in KINDS:
        rs = [r for r in counted if r["kind"] == kind]
        if rs:
            k = sum(r["status"] in ("killed", "timeout") for r in rs)
            print(f"  {kind:12} {k}/{len(rs)}")
    bad = [r for r in counted if r["status"] not in ("killed", "timeout")]
    for r in bad:
        print(f"{r['status'].upper()}: {r['name']} ({r['file']}): {r['why']}")
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--list", action="store_true", help="check and print the mutants, run nothing")
    p.add_argument("--only", nargs="+", default=None, metavar="NAME", help="run these mutants only")
    p.add_argument("--kind", choices=KINDS, default=None, help="run the mutants of this kind only")
    p.add_argument("-j", type=int, default=2, help="mutants run in parallel (default 2)")
    p.add_argument("--json", default=None, metavar="PATH", help="write the results here")
    p.add_argument("--timeout", type=float, default=600, help="seconds per pytest run (default 600)")
    p.add_argument("--no-baseline", action="store_true", help="skip the baseline run (quick checks only)")
    a = p.parse_args(argv)
    names = [m.name for m in MUTANTS]
    if len(set(names)) != len(names):
        raise ListError(f"duplicate mutant names: {sorted({n for n in names if names.count(n) > 1})}")
    unknown = sorted(set(a.only or []) - set(names))
    if unknown:
        raise ListError(f"no mutant named {', '.join(unknown)}")
    chosen = [m for m in MUTANTS if (a.only is None or m.name in a.only) and (a.kind is None or m.kind == a.kind)]
    for m in chosen:
        mutated_source(m)  # every entry checked before anything runs
    if a.list:
        for m in chosen:
            print(f"{m.name:34} {m.kind:12} {m.file:30} {'EQUIVALENT ' if m.equivalent else ''}{m.why}")
        print(f"{len(chosen)} mutants, the list checked")
        return 0
    t0, files = time.monotonic(), tracked_files()
    if not a.no_baseline:
        baseline(files, sorted({t.split("::")[0] for m in chosen for t in m.tests}), a.timeout)
    results = []
    with ThreadPoolExecutor(max(1, a.j)) as pool:
        futures = [pool.submit(run_mutant, m, files, a.timeout) for m in chosen]
        for f in as_completed(futures):
            r = f.result()
            results.append(r)
            print(f"{r['name']:34} {r['kind']:12} {r['status']:10} {r['seconds']:6.1f} s  {r['first_failure'] or ''}",
                  flush=True)
    results.sort(key=lambda r: names.index(r["name"]))
    status = summary(results)
    wall = time.monotonic() - t0
    print(f"wall time {wall / 60:.1f} min")
    if a.json:
        Path(a.json).write_text(json.dumps({"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
                                            "wall_s": round(wall), "results": results,
                                            "mutants": [asdict(m) for m in chosen]}, indent=1))
    return status


if __name__ == "__main__":
    sys.exit(main())
