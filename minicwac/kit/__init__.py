"""CWAC on your own model and your own data: calibrate a safety kit once, fine-tune with it, evaluate.

    kit = calibrate(model, tok, harmful_prompts, harmless_prompts)      # subspace + SAE + latents + z0
    kit.save("kit/")                                                    # safetensors + JSON, and a report
    kit = Kit.load("kit/", model)                                       # refused if made for another model
    seqs = encode_data(tok, load_conversations("task.jsonl"), max_len=512)
    finetune(model, tok, seqs, kit, "out/", method="cwac", steps=200)   # a Hugging Face folder + history

Everything here takes a model with Hugging Face module names and a chat tokenizer; the method itself is the
core's (`minicwac.core`). The command line (`python -m minicwac calibrate | finetune | eval`) calls these.

    calibration.py the kit: `calibrate`, `Kit` (save, load, the constraints of a method), the report
    finetuning.py  `finetune`: the CWAC loop with checkpoints, resume, FSDP2 ranks, LoRA, a drift curve
    data.py        conversations from JSONL, rendered with the chat template (loss on assistant tokens)
"""
from ..core.settings import KitSettings
from .calibration import Kit, calibrate, fingerprint
from .data import encode_data, load_conversations
from .finetuning import RunOptions, finetune

__all__ = ["Kit", "KitSettings", "calibrate", "finetune", "RunOptions", "load_conversations", "encode_data",
           "fingerprint"]
