"""Real Hugging Face tokenizer folders: `load_tokenizer` and `ChatTokenizer.save` against transformers.

Four small but realistic folders are built locally (a byte-level BPE trained on a few sentences, each family's
special tokens, tokenizer.json + tokenizer_config.json + generation_config.json / config.json written by hand):
a Llama-3-style template (header tokens, BOS written by the template and added by the post-processor, an eos list
in generation_config.json), a ChatML/Qwen2-style one (a default system line, no BOS, {% generation %} blocks,
Qwen2's pre-tokenizer and tokenizer class), a Gemma-style one (<start_of_turn>, add_bos_token true and BOS in the
template: the no-double-BOS case, the template in chat_template.jinja) and a Mistral [INST]-style one (special
tokens as {"content": ...} dicts, raise_exception on bad role order). The templates are written here.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from jinja2.exceptions import SecurityError, TemplateError
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from minicwac.io.tokenizer import TOY_CHAT_TEMPLATE, ChatTokenizer, load_tokenizer, train_bpe

transformers = pytest.importorskip("transformers", reason="parity tests compare with transformers' AutoTokenizer")
AutoTokenizer = transformers.AutoTokenizer

CORPUS = [
    "The movie was great and the acting was superb.", "How do I bake bread? Mix flour, water and salt.",
    "You are a helpful assistant. Answer briefly and politely.", "Tom has 5 apples and buys 12 more: 17 apples.",
    "Combien coûte un café? Ça coûte 3,50 € — très cher.", "日本語のテキストです。🙂 🎉 ☕",
    "Sure. To bake bread, first get flour, then mix the dough and heat the oven to 220 degrees.",
    "I'm sorry, but I cannot help with that request.", "What is 2 + 2? It is 4.",
] * 4

# --- the four chat templates (our own Jinja, in each family's format) ---------------------------------------

LLAMA3_TEMPLATE = """{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] | trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = '' %}
{%- endif %}
{%- if date_string is not defined %}
    {%- set date_string = strftime_now('%d %b %Y') %}
{%- endif %}
{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}
{{- 'Today Date: ' + date_string + '\\n\\n' }}
{{- system_message + '<|eot_id|>' }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}
    {{- message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

CHATML_TEMPLATE = """{%- for message in messages %}
{%- if loop.first and message['role'] != 'system' %}
{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- if message['role'] == 'assistant' %}
{{- '<|im_start|>assistant\\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}
{%- else %}
{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

GEMMA_TEMPLATE = """{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set first_user_prefix = '' %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- set role = 'model' if message['role'] == 'assistant' else message['role'] %}
    {{- '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') }}
    {{- message['content'] | trim + '<end_of_turn>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<start_of_turn>model\\n' }}
{%- endif %}
"""

MISTRAL_TEMPLATE = """{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set system_message = none %}
    {%- set loop_messages = messages %}
{%- endif %}
{{- bos_token }}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {%- if loop.first and system_message is not none %}
            {{- '[INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}
        {%- else %}
            {{- '[INST] ' + message['content'] + ' [/INST]' }}
        {%- endif %}
    {%- else %}
        {{- ' ' + message['content'] + eos_token }}
    {%- endif %}
{%- endfor %}
"""

QWEN2_PRETOKENIZE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                     r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _bos_processor(bos: str, bos_id: int, with_byte_level: bool):
    tp = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1", special_tokens=[(bos, bos_id)])
    return processors.Sequence([processors.ByteLevel(trim_offsets=False), tp]) if with_byte_level else tp


def _chatml_tokenizer(special):
    """A byte-level BPE with Qwen2's normalizer and pre-tokenizer (what transformers' Qwen2Tokenizer rebuilds)."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.train_from_iterator(CORPUS, trainer=trainers.BpeTrainer(
        vocab_size=420, special_tokens=special, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def _added_tokens_decoder(tok: Tokenizer) -> dict:
    return {str(i): {"content": t.content, "lstrip": False, "normalized": False, "rstrip": False,
                     "single_word": False, "special": True} for i, t in tok.get_added_tokens_decoder().items()}


def _as_dict(token: str) -> dict:
    return {"__type": "AddedToken", "content": token, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False}


def _write(folder: Path, tok: Tokenizer, cfg: dict, generation: dict | None = None, config: dict | None = None,
           jinja: str | None = None) -> Path:
    folder.mkdir(parents=True)
    tok.save(str(folder / "tokenizer.json"))
    cfg = {**cfg, "added_tokens_decoder": _added_tokens_decoder(tok)}
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False))
    for name, d in (("generation_config.json", generation), ("config.json", config)):
        if d is not None:
            (folder / name).write_text(json.dumps(d, indent=2))
    if jinja is not None:
        (folder / "chat_template.jinja").write_text(jinja)
    return folder


