"""minicwac: learn, test and port CWAC (Coupled Weight and Activation Constraints)."""
from .cwac import finetune_cwac
from .features import SafetyFeatures, safety_features, score_latents, select_latents
from .hf import load_checkpoint, load_pretrained, load_tokenizer, save_pretrained
from .model import GPT, Config
from .sae import SAE, SAEConfig, train_sae
from .subspace import Subspace, compute_subspace
from .tokenizer import ChatTokenizer, train_bpe
from .world import World, build_world

__all__ = ["GPT", "Config", "ChatTokenizer", "train_bpe", "World", "build_world", "load_pretrained", "load_tokenizer",
           "save_pretrained", "load_checkpoint", "Subspace", "compute_subspace", "SAE", "SAEConfig", "train_sae",
           "SafetyFeatures", "safety_features", "score_latents", "select_latents", "finetune_cwac"]
__version__ = "0.1.0"
