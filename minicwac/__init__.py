"""minicwac: learn, test and port CWAC (Coupled Weight and Activation Constraints)."""
from .core import (SAE, SafetyFeatures, SAEConfig, Subspace, compute_subspace, cwac_step, finetune_cwac,
                   safety_features, score_latents, select_latents, train_sae)
from .io.hf import load_checkpoint, load_pretrained, load_tokenizer, save_pretrained
from .io.model import GPT, Config
from .io.tokenizer import ChatTokenizer, train_bpe

__all__ = ["GPT", "Config", "ChatTokenizer", "train_bpe", "load_pretrained", "load_tokenizer", "save_pretrained",
           "load_checkpoint", "Subspace", "compute_subspace", "SAE", "SAEConfig", "train_sae", "SafetyFeatures",
           "safety_features", "score_latents", "select_latents", "finetune_cwac", "cwac_step"]
__version__ = "0.1.0"
