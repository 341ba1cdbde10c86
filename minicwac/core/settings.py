"""Every setting of the method, declared once, and the one table of methods.

    KitSettings        the constraints: weight targets, subspace energy, the SAE, the safety latents, lambda
    BaselineSettings   the strengths of the baselines (SafeInstr, AsFT, SafeLoRA)
    METHODS            method name -> which weight targets, which activation constraint, which baseline
    TARGETS            a weight-target key -> the regexes on module names it stands for

Each field says where its default comes from: [paper] (Peng et al., arXiv 2604.12384) or [ours] (a choice the
paper leaves open; docs/method.md#9-choices-where-the-paper-is-silent explains each). The toy and real-checkpoint
runs hold a `KitSettings` and a `BaselineSettings` as fields and never re-declare them; the command line reads its
flags and their defaults from these fields (`minicwac.cli.add_setting_flags`).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from .features import check_latents
from .subspace import ALL_LINEARS, DEFAULT_TARGETS

# the regexes on module names behind each weight-target key ("auto" is chosen by a probe: `drift.probe_targets`)
TARGETS = {"down_proj": DEFAULT_TARGETS, "all": ALL_LINEARS,
           "qv": (r"model\.layers\.\d+\.self_attn\.(q|v)_proj",)}  # the LoRA targets of AsFT's and SafeLoRA's papers
TARGET_CHOICES = ("down_proj", "all", "auto")  # what a kit can be calibrated for
AUTO_SHARE = 0.5  # "auto": fixed before any comparison was run, the kinds that carry at least half of the drift

# Offsets added to a run's seed: each random stream of one run has a seed of its own, fixed by the run's seed.
SEED_ALIGN = 1  # the alignment SFT's batches
SEED_FINETUNE = 2  # the fine-tune's batches
SEED_PROBE = 3  # the batches of the probe that chooses the "auto" targets
SEED_SAFETY = 7  # which harmful prompts L_safety reads at each step (`cwac.finetune_cwac`)


def setting(default, help: str, kind: str = "choice", choices: tuple = ()):
    """A dataclass field with its one-line description and the kind of value it takes (the command line reads
    both: `minicwac.cli.add_setting_flags`)."""
    return field(default=default, metadata={"help": help, "kind": kind, "choices": choices})


@dataclass
class KitSettings:
    """The constraint settings: what `calibrate` makes a kit with and what the fine-tune's constraints use."""

    targets: str = setting("down_proj", "weight constraint on every down_proj [paper], every linear of every block "
                           "('all') or the module kinds a short SFT probe lets the most drift through ('auto') [ours]",
                           choices=TARGET_CHOICES)
    energy: float = setting(0.99, "subspace rank: the share of trace(C) the kept eigenvectors hold [ours]",
                            kind="fraction")
    sae_layer: int | None = setting(None, "the SAE reads the residual stream after this many blocks (None: after "
                                    "sae_depth of them) [ours]", kind="positive_int")
    sae_depth: float = setting(0.5, "without --sae-layer, the SAE reads after this share of the blocks, rounded "
                               "down (0.5: the middle block [paper]; a share carries over to models of any depth)",
                               kind="fraction")
    d_sae: int | None = setting(None, "SAE width (None: 8 x hidden) [ours]", kind="positive_int")
    sae_k: int = setting(32, "SAE L0: latents kept by TopK [ours]", kind="positive_int")
    sae_steps: int = setting(2000, "SAE training steps [ours]", kind="positive_int")
    sae_lr: float = setting(1e-3, "SAE learning rate [ours]", kind="positive_float")
    harmful_frac: float = setting(0.7, "share of the SAE's training tokens from harmful prompts [paper: ~70%]",
                                  kind="fraction")
    score: str | None = setting(None, "latent score: mean on harmful prompts ('harmful') or that minus the mean on "
                                "harmless ones ('contrast'; None: contrast when harmless prompts are given) [ours]",
                                choices=("harmful", "contrast"))
    m: int | str = setting(100, "safety latents: the top m by score [paper: 100], or 'firing': every latent that "
                           "fires on the harmful prompts [ours]", kind="latents")
    lam: float = setting(0.5, "weight of L_safety in the loss [paper]", kind="nonnegative")
    safety_batch: int = setting(16, "harmful prompts per step for L_safety [ours]", kind="positive_int")
    skip_prefix: bool = setting(False, "calibrate and constrain without the prompt opening every calibration "
                                "prompt shares (e.g. a chat template's system line) [ours]", kind="flag")
    seed: int = setting(0, "seed of the SAE and of the SAE's data mix", kind="int")
    probe_steps: int = setting(20, "--targets auto: SFT steps of the probe on the fine-tuning data [ours]",
                               kind="positive_int")
    probe_lr: float = setting(2e-5, "--targets auto: the probe's learning rate (finetune's default) [ours]",
                              kind="positive_float")
    probe_batch: int = setting(8, "--targets auto: the probe's batch size [ours]", kind="positive_int")
    auto_share: float = setting(AUTO_SHARE, "--targets auto: constrain the kinds whose summed dW h0 covers this "
                                "share of the probe's total [ours]", kind="fraction")

    def check(self) -> "KitSettings":
        """The settings, or a ValueError naming the first one out of range."""
        if self.targets not in TARGET_CHOICES:
            raise ValueError(f"targets={self.targets!r}, expected one of {', '.join(TARGET_CHOICES)}")
        if self.score not in (None, "harmful", "contrast"):
            raise ValueError(f"score={self.score!r}, expected 'harmful', 'contrast' or None")
        if not 0 < self.auto_share <= 1:
            raise ValueError(f"auto_share={self.auto_share}, expected a fraction in (0, 1]")
        if not (self.probe_steps >= 1 and self.probe_batch >= 1 and self.probe_lr > 0):
            raise ValueError(f"probe_steps={self.probe_steps}, probe_batch={self.probe_batch}, "
                             f"probe_lr={self.probe_lr}: expected positive values")
        if not (self.sae_k >= 1 and self.sae_steps >= 1 and self.safety_batch >= 1 and self.sae_lr > 0):
            raise ValueError(f"sae_k={self.sae_k}, sae_steps={self.sae_steps}, sae_lr={self.sae_lr}, "
                             f"safety_batch={self.safety_batch}: expected positive values")
        if not 0 < self.energy <= 1:
            raise ValueError(f"energy={self.energy}, expected a fraction in (0, 1]")
        if not self.lam >= 0:  # also refuses nan
            raise ValueError(f"lam={self.lam}, expected >= 0")
        if not 0 < self.harmful_frac <= 1:
            raise ValueError(f"harmful_frac={self.harmful_frac}, expected (0, 1]")
        check_latents(self.m)
        return self


