"""Bad chat inputs are named in one line: messages that are not a list of {"role": str, "content": str} dicts,
templates that do not compile (reported when the tokenizer is built or loaded, naming the file), templates that
fail, try something unsafe or render too much. Valid chats render exactly as before."""
from __future__ import annotations

import json
import time
import tracemalloc

import pytest
from jinja2.exceptions import SecurityError, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from minicwac.io.chat_template import (MAX_RENDER_CHARS, RENDER_CHARS_PER_INPUT_CHAR, ChatMessagesError, ChatTemplateError,
                                       ChatTemplateUnsafeError)
from minicwac.io.tokenizer import TOY_CHAT_TEMPLATE, ChatTokenizer, load_tokenizer

USER = {"role": "user", "content": "How do I bake bread?"}
BOT = {"role": "assistant", "content": "Mix flour and water."}
CHAT = [USER, BOT]


def with_template(tok, template) -> ChatTokenizer:
    return ChatTokenizer(tok.tok, chat_template=template)


def one_line(exc_info, fragment: str) -> str:
    """The error's message, checked to be one line containing `fragment`, from a ValueError (which
    `python -m minicwac` prints as `minicwac: error: ...`)."""
    msg = str(exc_info.value)
    assert isinstance(exc_info.value, ValueError), type(exc_info.value)
    assert "\n" not in msg and fragment in msg, msg
    return msg


# --- messages ------------------------------------------------------------------------------------------------

BAD_MESSAGES = {  # id: (messages, the error fragment)
    "string": ("How do I bake bread?", 'messages must be a list of {"role": ..., "content": ...} dicts, got str'),
    "one_dict": (USER, "messages must be a list of"),
    "none": (None, "got None"),
    "empty": ([], "messages is an empty list"),
    "message_is_string": (["hi"], 'message 0: expected a {"role": ..., "content": ...} dict, got str'),
    "batch_of_chats": ([CHAT], "message 0: expected a {"),
    "no_role": ([{"content": "x"}], 'message 0: no "role"'),
    "role_none": ([{"role": None, "content": "x"}], 'message 0: "role" must be a string, got None'),
    "role_int": ([USER, {"role": 3, "content": "x"}], 'message 1: "role" must be a string, got int'),
    "role_empty": ([{"role": "", "content": "x"}], 'message 0: "role" is empty'),
    "no_content": ([USER, {"role": "assistant"}], 'message 1: no "content"; expected a string'),
    "content_none": ([USER, {"role": "assistant", "content": None}], 'message 1: "content" must be a string, got None'),
    "content_int": ([USER, BOT, {"role": "user", "content": 5}], 'message 2: "content" must be a string, got int'),
    "content_dict": ([{"role": "user", "content": {"text": "x"}}], '"content" must be a string, got dict'),
    "content_bytes": ([{"role": "user", "content": b"x"}], '"content" must be a string, got bytes'),
    "content_parts": ([{"role": "user", "content": [{"type": "text", "text": "x"}]}],
                      'message 0: "content" is a list of parts; minicwac renders text-only chats'),
    "content_image": ([USER, BOT, {"role": "user", "content": [{"type": "image"}]}], 'message 2: "content" is a list'),
    "lone_surrogate": ([{"role": "user", "content": "caf\ud800"}],
                       'message 0: "content" has a lone surrogate at character 3'),
}


@pytest.mark.parametrize("messages, fragment", list(BAD_MESSAGES.values()), ids=list(BAD_MESSAGES))
def test_bad_messages_are_named(tok, messages, fragment):
    """render_chat and encode_chat refuse bad messages before rendering, naming the message and what is wrong."""
    for call in (tok.render_chat, tok.encode_chat):
        with pytest.raises(ChatMessagesError) as e:
            call(messages)
        one_line(e, fragment)


def test_good_message_forms(tok):
    """A tuple of messages, extra keys, an empty content and an assistant turn with tool_calls but no content
    (as transformers allows) are accepted."""
    assert tok.render_chat(tuple(CHAT)) == tok.render_chat(CHAT)
    assert tok.render_chat([{**USER, "name": "ann"}, {"role": "assistant", "content": ""}]) == \
        "<|bos|><|user|> How do I bake bread?<|end|><|assistant|> <|end|>"
    tpl = ("{% for m in messages %}{{ m['role'] }}:{% if m['tool_calls'] is defined %}"
           "{{ m['tool_calls'] | tojson }}{% else %}{{ m['content'] }}{% endif %};{% endfor %}")
    call = [USER, {"role": "assistant", "content": None, "tool_calls": [{"name": "f"}]}]
    assert with_template(tok, tpl).render_chat(call) == 'user:How do I bake bread?;assistant:[{"name": "f"}];'


# --- templates that fail while rendering ---------------------------------------------------------------------