def build_llama3(folder: Path) -> Path:
    special = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",
               "<|eot_id|>"]
    tok = train_bpe(CORPUS, vocab_size=420, special_tokens=special)
    tok.post_processor = _bos_processor("<|begin_of_text|>", 0, with_byte_level=True)  # adds BOS to plain text
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
           "eos_token": "<|eot_id|>", "clean_up_tokenization_spaces": True, "model_max_length": 131072,
           "chat_template": LLAMA3_TEMPLATE}
    return _write(folder, tok, cfg, generation={"bos_token_id": 0, "eos_token_id": [1, 4, 5], "do_sample": True},
                  config={"model_type": "llama", "bos_token_id": 0, "eos_token_id": [1, 4, 5]})


def build_chatml(folder: Path) -> Path:
    tok = _chatml_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    cfg = {"tokenizer_class": "Qwen2Tokenizer", "bos_token": None, "eos_token": "<|im_end|>",
           "pad_token": "<|endoftext|>", "unk_token": None, "add_prefix_space": False, "errors": "replace",
           "split_special_tokens": False, "clean_up_tokenization_spaces": False, "model_max_length": 32768,
           "chat_template": CHATML_TEMPLATE}
    return _write(folder, tok, cfg, generation={"bos_token_id": 0, "eos_token_id": [2, 0], "pad_token_id": 0},
                  config={"model_type": "qwen2", "bos_token_id": 0, "eos_token_id": 2})