# The constraint settings the committed rule chose for real checkpoints on SmolLM2-135M-Instruct's dev seeds
# 100-102, read on HarmBench's prompts (docs/results.md#choosing-the-defaults-the-rule-fixed-before-the-runs; the
# record: docs/results/select-smollm2.json): every linear as weight targets, lambda 0.5 and
# every firing latent, the SAE after 0.8 of the blocks (block 24 of 30). `calibrate`
# and `real` put them over KitSettings' own defaults (the paper's) unless --paper, and `finetune` then runs CWAC
# on the chosen targets (`cwac-all`). None would mean that no rule has chosen: the defaults are then the paper's.
REAL_CHOSEN: dict | None = {"targets": "all", "m": "firing", "sae_depth": 0.8}


def default_settings(base: KitSettings | None = None, paper: bool = False) -> tuple[KitSettings, str]:
    """`base` (default KitSettings(): the paper's settings) with REAL_CHOSEN over it, and which defaults these are:
    "chosen", or "paper" with paper=True or while no rule has chosen."""
    base = KitSettings() if base is None else base
    if paper or REAL_CHOSEN is None:
        return base, "paper"
    return replace(base, **REAL_CHOSEN), "chosen"


@dataclass
class BaselineSettings:
    """The strengths of the baselines (`core.baselines`), as their papers set them where they say."""

    safeinstr_frac: float = setting(0.1, "SafeInstr: share of the fine-tuning set replaced by refusals [ours]",
                                    kind="share")
    asft_lam: float = setting(1.0, "AsFT: weight of its penalty [ours]", kind="nonnegative")
    safelora_threshold: float = setting(0.5, "SafeLoRA: project the layers whose cos(C dW, dW) is below this "
                                        "[SafeLoRA's paper]", kind="float")
    safelora_share: float = setting(10 / 64, "safelora-qv: the share of its targets projected [SafeLoRA's paper: "
                                    "10 of 64]", kind="fraction")

    def check(self) -> "BaselineSettings":
        if not 0 <= self.safeinstr_frac < 1:
            raise ValueError(f"safeinstr_frac={self.safeinstr_frac}, expected [0, 1)")
        if not (self.asft_lam >= 0 and 0 < self.safelora_share <= 1):
            raise ValueError(f"asft_lam={self.asft_lam}, safelora_share={self.safelora_share}: expected >= 0 and "
                             "(0, 1]")
        return self


