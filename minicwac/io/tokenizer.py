"""Byte-level BPE tokenizer with chat special tokens, chat rendering with an assistant-only loss mask, and real
Hugging Face tokenizer folders in and out.

The tokenizer is a `tokenizers.Tokenizer` (saved as tokenizer.json) plus the few fields that Hugging Face keeps
in tokenizer_config.json: the special tokens and the `chat_template`, a Jinja template that chat_template.py
compiles and renders as transformers' `apply_chat_template` does. `train_bpe` trains the toy model's tokenizer;
`load_tokenizer` reads a real Hugging Face folder (tokenizer.json, tokenizer_config.json, chat_template.jinja,
special_tokens_map.json, generation_config.json, config.json) the way transformers' AutoTokenizer does, and
`ChatTokenizer.save` writes a folder that AutoTokenizer loads back the same.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from .chat_template import (ChatTemplateError, check_messages, checked_template, one_line, render_template, squash,
                            type_name, uses_generation_blocks, utf8_error)

BOS, EOS, PAD = "<|bos|>", "<|end|>", "<|pad|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, "<|system|>", "<|user|>", "<|assistant|>"]

# The named special tokens of a Hugging Face tokenizer, in transformers' order: `apply_chat_template` passes the
# ones that are set to the template as variables of these names.
NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_OTHER_NAMED = ("unk_token", "sep_token", "cls_token", "mask_token")

# The toy model's own chat template. Each turn is `<|role|> content<|end|>`; the space before the content
# makes the first word the same token as inside a sentence ("Ġpositive"), as it is in pretraining text.
TOY_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|> ' + message['content'] + eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


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
    """A `tokenizers.Tokenizer` with bos/eos/pad and a chat template.

    `bos_token`, `eos_token`, `pad_token` (and `other_special_tokens`: unk/sep/cls/mask) are the tokenizer's named
    special tokens, as transformers sees them: the chat template gets them as variables. The ids a model needs
    may also come from generation_config.json / config.json: `bos_token_id` and `pad_token_id` (used only when
    the token is None) and `eos_token_ids` (every id that ends generation; Llama 3 instruct lists several).
    `add_bos_token`/`add_eos_token` are the tokenizer_config.json flags, kept so that `save` writes them back
    (None: not set). Plain text is encoded with special tokens by tokenizer.json's post-processor, as
    transformers does: `encode(text, add_special_tokens=True)`.

    The chat template is compiled when it is set (here or by assigning `chat_template`), so that a syntax error
    is reported then, not at the first chat.
    """

    def __init__(self, tokenizer: Tokenizer, chat_template: str | None = TOY_CHAT_TEMPLATE,
                 bos_token: str | None = BOS, eos_token: str | None = EOS, pad_token: str | None = PAD, *,
                 other_special_tokens: Mapping[str, str | None] | None = None,
                 bos_token_id: int | None = None, eos_token_ids: Sequence[int] = (), pad_token_id: int | None = None,
                 add_bos_token: bool | None = False, add_eos_token: bool | None = False):
        self.tok = tokenizer
        self.chat_template = chat_template
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        self.other_special_tokens = {k: v for k, v in (other_special_tokens or {}).items() if v is not None}
        self.add_bos_token, self.add_eos_token = add_bos_token, add_eos_token
        for key in self.other_special_tokens:
            if key not in _OTHER_NAMED:
                raise ValueError(f"other_special_tokens: {key!r} is not one of {_OTHER_NAMED}")
        for name in (bos_token, eos_token, pad_token, *self.other_special_tokens.values()):
            if name is not None and tokenizer.token_to_id(name) is None:
                raise ValueError(f"special token {name!r} is not in the tokenizer's vocabulary")
        for what, ids in (("bos_token_id", [bos_token_id]), ("eos_token_ids", list(eos_token_ids)),
                          ("pad_token_id", [pad_token_id])):
            for i in ids:
                bad = isinstance(i, bool) or not isinstance(i, int) or tokenizer.id_to_token(i) is None
                if i is not None and bad:
                    raise ValueError(f"{what}: {i!r} is not a token id of the tokenizer "
                                     f"({tokenizer.get_vocab_size()} tokens)")
        for token, i, what in ((bos_token, bos_token_id, "bos"), (pad_token, pad_token_id, "pad")):
            if token is not None and i is not None and tokenizer.token_to_id(token) != i:
                raise ValueError(f"{what}_token {token!r} has id {tokenizer.token_to_id(token)}, not "
                                 f"{what}_token_id {i}")
        if eos_token is None and not list(eos_token_ids):
            raise ValueError("a ChatTokenizer needs an eos_token or eos_token_ids")
        self._bos_token_id, self._pad_token_id = bos_token_id, pad_token_id
        self._eos_token_ids = list(eos_token_ids)

    @property
    def chat_template(self) -> str | None:
        return self._chat_template

    @chat_template.setter
    def chat_template(self, template: str | None) -> None:
        if template is not None:
            checked_template(template)
        self._chat_template = template

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    @property
    def bos_token_id(self) -> int | None:
        return self._bos_token_id if self.bos_token is None else self.tok.token_to_id(self.bos_token)

    @property
    def eos_token_id(self) -> int:
        """The primary end token: eos_token's id (else the first of eos_token_ids)."""
        return self._eos_token_ids[0] if self.eos_token is None else self.tok.token_to_id(self.eos_token)

    @property
    def eos_token_ids(self) -> list[int]:
        """Every id that ends generation, the primary one first."""
        return list(dict.fromkeys([self.eos_token_id, *self._eos_token_ids]))

    @property
    def pad_token_id(self) -> int:
        if self.pad_token is not None:
            return self.tok.token_to_id(self.pad_token)
        return self._pad_token_id if self._pad_token_id is not None else self.eos_token_id

    @property
    def special_tokens_map(self) -> dict[str, str]:
        """The named special tokens that are set, as transformers' `tokenizer.special_tokens_map`."""
        given = {"bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self.pad_token,
                 **self.other_special_tokens}
        return {k: given[k] for k in NAMED_SPECIAL_TOKENS if given.get(k) is not None}

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of plain text. By default no special token is added (what the toy code needs); with
        add_special_tokens=True, tokenizer.json's post-processor adds what transformers' `tokenizer(text)` adds
        (e.g. BOS for Llama and Gemma)."""
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def _render(self, messages: list[dict], add_generation_prompt: bool, track: bool, template_kwargs: dict):
        """The rendered chat and, if `track`, the character spans of its {% generation %} blocks. The messages
        are not checked here (render_chat and encode_chat check them; encode_chat renders prefixes, even the empty
        one). The output is streamed and refused past the render limit; any failure of the template is one
        ChatTemplateError line."""
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat template (tokenizer_config.json has no chat_template and "
                             "there is no chat_template.jinja)")
        # As transformers: keys whose value is None are dropped; the template sees the special tokens, tools and
        # documents (None unless given) and any extra variables (which override the special tokens).
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        variables = {"tools": None, "documents": None, **self.special_tokens_map, **template_kwargs}
        return render_template(self.chat_template, messages, add_generation_prompt, variables, track)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = False, **template_kwargs) -> str:
        """The chat as text, rendered by the Jinja chat template exactly as transformers'
        `apply_chat_template(messages, tokenize=False, ...)` renders it. Extra keyword arguments (tools,
        documents, date_string, ...) are passed to the template.

        `messages` must be a non-empty list of {"role": str, "content": str} dicts (see
        chat_template.check_messages); a bad message, a template that fails, tries something unsafe or renders more
        than the render limit (chat_template.MAX_RENDER_CHARS) is a ValueError of one line."""
        check_messages(messages)
        return self._render(messages, add_generation_prompt, False, template_kwargs)[0]

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = False,
                    **template_kwargs) -> tuple[list[int], list[int]]:
        """Token ids of the rendered chat (no special token added on top of what the template writes, as
        transformers' apply_chat_template), and a mask that is 1 on assistant tokens.

        If the template marks the assistant's text with {% generation %} blocks, the mask is 1 on the tokens that
        overlap a block (transformers' `return_assistant_tokens_mask`). Otherwise the assistant spans are found
        by rendering growing prefixes of the conversation (the text the template adds for assistant turn i is
        what render(messages[:i+1]) adds to render(messages[:i], add_generation_prompt=True): the answer and its
        end token), and a token is an assistant token when its characters lie inside such a span.

        Messages and template are checked as in render_chat.
        """
        check_messages(messages)
        tracked = uses_generation_blocks(self.chat_template)
        text, spans = self._render(messages, add_generation_prompt, tracked, template_kwargs)
        bad = utf8_error(text)
        if bad is not None:  # the tokenizer would raise a bare TypeError
            raise ChatTemplateError(f"the rendered chat has a lone surrogate at character {bad} ({text[bad]!r}), "
                                    "written by the template or a template variable; expected text that UTF-8 "
                                    "can encode")
        enc = self.tok.encode(text, add_special_tokens=False)
        if tracked:
            mask = [int(any(a < e and b > s for s, e in spans)) for a, b in enc.offsets]
            return enc.ids, mask
        for i, m in enumerate(messages):
            if m.get("role") == "assistant":
                before = self._render(messages[:i], True, False, template_kwargs)[0]
                upto = self._render(messages[: i + 1], False, False, template_kwargs)[0]
                if not (text.startswith(upto) and upto.startswith(before)):
                    raise ValueError(
                        f"cannot find assistant turn {i} in the rendered chat: the chat template does not render a "
                        "prefix of the conversation as a prefix of the whole; mark the assistant text with "
                        "{% generation %} ... {% endgeneration %} in the template")
                spans.append((len(before), len(upto)))
        mask = [int(any(s <= a and b <= e for s, e in spans) and b > a) for a, b in enc.offsets]
        return enc.ids, mask

    def save(self, path: str | Path) -> None:
        """Write tokenizer.json and tokenizer_config.json into the folder `path` (created if needed), as
        transformers' AutoTokenizer reads them. Ids that tokenizer_config.json cannot hold (several eos ids; a bos
        or pad id without a bos or pad token) go into generation_config.json, merged into the one already there.
        An existing chat_template.jinja (which would take precedence over tokenizer_config.json) is rewritten
        with this template."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.tok.save(str(path / "tokenizer.json"))
        added = {str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
                          "single_word": t.single_word, "special": t.special}
                 for i, t in sorted(self.tok.get_added_tokens_decoder().items())}
        cfg = {
            "tokenizer_class": "PreTrainedTokenizerFast",  # reads tokenizer.json as it is
            "bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self.pad_token,
            **self.other_special_tokens,
            **({} if self.add_bos_token is None else {"add_bos_token": self.add_bos_token}),
            **({} if self.add_eos_token is None else {"add_eos_token": self.add_eos_token}),
            "clean_up_tokenization_spaces": False,
            "model_max_length": 1_000_000,
            **({"split_special_tokens": True} if getattr(self.tok, "encode_special_tokens", False) else {}),
            "added_tokens_decoder": added,  # as transformers writes it; it also makes special_tokens_map.json unused
        }
        if self.chat_template is not None:
            cfg["chat_template"] = self.chat_template
            if (path / "chat_template.jinja").is_file():
                (path / "chat_template.jinja").write_text(self.chat_template, encoding="utf-8")
        (path / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False), encoding="utf-8")
        gen = {}
        if len(self.eos_token_ids) > 1 or self.eos_token is None:
            gen["eos_token_id"] = self.eos_token_ids if len(self.eos_token_ids) > 1 else self.eos_token_id
        if self.bos_token is None and self._bos_token_id is not None:
            gen["bos_token_id"] = self._bos_token_id
        if self.pad_token is None and self._pad_token_id is not None:
            gen["pad_token_id"] = self._pad_token_id
        if gen:
            f = path / "generation_config.json"
            old = _read_json(f) if f.is_file() else {}
            f.write_text(json.dumps({**old, **gen}, indent=2), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> "ChatTokenizer":
        """Read a folder written by `save`, or any Hugging Face tokenizer folder (see `load_tokenizer`); a folder
        without a chat template gets the toy template."""
        tok = load_tokenizer(path)
        if tok.chat_template is None:
            tok.chat_template = TOY_CHAT_TEMPLATE
        return tok


# --- Reading a Hugging Face tokenizer folder -----------------------------------------------------------------

def _read_json(f: Path) -> dict:
    try:
        d = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"unreadable tokenizer files: {f} is not valid JSON ({one_line(e)})") from None
    except RecursionError:
        raise ValueError(f"unreadable tokenizer files: {f} is nested too deeply") from None
    if not isinstance(d, dict):
        raise ValueError(f"unreadable tokenizer files: {f} holds a JSON {type(d).__name__}; expected an object")
    return d