def build_gemma(folder: Path) -> Path:
    special = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    tok = train_bpe(CORPUS, vocab_size=420, special_tokens=special)
    tok.post_processor = _bos_processor("<bos>", 2, with_byte_level=False)
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": True, "add_eos_token": False,
           "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
           "chat_template": "STALE TEMPLATE: chat_template.jinja must win"}
    return _write(folder, tok, cfg, jinja=GEMMA_TEMPLATE, generation={"bos_token_id": 2, "eos_token_id": [1, 5]},
                  config={"model_type": "gemma2", "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0})


def build_mistral(folder: Path) -> Path:
    tok = train_bpe(CORPUS, vocab_size=420, special_tokens=["<unk>", "<s>", "</s>", "[INST]", "[/INST]"])
    tok.post_processor = _bos_processor("<s>", 1, with_byte_level=True)
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": True, "add_eos_token": False,
           "bos_token": _as_dict("<s>"), "eos_token": _as_dict("</s>"), "unk_token": _as_dict("<unk>"),
           "pad_token": None, "legacy": False, "chat_template": MISTRAL_TEMPLATE}
    return _write(folder, tok, cfg, config={"model_type": "mistral", "bos_token_id": 1, "eos_token_id": 2})


BUILDERS = {"llama3": build_llama3, "chatml": build_chatml, "gemma": build_gemma, "mistral": build_mistral}
FAMILIES = list(BUILDERS)
# what each template's assistant turn ends with, inside the mask (ChatML: its {% generation %} block stops there)
END = {"llama3": "<|eot_id|>", "chatml": "<|im_end|>", "gemma": "<end_of_turn>\n", "mistral": "</s>"}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_tokenizers")
    return {name: build(root / name) for name, build in BUILDERS.items()}


@pytest.fixture(scope="module")
def toks(folders):
    return {name: load_tokenizer(f) for name, f in folders.items()}


@pytest.fixture(scope="module")
def hf(folders):
    return {name: AutoTokenizer.from_pretrained(str(f)) for name, f in folders.items()}


def copy_folder(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_json(f: Path, **changes) -> None:
    d = json.loads(f.read_text())
    for k, v in changes.items():
        if v is ...:
            d.pop(k, None)
        else:
            d[k] = v
    f.write_text(json.dumps(d))


SYS = {"role": "system", "content": "You are a helpful assistant. Answer briefly."}
U1 = {"role": "user", "content": "How do I bake bread?"}
A1 = {"role": "assistant", "content": "Mix flour, water and salt, then bake it."}
U2 = {"role": "user", "content": "Tom has 5 apples and buys 12 more. How many?"}
A2 = {"role": "assistant", "content": "17 apples."}
U3 = {"role": "user", "content": "Combien coûte un café? 🙂☕ 日本語"}
A3 = {"role": "assistant", "content": "Ça coûte 3,50 € — très cher! 🎉 42"}
CONVERSATIONS = {  # (messages, add_generation_prompt)
    "prompt": ([U1], True),
    "system": ([SYS, U1, A1], False),
    "multi_turn": ([SYS, U1, A1, U2, A2], False),
    "multi_turn_prompt": ([U1, A1, U2], True),
    "unicode": ([U3, A3], False),
}
TEXTS = ["How do I bake bread?", "  leading spaces and\nnew lines\ttabs ", "Ça coûte 3,50 € — 日本語 🙂🎉",
         "digits 1234567890 and 3.14159", "a <|im_end|> or <eos> inside text", ""]


def _hf_chat(hf_tok, msgs, agp, **kw):
    text = hf_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=agp, **kw)
    ids = hf_tok.apply_chat_template(msgs, tokenize=True, return_dict=False, add_generation_prompt=agp, **kw)
    return text, list(ids)


@pytest.mark.parametrize("conv", list(CONVERSATIONS))
@pytest.mark.parametrize("family", FAMILIES)
def test_chat_matches_transformers(toks, hf, family, conv):
    """render_chat and encode_chat's ids equal transformers' apply_chat_template (tokenize=False / True), with a
    single BOS where the template writes it and the post-processor would add it too."""
    msgs, agp = CONVERSATIONS[conv]
    tok, hf_tok = toks[family], hf[family]
    text, ids = _hf_chat(hf_tok, msgs, agp)
    assert tok.render_chat(msgs, add_generation_prompt=agp) == text
    ours, mask = tok.encode_chat(msgs, add_generation_prompt=agp)
    assert ours == ids and len(mask) == len(ids)
    if tok.bos_token is not None:
        assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id  # the template's BOS only
        # ... though encoding the rendered text with special tokens would add a second one
        assert tok.encode(text, add_special_tokens=True).count(tok.bos_token_id) == 2
    for m in msgs:
        assert m["content"] in text


def test_template_variables_like_transformers(toks, hf):
    """Extra variables reach the template (Llama 3.1's date_string), and strftime_now() is there when they don't."""
    msgs = [SYS, U1]
    text, ids = _hf_chat(hf["llama3"], msgs, True, date_string="26 Jul 2024")
    assert toks["llama3"].render_chat(msgs, add_generation_prompt=True, date_string="26 Jul 2024") == text
    assert toks["llama3"].encode_chat(msgs, add_generation_prompt=True, date_string="26 Jul 2024")[0] == ids
    assert "Today Date: 26 Jul 2024" in text


@pytest.mark.parametrize("family", FAMILIES)
def test_plain_text_encoding_matches_transformers(toks, hf, family):
    """encode(text, add_special_tokens=True) == tokenizer(text)["input_ids"] (BOS for Llama 3, Gemma and Mistral,
    nothing for ChatML); encode(text) (no special tokens, the toy default) == tokenizer(text,
    add_special_tokens=False)."""
    tok, hf_tok = toks[family], hf[family]
    for text in TEXTS:
        assert tok.encode(text, add_special_tokens=True) == hf_tok(text)["input_ids"], text
        assert tok.encode(text) == hf_tok(text, add_special_tokens=False)["input_ids"], text
        assert tok.decode(tok.encode(text), skip_special_tokens=False) == text
    with_bos = tok.encode("How do I bake bread?", add_special_tokens=True)
    assert (with_bos[0] == tok.bos_token_id) == (family != "chatml")


def test_add_bos_token_follows_tokenizer_json(folders, tmp_path):
    """transformers decides BOS on plain text from tokenizer.json's post-processor, not from tokenizer_config's
    add_bos_token (which it drops when tokenizer.json exists): so do we, and the flag is kept for save."""
    f = copy_folder(folders["gemma"], tmp_path / "g")
    j = json.loads((f / "tokenizer.json").read_text())
    j["post_processor"] = None
    (f / "tokenizer.json").write_text(json.dumps(j))
    tok, hf_tok = load_tokenizer(f), AutoTokenizer.from_pretrained(str(f))
    assert tok.add_bos_token is True
    assert tok.encode("hi there", add_special_tokens=True) == hf_tok("hi there")["input_ids"] == tok.encode("hi there")
    msgs = [U1, A1]
    assert tok.encode_chat(msgs)[0] == _hf_chat(hf_tok, msgs, False)[1]


def test_special_tokens_and_eos_list(toks, hf, folders):
    """Special tokens as transformers sees them; ids completed by generation_config.json / config.json; every
    eos id kept (the primary one first) so generation can stop on any."""
    for family in FAMILIES:
        tok, hf_tok = toks[family], hf[family]
        assert tok.special_tokens_map == hf_tok.special_tokens_map, family
        assert (tok.bos_token, tok.eos_token, tok.pad_token) == (hf_tok.bos_token, hf_tok.eos_token,
                                                                 hf_tok.pad_token), family
        assert tok.eos_token_id == hf_tok.eos_token_id
        if not (folders[family] / "generation_config.json").exists():
            continue
        gen = transformers.GenerationConfig.from_pretrained(str(folders[family]))
        gen_eos = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
        assert set(gen_eos) <= set(tok.eos_token_ids) and tok.eos_token_ids[0] == tok.eos_token_id
    llama = toks["llama3"]
    assert llama.eos_token_ids == [5, 1, 4] and llama.eos_token_id == 5  # <|eot_id|>, then generation_config's
    assert llama.bos_token_id == 0 and llama.pad_token is None and llama.pad_token_id == 5  # pad falls back to eos
    chatml = toks["chatml"]  # no BOS token, but the model's bos id from generation_config.json
    assert chatml.bos_token is None and chatml.bos_token_id == 0 and hf["chatml"].bos_token_id is None
    assert chatml.eos_token_ids == [2, 0] and chatml.pad_token_id == 0
    assert toks["gemma"].eos_token_ids == [1, 5] and toks["gemma"].other_special_tokens == {"unk_token": "<unk>"}
    mistral = toks["mistral"]  # {"content": ...} dicts; ids from config.json only
    assert (mistral.bos_token, mistral.eos_token, mistral.other_special_tokens) == ("<s>", "</s>",
                                                                                   {"unk_token": "<unk>"})
    assert mistral.eos_token_ids == [2] and mistral.pad_token_id == 2
    assert (toks["gemma"].add_bos_token, toks["gemma"].add_eos_token) == (True, False)
    assert (llama.add_bos_token, llama.add_eos_token) == (None, None)


def test_config_json_fallback(folders, tmp_path):
    """Without generation_config.json the ids come from config.json; without a bos/eos token in
    tokenizer_config.json, from those ids."""
    f = copy_folder(folders["llama3"], tmp_path / "l")
    (f / "generation_config.json").unlink()
    edit_json(f / "config.json", eos_token_id=[5, 1], bos_token_id=0, pad_token_id=4)
    edit_json(f / "tokenizer_config.json", bos_token=None, eos_token=...)
    tok = load_tokenizer(f)
    assert (tok.bos_token, tok.eos_token) == (None, None)
    assert (tok.bos_token_id, tok.eos_token_id, tok.eos_token_ids, tok.pad_token_id) == (0, 5, [5, 1], 4)


def test_string_and_dict_token_forms(folders, tmp_path):
    """A special token may be a string or a {"content": ...} dict: the same tokenizer either way."""
    f = copy_folder(folders["mistral"], tmp_path / "m")
    edit_json(f / "tokenizer_config.json", bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    a, b = load_tokenizer(folders["mistral"]), load_tokenizer(f)
    assert a.special_tokens_map == b.special_tokens_map == AutoTokenizer.from_pretrained(str(f)).special_tokens_map
    assert (a.bos_token_id, a.eos_token_id) == (b.bos_token_id, b.eos_token_id) == (1, 2)


def test_chat_template_jinja_takes_precedence(toks, hf, folders):
    """chat_template.jinja wins over tokenizer_config.json's chat_template, as in transformers."""
    assert toks["gemma"].chat_template == GEMMA_TEMPLATE == hf["gemma"].chat_template
    assert "STALE" not in toks["gemma"].render_chat([U1])


def test_named_template_list(folders, tmp_path):
    """chat_template as a list of named templates: "default" is used (as transformers, without tools)."""
    f = copy_folder(folders["chatml"], tmp_path / "c")
    edit_json(f / "tokenizer_config.json", chat_template=[{"name": "tool_use", "template": "TOOLS {{ tools }}"},
                                                          {"name": "default", "template": CHATML_TEMPLATE}])
    tok, hf_tok = load_tokenizer(f), AutoTokenizer.from_pretrained(str(f))
    assert tok.chat_template == CHATML_TEMPLATE
    msgs = [U1, A1]
    assert (tok.render_chat(msgs), tok.encode_chat(msgs)[0]) == _hf_chat(hf_tok, msgs, False)


def test_legacy_special_tokens_map(folders, tmp_path):
    """special_tokens_map.json overrides tokenizer_config.json when the config has no added_tokens_decoder."""
    f = copy_folder(folders["mistral"], tmp_path / "m")
    edit_json(f / "tokenizer_config.json", added_tokens_decoder=..., eos_token="[INST]")
    (f / "special_tokens_map.json").write_text(json.dumps({"eos_token": _as_dict("</s>"), "pad_token": "<unk>"}))
    tok, hf_tok = load_tokenizer(f), AutoTokenizer.from_pretrained(str(f))
    assert tok.special_tokens_map == hf_tok.special_tokens_map
    assert (tok.eos_token, tok.pad_token) == ("</s>", "<unk>")


@pytest.mark.parametrize("family", FAMILIES)
def test_save_round_trip(toks, hf, family, tmp_path):
    """ChatTokenizer.save writes a folder that AutoTokenizer loads with the same special tokens, template and
    encodings, and that load_tokenizer reads back equal."""
    tok, hf_tok = toks[family], hf[family]
    tok.save(tmp_path / "saved")
    hf2 = AutoTokenizer.from_pretrained(str(tmp_path / "saved"))
    assert hf2.special_tokens_map == hf_tok.special_tokens_map
    assert hf2.chat_template == tok.chat_template
    for text in TEXTS:
        assert hf2(text)["input_ids"] == hf_tok(text)["input_ids"] == tok.encode(text, add_special_tokens=True)
    msgs, agp = CONVERSATIONS["multi_turn"]
    assert _hf_chat(hf2, msgs, agp) == _hf_chat(hf_tok, msgs, agp)
    back = load_tokenizer(tmp_path / "saved")
    for attr in ("chat_template", "bos_token", "eos_token", "pad_token", "other_special_tokens", "bos_token_id",
                 "eos_token_id", "eos_token_ids", "pad_token_id", "add_bos_token", "add_eos_token",
                 "special_tokens_map", "vocab_size"):
        assert getattr(back, attr) == getattr(tok, attr), attr
    assert back.tok.get_vocab() == tok.tok.get_vocab()
    assert back.encode_chat(msgs) == tok.encode_chat(msgs)
    assert ChatTokenizer.load(tmp_path / "saved").eos_token_ids == tok.eos_token_ids


def test_save_merges_generation_config(toks, tmp_path):
    """Ids that tokenizer_config.json cannot hold go into generation_config.json, keeping what is there."""
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 5, "temperature": 0.6}))
    toks["llama3"].save(tmp_path)
    gen = json.loads((tmp_path / "generation_config.json").read_text())
    assert gen == {"eos_token_id": [5, 1, 4], "temperature": 0.6}
    toks["chatml"].save(tmp_path / "c")
    assert json.loads((tmp_path / "c" / "generation_config.json").read_text())["bos_token_id"] == 0
    # the toy tokenizer needs none
    ChatTokenizer(train_bpe(CORPUS, vocab_size=300)).save(tmp_path / "toy")
    assert not (tmp_path / "toy" / "generation_config.json").exists()