BAD_RENDERS = {  # id: (template, messages, the error fragment)
    "raise_exception": ("{{ raise_exception('only\nuser turns') }}", CHAT, "chat template error: only user turns"),
    "raise_exception_no_arg": ("{{ raise_exception() }}", CHAT,
                               "the chat template failed at line 1 of the template: TypeError"),
    "undefined": ("a\nb\n{{ messages[0].x.y }}", CHAT, "failed at line 3 of the template: UndefinedError"),
    "toy_template_on_tool_call": (TOY_CHAT_TEMPLATE, [USER, {"role": "assistant", "tool_calls": [{"name": "f"}]}],
                                  "UndefinedError: 'dict object' has no attribute 'content'"),
    "division_by_zero": ("{{ 1 / 0 }}", CHAT, "ZeroDivisionError: division by zero"),
    "include": ("{% include 'other.jinja' %}", CHAT, "TypeError: no loader"),
    "range_too_big": ("{{ range(1000000) | list }}", CHAT, "OverflowError: Range too big"),
    "bad_helper_argument": ("{{ strftime_now(5) }}", CHAT, "TypeError"),
    "recursion": ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", CHAT, "the chat template recursed too deeply"),
    "huge_repeat": ("{{ 'a' * 10**10 }}", CHAT, "a value of about 10,000,000,000 characters with '*' at line 1"),
    "huge_power": ("{{ 10 ** (10 ** 10) }}", CHAT, "with '**'"),
    "doubling_loop": (("{% set ns = namespace(s='ab') %}{% for i in range(60) %}{% set ns.s = ns.s + ns.s %}"
                       "{% endfor %}{{ ns.s }}"), CHAT, "characters with '+'"),
}


@pytest.mark.parametrize("template, messages, fragment", list(BAD_RENDERS.values()), ids=list(BAD_RENDERS))
def test_bad_templates_fail_in_one_line(tok, template, messages, fragment):
    """A template that fails while rendering: one ChatTemplateError line (the template's line when known), from
    render_chat and encode_chat alike."""
    t = with_template(tok, template)
    for call in (t.render_chat, t.encode_chat):
        with pytest.raises(ChatTemplateError) as e:
            call(messages)
        one_line(e, fragment)


def test_lone_surrogate_written_by_the_template(tok):
    """A template may write text the tokenizer cannot take: render_chat returns it, encode_chat names it."""
    t = with_template(tok, "{{ messages[0]['content'] }}{{ '\\ud800' }}")
    assert t.render_chat([USER]) == USER["content"] + "\ud800"
    with pytest.raises(ChatTemplateError) as e:
        t.encode_chat([USER])
    one_line(e, "the rendered chat has a lone surrogate at character 20")


# --- the sandbox ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("template, fragment", [
    ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "is unsafe"),
    ("{% set _ = messages.append(1) %}", "append"),
    ("{% set ns = namespace(_x=1) %}", "underscore names on a namespace: '_x'"),
    ("line 1\n{{ messages.pop() }}", "at line 2 of the template"),
], ids=["python_internals", "mutate_messages", "namespace_underscore", "line"])
def test_sandbox_violation_is_one_line(tok, template, fragment):
    """A sandbox violation is refused in one line naming what jinja refused; still a SecurityError (as in
    transformers) and a ValueError."""
    t = with_template(tok, template)
    messages = [dict(USER)]
    with pytest.raises(ChatTemplateUnsafeError) as e:
        t.render_chat(messages)
    assert isinstance(e.value, SecurityError) and isinstance(e.value, TemplateError)
    msg = one_line(e, fragment)
    assert msg.startswith("the chat template tried something unsafe") and "refused" in msg
    assert messages == [USER]


# --- templates that do not compile: refused when set or loaded -----------------------------------------------

BAD_TEMPLATES = {  # id: (template, the error fragment)
    "unclosed_for": ("{% for m in messages %}{{ m['content'] }}",
                     "chat template syntax error at line 1 of the template: Unexpected end of template"),
    "bad_expression": ("line 1\nline 2\n{{ foo( }}", "syntax error at line 3 of the template: unexpected '}'"),
    "unclosed_generation": ("{% generation %}{{ messages[0]['content'] }}", "syntax error at line 1"),
    "unknown_tag": ("{% include_raw 'x' %}", "Encountered unknown tag 'include_raw'"),
    "nested_parentheses": ("{{ " + "(" * 300 + "1" + ")" * 300 + " }}", "nested too deeply to compile"),
    "nested_blocks": ("{% if true %}" * 120 + "x" + "{% endif %}" * 120, "nested too deeply to compile"),
    "not_a_string": (12345, "chat_template must be a Jinja template string (or None), got int"),
    "named_list": ([{"name": "default", "template": "x"}], "got list"),
}