def _token_name(value, f: Path, key: str) -> str | None:
    """A special token of tokenizer_config.json: a string, a {"content": ...} dict, or null."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"{f}: {key} is {value!r}; expected a token string or a {{\"content\": ...}} dict")


def _config_ids(sources: list[tuple[Path, dict]], key: str) -> tuple[list[int], Path | None]:
    """The ids under `key` in the first of generation_config.json / config.json that sets it (int or list)."""
    for f, d in sources:
        v = d.get(key)
        if v is None:
            continue
        ids = v if isinstance(v, list) else [v]
        if not ids or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise ValueError(f"{f}: {key} is {v!r}; expected a token id or a list of token ids")
        return ids, f
    return [], None


def _read_template(f: Path) -> str:
    try:
        return f.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{f}: not UTF-8 text ({one_line(e)}); expected a Jinja chat template") from None


def _named_templates(t: list, tc: Path) -> dict:
    """tokenizer_config.json's chat_template given as a list of {"name": ..., "template": ...} entries, as a dict."""
    for j, x in enumerate(t):
        if not (isinstance(x, dict) and isinstance(x.get("name"), str) and isinstance(x.get("template"), str)):
            raise ValueError(f'{tc}: chat_template entry {j} is {type_name(x)} {squash(repr(x))[:80]}; expected a '
                             '{"name": <string>, "template": <string>} entry')
    return {x["name"]: x["template"] for x in t}