def test_save_rewrites_existing_chat_template_jinja(folders, tmp_path):
    """Saving into a folder with a chat_template.jinja (which would take precedence) rewrites it too."""
    f = copy_folder(folders["gemma"], tmp_path / "g")
    tok = load_tokenizer(f)
    tok.chat_template = GEMMA_TEMPLATE.replace("<start_of_turn>model", "<start_of_turn>assistant")
    tok.save(f)
    assert load_tokenizer(f).chat_template == tok.chat_template == AutoTokenizer.from_pretrained(str(f)).chat_template


def test_toy_tokenizer_matches_transformers(tmp_path):
    """The toy tokenizer's folder: AutoTokenizer renders and encodes its chats as ChatTokenizer does."""
    tok = ChatTokenizer(train_bpe(CORPUS, vocab_size=300))
    tok.save(tmp_path)
    hf_tok = AutoTokenizer.from_pretrained(str(tmp_path))
    msgs = [U1, A1]
    assert (tok.render_chat(msgs), tok.encode_chat(msgs)[0]) == _hf_chat(hf_tok, msgs, False)
    assert tok.encode("How do I bake bread?", add_special_tokens=True) == hf_tok("How do I bake bread?")["input_ids"]
    back = load_tokenizer(tmp_path)
    assert back.chat_template == TOY_CHAT_TEMPLATE and back.special_tokens_map == tok.special_tokens_map