@pytest.mark.parametrize("template, fragment", list(BAD_TEMPLATES.values()), ids=list(BAD_TEMPLATES))
def test_bad_template_refused_when_set(tok, template, fragment):
    """A template that does not compile is refused by ChatTokenizer(...) and by assigning chat_template (which
    then keeps the template it had), not at the first chat."""
    with pytest.raises(ChatTemplateError) as e:
        with_template(tok, template)
    one_line(e, fragment)
    t = with_template(tok, TOY_CHAT_TEMPLATE)
    with pytest.raises(ChatTemplateError):
        t.chat_template = template
    assert t.chat_template == TOY_CHAT_TEMPLATE


def test_compiling_evaluates_nothing(tok):
    """Building a tokenizer runs no part of its template: constant expressions are not folded at compile time
    (a hostile template would otherwise take memory or time at load); they fail at render instead."""
    tracemalloc.start()
    try:
        for template in ("{{ 'x' | center(50000000) }}", "{{ 'x' * 50000000 }}", "{{ [0] * 50000000 }}"):
            with_template(tok, template)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 10_000_000, peak


def write_folder(tok, path, **config):
    """tok's folder, with tokenizer_config.json entries replaced (None: removed)."""
    tok.save(path)
    f = path / "tokenizer_config.json"
    cfg = json.loads(f.read_text())
    for k, v in config.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    f.write_text(json.dumps(cfg))
    return path


BROKEN = "{{ bos_token }}\n{% for m in messages %}\n{{ m['content'] }\n{% endfor %}"  # line 3: '}' for '}}'


@pytest.mark.parametrize("where", ["tokenizer_config", "named_default", "chat_template.jinja"])
def test_syntax_error_reported_at_load_naming_the_file(tok, tmp_path, where):
    """load_tokenizer compiles the template: a syntax error names the file it came from and the template line."""
    if where == "tokenizer_config":
        folder, source = write_folder(tok, tmp_path, chat_template=BROKEN), "tokenizer_config.json"
    elif where == "named_default":
        named = [{"name": "tool_use", "template": "ok"}, {"name": "default", "template": BROKEN}]
        folder = write_folder(tok, tmp_path, chat_template=named)
        source = "tokenizer_config.json (chat_template 'default')"
    else:
        folder, source = write_folder(tok, tmp_path, chat_template="{{ 'stale' }}"), "chat_template.jinja"
        (folder / "chat_template.jinja").write_text(BROKEN)
    for load in (load_tokenizer, ChatTokenizer.load):
        with pytest.raises(ChatTemplateError) as e:
            load(folder)
        msg = one_line(e, str(folder / source.split()[0]))
        assert f"{source}: chat template syntax error at line 3 of the template" in msg, msg


@pytest.mark.parametrize("value, fragment", [
    (5, "chat_template is int; expected a string or a list of"),
    (True, "chat_template is bool"),
    ({"tool_use": "x"}, "none is named 'default'"),
    ([{"name": "tool_use", "template": "x"}], "lists the named templates ['tool_use'] but none is named 'default'"),
    ([{"name": 1, "template": "x"}], "chat_template entry 0 is dict"),
    ([{"name": "default", "template": "x"}, "oops"], "chat_template entry 1 is str"),
    ([{"name": "default", "template": None}], "chat_template entry 0 is dict"),
    ({"default": 3}, "chat_template 'default' is int; expected a template string"),
], ids=["int", "bool", "dict_without_default", "list_without_default", "name_not_string", "entry_not_dict",
        "template_none", "default_not_string"])
def test_bad_chat_template_in_tokenizer_config(tok, tmp_path, value, fragment):
    """A chat_template that is neither a string nor a list of named templates with a "default" is refused at load,
    naming tokenizer_config.json."""
    folder = write_folder(tok, tmp_path, chat_template=value)
    with pytest.raises(ValueError) as e:
        load_tokenizer(folder)
    assert str(folder / "tokenizer_config.json") in one_line(e, fragment)


def test_chat_template_jinja_not_utf8(tok, tmp_path):
    folder = write_folder(tok, tmp_path)
    (folder / "chat_template.jinja").write_bytes(b"\xff\xfe{{ bos_token }}")
    with pytest.raises(ValueError) as e:
        load_tokenizer(folder)
    one_line(e, f"{folder / 'chat_template.jinja'}: not UTF-8 text")


def test_named_templates_use_default(tok, tmp_path):
    """A list of named templates (as Hugging Face allows): "default" is the chat template."""
    named = [{"name": "tool_use", "template": "TOOLS {{ tools }}"}, {"name": "default", "template": TOY_CHAT_TEMPLATE}]
    t = load_tokenizer(write_folder(tok, tmp_path, chat_template=named))
    assert t.chat_template == TOY_CHAT_TEMPLATE and t.render_chat(CHAT) == tok.render_chat(CHAT)


