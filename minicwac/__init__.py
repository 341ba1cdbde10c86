"""minicwac: learn, test and port CWAC (Coupled Weight and Activation Constraints)."""
from .hf import load_checkpoint, load_pretrained, save_pretrained
from .model import GPT, Config
from .tokenizer import ChatTokenizer, train_bpe
from .world import World, build_world

__all__ = ["GPT", "Config", "ChatTokenizer", "train_bpe", "World", "build_world", "load_pretrained",
           "save_pretrained", "load_checkpoint"]
__version__ = "0.1.0"