# --- assistant masks ----------------------------------------------------------------------------------------

def _masked_runs(tok, ids, mask):
    runs, cur = [], []
    for t, m in zip(ids + [None], mask + [0]):
        if m:
            cur.append(t)
        elif cur:
            runs.append(tok.decode(cur, skip_special_tokens=False))
            cur = []
    return runs


@pytest.mark.parametrize("family", FAMILIES)
def test_assistant_mask_marks_exactly_the_answers(toks, family):
    """The mask covers each assistant answer and its end marker, nothing else."""
    tok = toks[family]
    for msgs in ([SYS, U1, A1, U2, A2], [U3, A3]):
        ids, mask = tok.encode_chat(msgs)
        expected = [m["content"] + END[family] for m in msgs if m["role"] == "assistant"]
        if family == "mistral":
            expected = [" " + e for e in expected]  # the template's space before the answer
        assert _masked_runs(tok, ids, mask) == expected
    ids, mask = tok.encode_chat([U1, A1, U2], add_generation_prompt=True)
    assert _masked_runs(tok, ids, mask) == [(" " if family == "mistral" else "") + A1["content"] + END[family]]


def test_assistant_mask_matches_transformers_generation_blocks(toks, hf):
    """With {% generation %} blocks (the ChatML template), the mask is transformers' return_assistant_tokens_mask."""
    for msgs in ([SYS, U1, A1, U2, A2], [U3, A3]):
        out = hf["chatml"].apply_chat_template(msgs, tokenize=True, return_dict=True,
                                               return_assistant_tokens_mask=True)
        ids, mask = toks["chatml"].encode_chat(msgs)
        assert ids == list(out["input_ids"]) and mask == list(out["assistant_masks"])
        assert sum(mask) > 0