def _chat_template(path: Path, cfg: dict, tc: Path) -> tuple[str | None, str | None]:
    """The default chat template and where it comes from (for error messages). As transformers: a
    chat_template.jinja file (or chat_templates/default.jinja) takes precedence over tokenizer_config.json's
    chat_template, which is a string or a list of named templates (of which "default" is used)."""
    for f in (path / "chat_templates" / "default.jinja", path / "chat_template.jinja"):  # transformers' order
        if f.is_file():
            return _read_template(f), str(f)
    others = sorted(p.stem for p in (path / "chat_templates").glob("*.jinja"))
    if others:
        raise ValueError(f"{path / 'chat_templates'}: named chat templates {others} but no default; expected "
                         f"{path / 'chat_template.jinja'} or chat_templates/default.jinja")
    t = cfg.get("chat_template")
    if t is None or isinstance(t, str):
        return t, str(tc)
    if isinstance(t, list):
        t = _named_templates(t, tc)
    if isinstance(t, dict):
        if "default" not in t:
            raise ValueError(f"{tc}: chat_template lists the named templates {sorted(map(str, t))} but none is "
                             "named 'default'; expected one named 'default'")
        if not isinstance(t["default"], str):
            raise ValueError(f"{tc}: chat_template 'default' is {type_name(t['default'])}; expected a template string")
        return t["default"], f"{tc} (chat_template 'default')"
    raise ValueError(f"{tc}: chat_template is {type_name(t)}; expected a string or a list of "
                     '{"name": ..., "template": ...} entries')