# --- the rendered length -------------------------------------------------------------------------------------

def test_render_length_is_bounded(tok):
    """A template whose loops explode the output stops at the limit, quickly and without holding the whole."""
    explode = "{% for i in range(100000) %}{% for j in range(100000) %}xxxxxxxxxx{% endfor %}{% endfor %}"
    t = with_template(tok, explode)
    limit = MAX_RENDER_CHARS + RENDER_CHARS_PER_INPUT_CHAR * len(USER["content"])
    for call in (t.render_chat, t.encode_chat):
        start = time.perf_counter()
        with pytest.raises(ChatTemplateError) as e:
            call([USER])
        one_line(e, f"the chat template rendered more than {limit:,} characters, refused")
        assert time.perf_counter() - start < 5
    # inside a {% generation %} block (rendered whole before it is written), the limit still holds
    block = "{% generation %}{% for i in range(100000) %}{{ 'x' * 50 }}{% endfor %}{% endgeneration %}"
    with pytest.raises(ChatTemplateError) as e:
        with_template(tok, block).encode_chat([USER])
    one_line(e, "rendered more than")


def test_render_limit_grows_with_the_input(tok):
    """Long content is not refused: the limit grows by RENDER_CHARS_PER_INPUT_CHAR per character of content."""
    content = "word " * 40_000  # 200,000 characters, written 6 times: 1.2 million, under 1 + 10 * 0.2 million
    t = with_template(tok, "{% for i in range(6) %}{{ messages[0]['content'] }}{% endfor %}")
    assert len(t.render_chat([{"role": "user", "content": content}])) == 6 * len(content)


# --- valid chats: unchanged ----------------------------------------------------------------------------------

VALID_TEMPLATES = {
    "toy": TOY_CHAT_TEMPLATE,
    "blocks": ("{% for m in messages %}\n    {% if m['role'] == 'user' %}\nUser: {{ m['content'] }}\n"
               "    {% else %}\nBot: {{ m['content'] }}\n    {% endif %}\n{% endfor %}\n"
               "{% if add_generation_prompt %}\nBot:\n{% endif %}"),
    "constants": ("{{ 'a' ~ (1 + 2) }}|{{ none }}|{{ [1, 2] + [3] }}|{{ 2 ** 10 }}|{{ 'ab' * 3 }}|{{ 3 * 'x' }}|"
                  "{{ 7 // 2 }}|{{ 1.5 * 2 }}|{{ true }}|{{ {'a': 1} }}|{{ 'x' | center(5) }}|{{ (1, 2) + (3,) }}|"
                  "{{ -2 ** 3 }}|{{ 'é' | upper }}|{{ [3, 1, 2] | sort | join(',') }}|{{ undefined_name }}|"),
    "macro_set_filter": ("{% macro turn(m) %}[{{ m.role }}]{{ m.content | trim }}{% endmacro %}"
                         "{% set n %}{{ messages | length }} turns{% endset %}{% filter upper %}{{ n }}{% endfilter %}"
                         "{% for m in messages %}{{ turn(m) }}{{ loop.index }}{% if not loop.last %}, {% endif %}"
                         "{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}{{ eos_token }}"),
    "loop_controls": ("{% for m in messages %}{% if m['role'] == 'system' %}{% continue %}{% endif %}"
                      "{{ m['content'] }}{% if loop.index > 1 %}{% break %}{% endif %}{% endfor %}"),
}


@pytest.mark.parametrize("name", list(VALID_TEMPLATES))
def test_valid_renders_unchanged(tok, name):
    """Valid chats render byte-for-byte as jinja's plain sandbox with transformers' options renders them (the
    checks, limits and compile-time changes alter no output); the toy template as it always has."""
    template = VALID_TEMPLATES[name]
    reference = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                              extensions=["jinja2.ext.loopcontrols"]).from_string(template)
    t = with_template(tok, template)
    msgs = [{"role": "system", "content": "Be brief."}, USER, BOT, {"role": "user", "content": " Ça coûte 5 € 🙂 "}]
    for agp in (False, True):
        expected = reference.render(messages=msgs, add_generation_prompt=agp, tools=None, documents=None,
                                    **t.special_tokens_map)
        assert t.render_chat(msgs, add_generation_prompt=agp) == expected
    if name == "toy":  # a template that renders prefixes as prefixes: the assistant mask too
        assert t.encode_chat(msgs)[0] == t.encode(t.render_chat(msgs))
        text = "<|bos|><|user|> How do I bake bread?<|end|><|assistant|> Mix flour and water.<|end|>"
        assert t.render_chat(CHAT) == text
        ids, mask = t.encode_chat(CHAT)
        answer = t.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=False)
        assert answer == " Mix flour and water.<|end|>"