def test_assistant_mask_needs_a_prefix_stable_template(toks):
    """A template that renders a prefix of the chat differently (here: the system text goes into the last user
    turn) cannot be masked by prefixes: a clear error, not a wrong mask."""
    tpl = ("{% for m in messages if m['role'] != 'system' %}{% if m['role'] == 'user' %}[INST] "
           "{% if loop.last and messages[0]['role'] == 'system' %}{{ messages[0]['content'] }} {% endif %}"
           "{{ m['content'] }} [/INST]{% else %} {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")
    base = toks["mistral"]
    tok = ChatTokenizer(base.tok, tpl, bos_token="<s>", eos_token="</s>", pad_token=None)
    with pytest.raises(ValueError, match="cannot find assistant turn 2.*generation"):
        tok.encode_chat([SYS, U1, A1, U2, A2])


# --- template helpers and errors ----------------------------------------------------------------------------

def test_template_helpers_like_transformers(toks, hf):
    """namespace(), dict(), tojson options, strftime_now, loop controls: rendered as transformers renders them."""
    tpl = ("{% set ns = namespace(n=0) %}{% for m in messages %}{% if m['role'] == 'system' %}{% continue %}"
           "{% endif %}{% set ns.n = ns.n + 1 %}{% if loop.index > 2 %}{% break %}{% endif %}{% endfor %}"
           "{{ ns.n }}|{{ dict(b='é', a=[1, 2]) | tojson(sort_keys=True, separators=(',', ':')) }}"
           "|{{ messages[0] | tojson(indent=2) }}|{{ strftime_now('%Y') }}|{{ tools is none }}|{{ unk_token }}")
    tok = ChatTokenizer(toks["mistral"].tok, tpl, bos_token="<s>", eos_token="</s>", pad_token=None,
                        other_special_tokens={"unk_token": "<unk>"})
    msgs = [SYS, U1, A1, U2]
    assert tok.render_chat(msgs) == hf["mistral"].apply_chat_template(msgs, chat_template=tpl, tokenize=False)
    with pytest.raises(SecurityError):
        tok.chat_template = "{% set ns = namespace(_x=1) %}"
        tok.render_chat(msgs)