def load_tokenizer(path: str | Path) -> ChatTokenizer:
    """A Hugging Face tokenizer folder as a ChatTokenizer, read as transformers' AutoTokenizer reads it.

    - tokenizer.json (required): the `tokenizers` tokenizer, with its truncation and padding turned off (as
      transformers' `tokenizer(text)` does); its post-processor decides which special tokens
      `encode(text, add_special_tokens=True)` adds.
    - tokenizer_config.json (optional): the named special tokens (strings or {"content": ...} dicts; null or absent
      allowed), overridden by a legacy special_tokens_map.json when the config has no added_tokens_decoder;
      add_bos_token/add_eos_token; split_special_tokens; the chat template (a string, or a list of named templates
      of which "default" is used), unless a chat_template.jinja file is there, which takes precedence. The
      template is compiled here: a syntax error names the file it is in and its line in the template.
    - generation_config.json, then config.json: eos_token_id (an id or a list) completes eos_token_ids; bos and pad
      ids are used where the tokenizer config has no bos or pad token; an eos id stands in for a missing eos token.
    """
    path = Path(path)
    tj, tc = path / "tokenizer.json", path / "tokenizer_config.json"
    if not tj.is_file():
        raise FileNotFoundError(f"{tj} is missing; expected a Hugging Face tokenizer folder with tokenizer.json "
                                "(a `tokenizers` file; sentencepiece-only folders are not supported)")
    try:
        tok = Tokenizer.from_file(str(tj))
    except Exception as e:  # tokenizers raises a bare Exception
        _read_json(tj)  # names a JSON error as such
        raise ValueError(f"unreadable tokenizer files: {tj} is not a `tokenizers` tokenizer.json ({one_line(e)})") \
            from None
    tok.no_truncation()
    tok.no_padding()
    cfg = _read_json(tc) if tc.is_file() else {}
    source = {k: tc for k in NAMED_SPECIAL_TOKENS}
    stm = path / "special_tokens_map.json"
    if "added_tokens_decoder" not in cfg and stm.is_file():  # transformers reads this legacy file only then
        legacy = _read_json(stm)
        for k in NAMED_SPECIAL_TOKENS:
            if k in legacy:
                cfg[k], source[k] = legacy[k], stm
    names = {k: _token_name(cfg.get(k), source[k], k) for k in NAMED_SPECIAL_TOKENS}
    for k, name in names.items():
        if name is not None and tok.token_to_id(name) is None:
            raise ValueError(f"{source[k]}: {k} {name!r} is not in the vocabulary of {tj}")

    sources = [(f, _read_json(f)) for f in (path / "generation_config.json", path / "config.json") if f.is_file()]
    ids = {}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        found, f = _config_ids(sources, key)
        for i in found:
            if tok.id_to_token(i) is None:
                raise ValueError(f"{f}: {key} {i} is not in the vocabulary of {tj} ({tok.get_vocab_size()} tokens)")
        ids[key] = found
    if names["eos_token"] is None and not ids["eos_token_id"]:
        raise ValueError(f"{path}: no end token; expected eos_token in {tc.name} or eos_token_id in "
                         "generation_config.json or config.json")
    if cfg.get("split_special_tokens"):
        tok.encode_special_tokens = True
    flags = {}
    for k in ("add_bos_token", "add_eos_token"):
        v = cfg.get(k)
        if v is not None and not isinstance(v, bool):
            raise ValueError(f"{tc}: {k} is {v!r}; expected true or false")
        flags[k] = v
    template, template_source = _chat_template(path, cfg, tc)
    if template is not None:
        checked_template(template, template_source)  # a syntax error names the file
    return ChatTokenizer(
        tok, template, bos_token=names["bos_token"], eos_token=names["eos_token"],
        pad_token=names["pad_token"], other_special_tokens={k: names[k] for k in _OTHER_NAMED},
        bos_token_id=ids["bos_token_id"][0] if names["bos_token"] is None and ids["bos_token_id"] else None,
        eos_token_ids=ids["eos_token_id"],
        pad_token_id=ids["pad_token_id"][0] if names["pad_token"] is None and ids["pad_token_id"] else None,
        **flags)
