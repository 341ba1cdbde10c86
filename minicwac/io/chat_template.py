"""Chat templates: Jinja templates compiled and rendered the way transformers' `apply_chat_template` renders
them, in a sandbox.

The environment has the options, extensions, filters and globals transformers gives chat templates (see "The
Jinja environment" below), so real templates render identically; `{% generation %}` blocks mark the assistant's
text for the loss mask. A template is compiled once (`checked_template`: a syntax error is one line with its line
in the template), chat messages are checked before rendering (`check_messages`), and a render is refused in one
line when the template tries something the sandbox forbids, recurses without end, or writes (or builds) more than
the render limit (MAX_RENDER_CHARS). `render_template` streams one render; the tokenizer (tokenizer.py) holds the
template and the special tokens it is rendered with.
"""
from __future__ import annotations

import json
import re
from contextvars import ContextVar
from datetime import datetime
from functools import lru_cache
from typing import Mapping

from jinja2 import nodes, pass_context
from jinja2.exceptions import SecurityError, TemplateError, TemplateSyntaxError
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace


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
    raise ChatTemplateError(f"chat template error: {squash(message)}")


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
def _compiled(template: str):
    # optimized=False: no constant folding at compile time either (the same reason as _finalize); the output is
    # the same.
    env = _ChatSandbox(trim_blocks=True, lstrip_blocks=True, optimized=False, finalize=_finalize,
                       extensions=[_GenerationBlock, "jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_TemplateDict(),
                       namespace=_TemplateNamespace)
    return env.from_string(template)


# --- Compiling and rendering failures, each one line ---------------------------------------------------------
def checked_template(template, source: str | None = None):
    """`template` compiled, or one line naming `source` (the file it came from, if any) and what is wrong: a
    syntax error with its line in the template, or a template that is not a string or too deeply nested."""
    where = f"{source}: " if source else ""
    if not isinstance(template, str):
        raise ChatTemplateError(f"{where}chat_template must be a Jinja template string (or None), got "
                                f"{type_name(template)}")
    try:
        return _compiled(template)
    except TemplateSyntaxError as e:
        raise ChatTemplateError(f"{where}chat template syntax error at line {e.lineno} of the template: "
                                f"{squash(e.message)}") from None
    except (RecursionError, SyntaxError):  # jinja's parser recursion; Python's limit on nested blocks
        raise ChatTemplateError(f"{where}the chat template is nested too deeply to compile") from None
    except Exception as e:
        raise ChatTemplateError(f"{where}the chat template does not compile ({one_line(e)})") from None


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
        return ChatTemplateUnsafeError(f"the chat template tried something unsafe{at}, refused: {squash(e)}")
    if isinstance(e, _TooLarge):
        return ChatTemplateError(f"the chat template tried to build a value of about {e.size:,} characters with "
                                 f"'{e.operator}'{at}, over the limit of {e.limit:,}; refused")
    if isinstance(e, RecursionError):
        return ChatTemplateError(f"the chat template recursed too deeply{at} (a macro that calls itself without "
                                 "end?), refused")
    return ChatTemplateError(f"the chat template failed{at}: {one_line(e)}")


# --- Chat messages -------------------------------------------------------------------------------------------
def utf8_error(s: str) -> int | None:
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
        raise ChatMessagesError(f'message {i}: "{key}" must be a string, got {type_name(value)}')
    bad = utf8_error(value)
    if bad is not None:
        raise ChatMessagesError(f'message {i}: "{key}" has a lone surrogate at character {bad} '
                                f"({value[bad]!r}); expected text that UTF-8 can encode")


def _check_message(i: int, m) -> None:
    """Message `i` is a dict with a non-empty string "role" and a string "content" (which an assistant message
    with "tool_calls" may leave out, as in transformers). Content as a list of parts (multimodal chats) is
    refused: minicwac renders and masks text, and a template that does not expect parts would write their
    Python repr (`| trim` does) or fail."""
    if not isinstance(m, Mapping):
        raise ChatMessagesError(f'message {i}: expected a {{"role": ..., "content": ...}} dict, got {type_name(m)}')
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


def check_messages(messages) -> None:
    """Refuse, in one line naming the message, what is not a non-empty list of chat messages."""
    if not isinstance(messages, (list, tuple)):
        raise ChatMessagesError('messages must be a list of {"role": ..., "content": ...} dicts, got '
                                f"{type_name(messages)}")
    if not messages:
        raise ChatMessagesError('messages is an empty list; expected at least one {"role": ..., "content": ...} '
                                "dict")
    for i, m in enumerate(messages):
        _check_message(i, m)


# --- Rendering -----------------------------------------------------------------------------------------------
def _render_limit_for(messages: list[dict]) -> int:
    """The most characters a chat of these messages may render to (see MAX_RENDER_CHARS)."""
    chars = sum(len(m["content"]) for m in messages if isinstance(m.get("content"), str))
    return MAX_RENDER_CHARS + RENDER_CHARS_PER_INPUT_CHAR * chars


def uses_generation_blocks(template: str | None) -> bool:
    """Whether `template` marks the assistant's text with {% generation %} ... {% endgeneration %} blocks."""
    return bool(template) and _GENERATION_TAG.search(template) is not None


def render_template(template: str, messages: list[dict], add_generation_prompt: bool, variables: dict,
                    track: bool = False) -> tuple[str, list[tuple[int, int]]]:
    """The chat rendered by `template` (with `messages`, `add_generation_prompt` and the other `variables`) and, if
    `track`, the character spans of its {% generation %} blocks. The messages are not checked here (see
    check_messages). The output is streamed and refused past the render limit; any failure of the template is one
    ChatTemplateError line."""
    compiled = _compiled(template)
    limit = _render_limit_for(messages)
    pieces, spans, total = [], [], 0
    reset_limit = _render_limit.set(limit)
    reset_track = _generation_track.set((pieces, spans)) if track else None
    stream = compiled.generate(messages=messages, add_generation_prompt=add_generation_prompt, **variables)
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


# --- One-line error messages ---------------------------------------------------------------------------------
def type_name(x) -> str:
    """The type of `x` as an error message names it."""
    return "None" if x is None else type(x).__name__


def squash(x) -> str:
    """`str(x)` on one line (runs of whitespace, newlines included, become one space)."""
    return " ".join(str(x).split())


def one_line(e: Exception) -> str:
    """An exception as one line: its class name, then its message squashed."""
    return f"{e.__class__.__name__}: " + squash(e)