# ---------------------------------------------------------------- the methods


@dataclass(frozen=True)
class Method:
    """What one fine-tuning method switches on (the CWAC step is the same for all, `core.cwac`)."""

    weight: str | None = None  # the weight constraint's targets: a TARGETS key or "auto" (None: no constraint)
    activation: bool = False  # L_safety on the safety latents
    readout: str = "pre"  # what L_safety compares: pre-TopK latent values [ours], or an ablation's (features.READOUTS)
    baseline: str | None = None  # "safeinstr", "safeinstr-add", "asft", "safelora" or "safelora-number"
    only: str | None = None  # train only these linears (a TARGETS key: where the baseline's paper trains LoRA)
    grad_only: bool = False  # project the gradient only, as the paper words it (not exact under AdamW)
    average: bool = False  # L_safety averaged over the latents (lam / m) instead of summed
    runs: tuple = ("toy",)  # where it is offered: "toy" (experiment), "real" (a real checkpoint), "kit" (finetune)


EVERYWHERE = ("toy", "real", "kit")
METHODS = {
    "sft": Method(runs=EVERYWHERE),  # plain fine-tuning
    "weight": Method("down_proj", runs=EVERYWHERE),  # the weight constraint only
    "activation": Method(activation=True, runs=EVERYWHERE),  # the activation constraint only
    "cwac": Method("down_proj", True, runs=EVERYWHERE),  # both [paper]
    "weight-all": Method("all", runs=EVERYWHERE),  # the weight constraint on the inputs of every linear [ours]
    "cwac-all": Method("all", True, runs=EVERYWHERE),
    "weight-auto": Method("auto", runs=EVERYWHERE),  # on the kinds a short SFT probe's drift map names [ours]
    "cwac-auto": Method("auto", True, runs=EVERYWHERE),
    "safeinstr": Method(baseline="safeinstr", runs=("toy", "real")),  # the baselines, adapted to this harness
    "asft": Method(baseline="asft"),
    "safelora": Method(baseline="safelora"),
    # the baselines as their authors wrote them, but their LoRA adapters on q/v are full dW on q/v: the AsFT penalty
    # and the SafeLoRA projection act on a module's full weight (docs/method.md#6-baselines)
    "safeinstr-add": Method(baseline="safeinstr-add"),
    "asft-qv": Method(baseline="asft", only="qv"),
    "safelora-qv": Method(baseline="safelora-number", only="qv"),
    "weight-gradonly": Method("down_proj", grad_only=True),  # ablations of the method's own choices
    "activation-post": Method(activation=True, readout="post"),
    "cwac-post": Method("down_proj", True, readout="post"),
    "activation-dirs": Method(activation=True, readout="directions"),
    "cwac-dirs": Method("down_proj", True, readout="directions"),
    "activation-residual": Method(activation=True, readout="residual"),
    "activation-avg": Method(activation=True, average=True),
    "cwac-avg": Method("down_proj", True, average=True),
}


def methods_for(run: str) -> tuple[str, ...]:
    """The method names a run offers ("toy", "real" or "kit"), in the table's order."""
    return tuple(name for name, m in METHODS.items() if run in m.runs)


def cwac_method(targets: str | None) -> str:
    """The method that runs CWAC with the weight constraint on `targets` ("down_proj", "all" or "auto"); None:
    plain SFT (a selection grid's reference)."""
    return "sft" if targets is None else {"down_proj": "cwac", "all": "cwac-all", "auto": "cwac-auto"}[targets]


def candidate_name(c: dict | None) -> str:
    """A candidate's folder name (None: SFT), e.g. all-lam32-mfiring or down_proj-lam8-layer24-m100."""
    if c is None:
        return "sft"
    layer = [f"layer{c['sae_layer']}"] if "sae_layer" in c else []
    return "-".join([c["targets"], f"lam{c['lam']:g}", *layer, f"m{c['m']}"])


RUNS = {"toy": "the toy world", "real": "real checkpoints", "kit": "your model (finetune)"}


def method(name: str, run: str = "toy") -> Method:
    """The table's row for `name`, or a ValueError naming the methods `run` offers."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; expected one of {', '.join(methods_for(run))}")
    if run not in METHODS[name].runs:
        raise ValueError(f"method {name!r} is not offered on {RUNS[run]}; expected one of "
                         f"{', '.join(methods_for(run))}")
    return METHODS[name]
