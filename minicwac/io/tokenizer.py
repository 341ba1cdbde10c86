"""Byte-level BPE tokenizer with chat special tokens, chat rendering with an assistant-only loss mask, and real
Hugging Face tokenizer folders in and out.

The tokenizer is a `tokenizers.Tokenizer` (saved as tokenizer.json) plus the few fields that Hugging Face keeps
in tokenizer_config.json: the special tokens and the `chat_template`, a Jinja template rendered the way
transformers' `apply_chat_template` renders it (sandboxed, trim_blocks, lstrip_blocks, the same helpers and
variables). `load_tokenizer` reads a real Hugging Face folder (tokenizer.json, tokenizer_config.json,
chat_template.jinja, special_tokens_map.json, generation_config.json, config.json) the way transformers'
AutoTokenizer does, and `ChatTokenizer.save` writes a folder that AutoTokenizer loads back the same.
"""
from __future__ import annotations

import json
import re
from contextvars import ContextVar
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from jinja2 import nodes, pass_context
from jinja2.exceptions import SecurityError, TemplateError, TemplateSyntaxError
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

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


# A rendered chat may hold at most MAX_RENDER_CHARS characters plus RENDER_CHARS_PER_INPUT_CHAR per character of
# message content: far more than any real template writes (a few hundred characters per turn around the content),
# yet a template whose loops explode stops there instead of taking all memory. Values that a template builds with
# `+`, `*` or `**` are held to the same limit.
MAX_RENDER_CHARS = 1_000_000
RENDER_CHARS_PER_INPUT_CHAR = 10


class ChatTemplateError(TemplateError, ValueError):
    """A chat template that cannot be used: raised by its `raise_exception(...)` (a jinja2 TemplateError, as in
    transformers), or for a template that does not compile, fails while rendering or renders too much. A
    ValueError, so that `python -m minicwac` prints it as one line."""


class ChatTemplateUnsafeError(ChatTemplateError, SecurityError):
    """A chat template tried something the sandbox forbids (a jinja2 SecurityError, as in transformers)."""


class ChatMessagesError(ValueError):
    """Chat messages that are not a list of {"role": str, "content": str} dicts."""


# --- The Jinja environment -----------------------------------------------------------------------------------
# The same options, extensions, filters and globals that transformers gives chat templates, written here so
# that real templates render identically: trim_blocks/lstrip_blocks, {% break %}/{% continue %},
# {% generation %}...{% endgeneration %} (marks the text the assistant generates), raise_exception(), tojson
# (no HTML escaping, non-ASCII kept), strftime_now() (Llama 3.1 writes today's date), dict() and a namespace()
# that refuses underscore names.

# While a chat is rendered for its assistant mask: (pieces rendered so far, spans of {% generation %} blocks).
_generation_track: ContextVar[tuple[list[str], list[tuple[int, int]]] | None] = ContextVar(
    "minicwac_generation_track", default=None)
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
# While a chat is rendered: the most characters a value built by the template may have (see MAX_RENDER_CHARS).
_render_limit: ContextVar[int] = ContextVar("minicwac_render_limit", default=MAX_RENDER_CHARS)


class _GenerationBlock(Extension):
    """`{% generation %}body{% endgeneration %}` renders its body and, while a render is tracked, records the
    character span of the body in the output."""
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_record", []), [], [], body).set_lineno(lineno)

    def _record(self, caller):
        text = caller()
        track = _generation_track.get()
        if track is not None:
            pieces, spans = track  # the pieces yielded so far are exactly the text before this block
            start = sum(len(p) for p in pieces)
            spans.append((start, start + len(text)))
        return text


def _raise_exception(message):
    raise ChatTemplateError(f"chat template error: {_squash(message)}")


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


class _TemplateDict:
    """`dict(...)` and `dict.fromkeys(...)` for templates, without exposing the dict type itself."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


def _check_namespace_name(name):
    if isinstance(name, str) and name.startswith("_"):
        raise SecurityError(f"chat templates cannot store underscore names on a namespace: {name!r}")


class _TemplateNamespace(Namespace):
    """jinja2's namespace(), refusing names that start with an underscore."""

    def __init__(*args, **kwargs):  # noqa: N805 (jinja2's signature, so that namespace(self=...) works)
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _check_namespace_name(name)
        Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _check_namespace_name(name)
        Namespace.__setitem__(self, name, value)


class _TooLarge(Exception):
    """A value the template builds with `operator` would have about `size` characters, more than `limit`."""

    def __init__(self, operator: str, size: int, limit: int):
        super().__init__(operator, size, limit)
        self.operator, self.size, self.limit = operator, size, limit


def _result_size(operator: str, left, right) -> int:
    """About how many characters, items or decimal digits `left <operator> right` would have (0 when unknown)."""
    sized = (str, list, tuple)
    if operator == "+" and isinstance(left, sized) and isinstance(right, sized):
        return len(left) + len(right)
    if operator == "*":
        if isinstance(left, sized) and isinstance(right, int):
            return len(left) * right
        if isinstance(right, sized) and isinstance(left, int):
            return len(right) * left
        if isinstance(left, int) and isinstance(right, int):
            return (left.bit_length() + right.bit_length()) // 3
    if operator == "**" and isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1:
        return left.bit_length() * right // 3
    return 0


