"""Byte-level BPE tokenizer with chat special tokens, and chat rendering with an assistant-only loss mask.

The tokenizer is a `tokenizers.Tokenizer` (saved as tokenizer.json) plus the few fields that Hugging Face keeps
in tokenizer_config.json: the special tokens and the `chat_template`, a Jinja template rendered the way
transformers' `apply_chat_template` renders it (sandboxed, trim_blocks, lstrip_blocks).
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Iterable

from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

BOS, EOS, PAD = "<|bos|>", "<|end|>", "<|pad|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, "<|system|>", "<|user|>", "<|assistant|>"]

# The toy model's own chat template. Each turn is `<|role|> content<|end|>`; the space before the content
# makes the first word the same token as inside a sentence ("Ġpositive"), as it is in pretraining text.
TOY_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|> ' + message['content'] + eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


@lru_cache(maxsize=32)
def _compile_template(template: str):
    def raise_exception(message):
        raise ValueError(f"chat template error: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(x, indent=indent,
                                                                                 ensure_ascii=ensure_ascii)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)


def train_bpe(texts: Iterable[str], vocab_size: int = 1024, special_tokens: list[str] = SPECIAL_TOKENS) -> Tokenizer:
    """Train a byte-level BPE (GPT-2 style pre-tokenization) on `texts`; special tokens get the first ids."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


class ChatTokenizer:
    """A `tokenizers.Tokenizer` with bos/eos/pad and a chat template."""

    def __init__(self, tokenizer: Tokenizer, chat_template: str = TOY_CHAT_TEMPLATE, bos_token: str | None = BOS,
                 eos_token: str = EOS, pad_token: str | None = PAD):
        self.tok = tokenizer
        self.chat_template = chat_template
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        for name in (bos_token, eos_token, pad_token):
            if name is not None and tokenizer.token_to_id(name) is None:
                raise ValueError(f"special token {name!r} is not in the tokenizer's vocabulary")

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    @property
    def bos_token_id(self) -> int | None:
        return None if self.bos_token is None else self.tok.token_to_id(self.bos_token)

    @property
    def eos_token_id(self) -> int:
        return self.tok.token_to_id(self.eos_token)

    @property
    def pad_token_id(self) -> int:
        return self.tok.token_to_id(self.pad_token) if self.pad_token is not None else self.eos_token_id

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """The chat as text, rendered by the Jinja chat template exactly as transformers does."""
        return _compile_template(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "", eos_token=self.eos_token)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
        """Token ids of the rendered chat, and a mask that is 1 on assistant tokens (the answer and its end token).

        The assistant spans are found in the text by rendering growing prefixes of the conversation (the text
        the template adds for turn i is what render(messages[:i+1]) adds to render(messages[:i])); a token is
        an assistant token when its characters lie inside such a span.
        """
        text = self.render_chat(messages, add_generation_prompt)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] == "assistant":
                start = len(self.render_chat(messages[:i], add_generation_prompt=True))
                end = len(self.render_chat(messages[: i + 1]))
                spans.append((start, end))
        enc = self.tok.encode(text, add_special_tokens=False)
        mask = [int(any(s <= a and b <= e for s, e in spans) and b > a) for a, b in enc.offsets]
        return enc.ids, mask

    def save(self, path: str | Path) -> None:
        """Write tokenizer.json and tokenizer_config.json into the folder `path`."""
        path = Path(path)
        self.tok.save(str(path / "tokenizer.json"))
        cfg = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self.pad_token,
            "add_bos_token": False,  # the chat template writes BOS itself
            "clean_up_tokenization_spaces": False,
            "model_max_length": 1_000_000,
            "chat_template": self.chat_template,
        }
        (path / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))

    @classmethod
    def load(cls, path: str | Path) -> "ChatTokenizer":
        """Read a folder written by `save` (or a Hugging Face folder with tokenizer.json + tokenizer_config.json)."""
        path = Path(path)
        tj, tc = path / "tokenizer.json", path / "tokenizer_config.json"
        for f in (tj, tc):
            if not f.is_file():
                raise FileNotFoundError(f"{f} is missing; expected a tokenizer folder with tokenizer.json and "
                                        "tokenizer_config.json")
        try:
            tok = Tokenizer.from_file(str(tj))
            cfg = json.loads(tc.read_text())
        except Exception as e:
            raise ValueError(f"{path}: unreadable tokenizer files ({e.__class__.__name__}: {e})") from None

        def name(v):  # tokenizer_config stores a special token as a string or as {"content": ...}
            return v["content"] if isinstance(v, dict) else v

        return cls(tok, cfg.get("chat_template") or TOY_CHAT_TEMPLATE, bos_token=name(cfg.get("bos_token")),
                   eos_token=name(cfg["eos_token"]), pad_token=name(cfg.get("pad_token")))
