"""minicwac: learn, test and port CWAC (Coupled Weight and Activation Constraints).

The package by layer (each imports only the ones above it):

    core/     the method: subspace, SAE, safety features, the CWAC step and loop, drift map, evals, settings
    io/       checkpoint IO: the model class, config.json rules, tokenizer, chat templates, HF folders, FSDP2,
              prompt files, wheels fetched with pip
    kit/      your model and data: calibrate a safety kit, fine-tune with it, evaluate
    toy/      the toy safety world: pretrain -> align -> fine-tune, the method experiment, settings selection
    tools/    around the method: real checkpoints, benchmarks, the memory plan, reports, the drift-map command
    cli.py, __main__.py   the command line (`python -m minicwac COMMAND`)
    integrations.py       CWAC inside transformers' Trainer and TRL's SFTTrainer (`add_cwac`); the one module
                          that imports transformers, so it is never loaded from here

The names below are loaded on first use, so `import minicwac.core` loads the core only.
"""
from importlib import import_module

_EXPORTS = {  # name -> the module that defines it
    "SAE": "core.sae", "SAEConfig": "core.sae", "train_sae": "core.sae",
    "Subspace": "core.subspace", "compute_subspace": "core.subspace",
    "SafetyFeatures": "core.features", "safety_features": "core.features", "score_latents": "core.features",
    "select_latents": "core.features",
    "cwac_step": "core.cwac", "finetune_cwac": "core.cwac", "Schedule": "core.cwac", "Constraints": "core.cwac",
    "KitSettings": "core.settings", "METHODS": "core.settings",
    "load_checkpoint": "io.hf", "load_pretrained": "io.hf", "save_pretrained": "io.hf",
    "load_tokenizer": "io.tokenizer", "ChatTokenizer": "io.tokenizer", "train_bpe": "io.tokenizer",
    "GPT": "io.model", "Config": "io.config",
    "Kit": "kit", "calibrate": "kit", "finetune": "kit", "RunOptions": "kit", "encode_data": "kit",
    "load_conversations": "kit",
}
__all__ = list(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'minicwac' has no attribute {name!r}")
    value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # loaded once
    return value


def __dir__():
    return sorted(list(globals()) + __all__)