class _ChatSandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox, also refusing a `+`, `*` or `**` whose result would pass the render limit: one
    `'a' * 10**10` or `10 ** (10**10)` would otherwise take all memory or hang, before any output is written."""
    intercepted_binops = frozenset({"+", "*", "**"})

    def call_binop(self, context, operator, left, right):
        size, limit = _result_size(operator, left, right), _render_limit.get()
        if size > limit:
            raise _TooLarge(operator, size, limit)
        return super().call_binop(context, operator, left, right)


@pass_context
def _finalize(context, value):
    """Writes each {{ value }} unchanged. Being a context function, it also keeps jinja from evaluating constant
    {{ ... }} expressions while compiling: `{{ 'a' | center(10**9) }}` runs (and fails) at render, not at load."""
    return value


@lru_cache(maxsize=32)
def _compile_template(template: str):
    # optimized=False: no constant folding at compile time either (the same reason as _finalize); the output is
    # the same.
    env = _ChatSandbox(trim_blocks=True, lstrip_blocks=True, optimized=False, finalize=_finalize,
                       extensions=[_GenerationBlock, "jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_TemplateDict(),
                       namespace=_TemplateNamespace)
    return env.from_string(template)


def _checked_template(template, source: str | None = None):
    """`template` compiled, or one line naming `source` (the file it came from, if any) and what is wrong: a
    syntax error with its line in the template, or a template that is not a string or too deeply nested."""
    where = f"{source}: " if source else ""
    if not isinstance(template, str):
        raise ChatTemplateError(f"{where}chat_template must be a Jinja template string (or None), got "
                                f"{_kind(template)}")
    try:
        return _compile_template(template)
    except TemplateSyntaxError as e:
        raise ChatTemplateError(f"{where}chat template syntax error at line {e.lineno} of the template: "
                                f"{_squash(e.message)}") from None
    except (RecursionError, SyntaxError):  # jinja's parser recursion; Python's limit on nested blocks
        raise ChatTemplateError(f"{where}the chat template is nested too deeply to compile") from None
    except Exception as e:
        raise ChatTemplateError(f"{where}the chat template does not compile ({_one_line(e)})") from None


def _template_line(e: BaseException) -> int | None:
    """The template line that raised `e` (the innermost template frame of its traceback), if any."""
    line, tb = None, e.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<template>":
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def _render_failure(e: Exception) -> ChatTemplateError:
    """One line for an exception raised while rendering a chat template; the template's own
    raise_exception(...) message is kept as it is."""
    if isinstance(e, ChatTemplateError):
        return e
    line = _template_line(e)
    at = f" at line {line} of the template" if line else ""
    if isinstance(e, SecurityError):
        return ChatTemplateUnsafeError(f"the chat template tried something unsafe{at}, refused: {_squash(e)}")
    if isinstance(e, _TooLarge):
        return ChatTemplateError(f"the chat template tried to build a value of about {e.size:,} characters with "
                                 f"'{e.operator}'{at}, over the limit of {e.limit:,}; refused")
    if isinstance(e, RecursionError):
        return ChatTemplateError(f"the chat template recursed too deeply{at} (a macro that calls itself without "
                                 "end?), refused")
    return ChatTemplateError(f"the chat template failed{at}: {_one_line(e)}")


def _kind(x) -> str:
    """The type of `x` as an error message names it."""
    return "None" if x is None else type(x).__name__


def _utf8_error(s: str) -> int | None:
    """The index of the first character of `s` that UTF-8 cannot encode (a lone surrogate), or None."""
    if s.isascii():
        return None
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        return e.start
    return None


def _check_text(i: int, key: str, value) -> None:
    if not isinstance(value, str):
        raise ChatMessagesError(f'message {i}: "{key}" must be a string, got {_kind(value)}')
    bad = _utf8_error(value)
    if bad is not None:
        raise ChatMessagesError(f'message {i}: "{key}" has a lone surrogate at character {bad} '
                                f"({value[bad]!r}); expected text that UTF-8 can encode")


def _check_message(i: int, m) -> None:
    """Message `i` is a dict with a non-empty string "role" and a string "content" (which an assistant message
    with "tool_calls" may leave out, as in transformers). Content as a list of parts (multimodal chats) is
    refused: minicwac renders and masks text, and a template that does not expect parts would write their
    Python repr (`| trim` does) or fail."""
    if not isinstance(m, Mapping):
        raise ChatMessagesError(f'message {i}: expected a {{"role": ..., "content": ...}} dict, got {_kind(m)}')
    if "role" not in m:
        raise ChatMessagesError(f'message {i}: no "role"; expected a string such as "user" or "assistant"')
    _check_text(i, "role", m["role"])
    if not m["role"]:
        raise ChatMessagesError(f'message {i}: "role" is empty; expected a string such as "user" or "assistant"')
    content = m.get("content")
    if content is None and m.get("tool_calls"):
        return
    if "content" not in m:
        raise ChatMessagesError(f'message {i}: no "content"; expected a string')
    if isinstance(content, (list, tuple)):
        raise ChatMessagesError(f'message {i}: "content" is a list of parts; minicwac renders text-only chats: '
                                'expected a string (join the parts\' "text")')
    _check_text(i, "content", content)


def _check_messages(messages) -> None:
    """Refuse, in one line naming the message, what is not a non-empty list of chat messages."""
    if not isinstance(messages, (list, tuple)):
        raise ChatMessagesError('messages must be a list of {"role": ..., "content": ...} dicts, got '
                                f"{_kind(messages)}")
    if not messages:
        raise ChatMessagesError('messages is an empty list; expected at least one {"role": ..., "content": ...} '
                                "dict")
    for i, m in enumerate(messages):
        _check_message(i, m)


def _render_limit_for(messages: list[dict]) -> int:
    """The most characters a chat of these messages may render to (see MAX_RENDER_CHARS)."""
    chars = sum(len(m["content"]) for m in messages if isinstance(m.get("content"), str))
    return MAX_RENDER_CHARS + RENDER_CHARS_PER_INPUT_CHAR * chars


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
            _checked_template(template)
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
        template = _compile_template(self.chat_template)
        limit = _render_limit_for(messages)
        pieces, spans, total = [], [], 0
        reset_limit = _render_limit.set(limit)
        reset_track = _generation_track.set((pieces, spans)) if track else None
        stream = template.generate(messages=messages, add_generation_prompt=add_generation_prompt, **variables)
        try:
            for piece in stream:
                pieces.append(piece)
                total += len(piece)
                if total > limit:
                    raise ChatTemplateError(
                        f"the chat template rendered more than {limit:,} characters, refused (the limit is "
                        f"{MAX_RENDER_CHARS:,} plus {RENDER_CHARS_PER_INPUT_CHAR} per character of message content)")
        except Exception as e:
            raise _render_failure(e) from None
        finally:
            stream.close()
            _render_limit.reset(reset_limit)
            if reset_track is not None:
                _generation_track.reset(reset_track)
        return "".join(pieces), spans

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = False, **template_kwargs) -> str:
        """The chat as text, rendered by the Jinja chat template exactly as transformers'
        `apply_chat_template(messages, tokenize=False, ...)` renders it. Extra keyword arguments (tools,
        documents, date_string, ...) are passed to the template.

        `messages` must be a non-empty list of {"role": str, "content": str} dicts (see _check_message); a bad
        message, a template that fails, tries something unsafe or renders more than the render limit
        (MAX_RENDER_CHARS) is a ValueError of one line."""
        _check_messages(messages)
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
        _check_messages(messages)
        tracked = bool(self.chat_template) and _GENERATION_TAG.search(self.chat_template) is not None
        text, spans = self._render(messages, add_generation_prompt, tracked, template_kwargs)
        bad = _utf8_error(text)
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

def _squash(x) -> str:
    """`str(x)` on one line (runs of whitespace, newlines included, become one space)."""
    return " ".join(str(x).split())


def _one_line(e: Exception) -> str:
    return f"{e.__class__.__name__}: " + _squash(e)


def _read_json(f: Path) -> dict:
    try:
        d = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"unreadable tokenizer files: {f} is not valid JSON ({_one_line(e)})") from None
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
        raise ValueError(f"{f}: not UTF-8 text ({_one_line(e)}); expected a Jinja chat template") from None


def _named_templates(t: list, tc: Path) -> dict:
    """tokenizer_config.json's chat_template given as a list of {"name": ..., "template": ...} entries, as a dict."""
    for j, x in enumerate(t):
        if not (isinstance(x, dict) and isinstance(x.get("name"), str) and isinstance(x.get("template"), str)):
            raise ValueError(f'{tc}: chat_template entry {j} is {_kind(x)} {_squash(repr(x))[:80]}; expected a '
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
            raise ValueError(f"{tc}: chat_template 'default' is {_kind(t['default'])}; expected a template string")
        return t["default"], f"{tc} (chat_template 'default')"
    raise ValueError(f"{tc}: chat_template is {_kind(t)}; expected a string or a list of "
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
        raise ValueError(f"unreadable tokenizer files: {tj} is not a `tokenizers` tokenizer.json ({_one_line(e)})") \
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
        _checked_template(template, template_source)  # a syntax error names the file
    return ChatTokenizer(
        tok, template, bos_token=names["bos_token"], eos_token=names["eos_token"],
        pad_token=names["pad_token"], other_special_tokens={k: names[k] for k in _OTHER_NAMED},
        bos_token_id=ids["bos_token_id"][0] if names["bos_token"] is None and ids["bos_token_id"] else None,
        eos_token_ids=ids["eos_token_id"],
        pad_token_id=ids["pad_token_id"][0] if names["pad_token"] is None and ids["pad_token_id"] else None,
        **flags)