def test_raise_exception_on_bad_role_order(toks, hf):
    """Mistral and Gemma templates refuse non-alternating roles, here as in transformers."""
    bad = [U1, U2]
    for family in ("mistral", "gemma"):
        with pytest.raises(TemplateError, match="roles must alternate"):
            hf[family].apply_chat_template(bad, tokenize=False)
        with pytest.raises(ValueError, match="chat template error: Conversation roles must alternate"):
            toks[family].render_chat(bad)
        with pytest.raises(TemplateError):
            toks[family].encode_chat(bad)


def _one_line_error(exc_info, *names):
    msg = str(exc_info.value)
    assert "\n" not in msg
    for n in names:
        assert n in msg, (n, msg)


def test_load_errors(folders, tmp_path):
    """Each error names the file and what was expected, in one line."""
    with pytest.raises(FileNotFoundError, match="tokenizer.json is missing") as e:
        load_tokenizer(tmp_path)
    _one_line_error(e, str(tmp_path / "tokenizer.json"))

    f = copy_folder(folders["llama3"], tmp_path / "json")
    (f / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON") as e:
        load_tokenizer(f)
    _one_line_error(e, str(f / "tokenizer_config.json"))
    (f / "tokenizer_config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="expected an object") as e:
        load_tokenizer(f)
    (f / "tokenizer.json").write_text('{"model": 3}')
    with pytest.raises(ValueError, match="not a `tokenizers` tokenizer.json") as e:
        load_tokenizer(f)
    _one_line_error(e, str(f / "tokenizer.json"))

    f = copy_folder(folders["llama3"], tmp_path / "vocab")
    edit_json(f / "tokenizer_config.json", eos_token={"content": "<|im_end|>"})
    with pytest.raises(ValueError, match="eos_token '<\\|im_end\\|>' is not in the vocabulary") as e:
        load_tokenizer(f)
    _one_line_error(e, str(f / "tokenizer_config.json"))
    edit_json(f / "tokenizer_config.json", eos_token=7)
    with pytest.raises(ValueError, match="expected a token string") as e:
        load_tokenizer(f)

    f = copy_folder(folders["llama3"], tmp_path / "ids")
    edit_json(f / "generation_config.json", eos_token_id=[5, 100000])
    with pytest.raises(ValueError, match="eos_token_id 100000 is not in the vocabulary") as e:
        load_tokenizer(f)
    _one_line_error(e, str(f / "generation_config.json"))

    f = copy_folder(folders["chatml"], tmp_path / "named")
    edit_json(f / "tokenizer_config.json", chat_template=[{"name": "tool_use", "template": "x"},
                                                          {"name": "rag", "template": "y"}])
    with pytest.raises(ValueError, match="none is named 'default'") as e:
        load_tokenizer(f)
    _one_line_error(e, str(f / "tokenizer_config.json"), "rag", "tool_use")

    f = copy_folder(folders["mistral"], tmp_path / "noeos")
    (f / "config.json").unlink()
    edit_json(f / "tokenizer_config.json", eos_token=None)
    with pytest.raises(ValueError, match="no end token") as e:
        load_tokenizer(f)
    _one_line_error(e, "eos_token", "eos_token_id")


def test_folder_without_tokenizer_config(folders, tmp_path):
    """Only tokenizer.json (+ generation_config.json): loads for plain text; render_chat says there is no
    template; ChatTokenizer.load falls back to the toy template."""
    f = copy_folder(folders["llama3"], tmp_path / "bare")
    (f / "tokenizer_config.json").unlink()
    tok = load_tokenizer(f)
    assert tok.bos_token is None and tok.bos_token_id == 0 and tok.eos_token_ids == [1, 4, 5]
    assert tok.encode("hi", add_special_tokens=True)[0] == 0
    with pytest.raises(ValueError, match="no chat template"):
        tok.render_chat([U1])
    assert ChatTokenizer.load(f).chat_template == TOY_CHAT_TEMPLATE
