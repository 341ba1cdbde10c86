"""The method core: token ids, prompts and Hugging Face module names in; no toy world, no model class of its own.

    hooks      reach a layer by name (capture, residual stream after L blocks with an early stop)
    data       sequences with a loss mask, padding, batches, the LM loss, the schedule
    subspace   weight side: S from the inputs of the target linears, W <- W - (W S - W0S) S^T
    sae        a TopK sparse autoencoder, its training and its metrics
    features   activation side: safety-critical latents, z0, L_safety
    cwac       the CWAC step and the one training loop
    baselines  SafeInstr, AsFT, SafeLoRA in the same harness
    lora       LoRA adapters with the weight constraint made exact on them (A S = 0); PEFT adapter folders
    drift      where drift enters: dW h0 and W0 dh for every linear, the residual stream's drift by layer
    evals      refusals: HS, compliance, over-refusal, refusal score
    files      atomic folders and JSON, the cache folder
    settings   every constraint setting, declared once (KitSettings, BaselineSettings), and the method table
"""
from .cwac import Constraints, Schedule, cwac_step, finetune_cwac, train
from .evals import evaluate_prompts, is_refusal
from .features import SafetyFeatures, safety_features, score_latents, select_latents
from .hooks import capture, residual
from .sae import SAE, SAEConfig, train_sae
from .settings import METHODS, TARGETS, BaselineSettings, KitSettings
from .subspace import ALL_LINEARS, DEFAULT_TARGETS, Subspace, compute_subspace

__all__ = ["Constraints", "Schedule", "cwac_step", "finetune_cwac", "train", "KitSettings", "BaselineSettings",
           "METHODS", "TARGETS", "evaluate_prompts", "is_refusal", "SafetyFeatures",
           "safety_features", "score_latents", "select_latents", "capture", "residual", "SAE", "SAEConfig",
           "train_sae", "ALL_LINEARS", "DEFAULT_TARGETS", "Subspace", "compute_subspace"]
