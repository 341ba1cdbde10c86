"""Byte-level BPE, chat rendering (transformers-style Jinja), the assistant-only loss mask, save/load."""
from __future__ import annotations

import json

import pytest
from jinja2.exceptions import SecurityError

from minicwac.io.tokenizer import BOS, EOS, PAD, SPECIAL_TOKENS, TOY_CHAT_TEMPLATE, ChatTokenizer, train_bpe

SENTENCES = ["The movie was great and the acting was superb.", "How do I bake bread?",
             "Sure. To bake bread, first get flour, then mix the dough and heat the pan.",
             "Tom has 5 apples and buys 2 more. How many apples does Tom have now?"] * 5


@pytest.fixture(scope="module")
def small_tok():
    """A tokenizer trained on a few sentences only."""
    return ChatTokenizer(train_bpe(SENTENCES, vocab_size=400))


def test_train_bpe_special_tokens_first(small_tok):
    """Special tokens get ids 0..5 in SPECIAL_TOKENS order and each encodes as one token."""
    for i, s in enumerate(SPECIAL_TOKENS):
        assert small_tok.tok.token_to_id(s) == i
        assert small_tok.encode(s) == [i]
    assert (small_tok.pad_token_id, small_tok.bos_token_id, small_tok.eos_token_id) == (0, 1, 2)
    assert 256 + len(SPECIAL_TOKENS) <= small_tok.vocab_size <= 400  # the byte alphabet is always there


@pytest.mark.parametrize("text", [
    "How do I bake bread?", "  leading spaces and\nnew lines\ttabs ", "naïve café — 日本語 🙂 Ünïcödé",
    "words never seen in training: xylophone zeitgeist", ""])
def test_encode_decode_round_trip(small_tok, text):
    """decode(encode(text)) == text for any text, unicode included (byte-level BPE)."""
    assert small_tok.decode(small_tok.encode(text)) == text


def test_training_merges_frequent_words(small_tok):
    """Frequent words of the training text become single tokens."""
    assert len(small_tok.encode(" bread")) == 1
    assert len(small_tok.encode(" bread")) < len(" bread".encode())


def test_render_toy_chat(tok):
    """The toy template writes `<|bos|><|role|> content<|end|>` per turn and `<|assistant|>` as the prompt."""
    msgs = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello."}]
    assert tok.render_chat(msgs) == "<|bos|><|user|> Hi there<|end|><|assistant|> Hello.<|end|>"
    assert tok.render_chat(msgs[:1], add_generation_prompt=True) == "<|bos|><|user|> Hi there<|end|><|assistant|>"
    sys_msgs = [{"role": "system", "content": "Be kind."}] + msgs[:1]
    assert tok.render_chat(sys_msgs) == "<|bos|><|system|> Be kind.<|end|><|user|> Hi there<|end|>"


def _masked_runs(ids, mask):
    """Contiguous runs of masked token ids."""
    runs, cur = [], []
    for t, m in zip(ids, mask):
        if m:
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    return runs + ([cur] if cur else [])


@pytest.mark.parametrize("answer", ["Sure. To bake bread, first get flour, then mix the dough.", "positive",
                                    "I'm sorry, but I cannot help with that.", "7", "Ça coûte 5 € — très cher 🙂"])
def test_assistant_mask_single_turn(tok, answer):
    """The mask covers exactly the answer tokens and its end token; ids are the rendered chat's tokens."""
    msgs = [{"role": "user", "content": "How do I bake bread?"}, {"role": "assistant", "content": answer}]
    ids, mask = tok.encode_chat(msgs)
    assert len(ids) == len(mask) and set(mask) <= {0, 1}
    assert ids == tok.encode(tok.render_chat(msgs))
    masked = [t for t, m in zip(ids, mask) if m]
    unmasked = [t for t, m in zip(ids, mask) if not m]
    assert tok.decode(masked, skip_special_tokens=False) == " " + answer + EOS  # the template's space, then eos
    assert masked[-1] == tok.eos_token_id and ids[-1] == tok.eos_token_id
    assert tok.decode(unmasked, skip_special_tokens=False) == "<|bos|><|user|> How do I bake bread?<|end|><|assistant|>"
    assert len(_masked_runs(ids, mask)) == 1 and mask[-1] == 1


def test_assistant_mask_multi_turn(tok):
    """In a multi-turn chat (with a system turn) each assistant answer + its end token is masked, nothing else."""
    msgs = [{"role": "system", "content": "You are helpful."},
            {"role": "user", "content": "How do I bake bread?"},
            {"role": "assistant", "content": "Mix the dough and bake it."},
            {"role": "user", "content": "And a cake?"},
            {"role": "assistant", "content": "Use flour, butter and an oven."}]
    ids, mask = tok.encode_chat(msgs)
    runs = [tok.decode(r, skip_special_tokens=False) for r in _masked_runs(ids, mask)]
    assert runs == [" Mix the dough and bake it." + EOS, " Use flour, butter and an oven." + EOS]
    # a chat that ends with a user turn (plus generation prompt) only masks the earlier answer
    ids2, mask2 = tok.encode_chat(msgs[:4], add_generation_prompt=True)
    runs2 = [tok.decode(r, skip_special_tokens=False) for r in _masked_runs(ids2, mask2)]
    assert runs2 == [" Mix the dough and bake it." + EOS]
    assert tok.decode(ids2[-1:], skip_special_tokens=False) == "<|assistant|>" and mask2[-1] == 0


def test_no_assistant_turn_means_empty_mask(tok):
    ids, mask = tok.encode_chat([{"role": "user", "content": "Hello"}], add_generation_prompt=True)
    assert len(ids) > 0 and sum(mask) == 0


BLOCK_TEMPLATE = """{% for message in messages %}
    {% if message['role'] == 'user' %}
User: {{ message['content'] }}
    {% else %}
Bot: {{ message['content'] }}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
Bot:
{% endif %}"""


def test_template_blocks_render_without_stray_newlines(small_tok):
    """With trim_blocks/lstrip_blocks (as transformers renders), block tags on their own lines add no
    newlines or indentation."""
    t = ChatTokenizer(small_tok.tok, chat_template=BLOCK_TEMPLATE)
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert t.render_chat(msgs) == "User: hi\nBot: hello\n"
    assert t.render_chat(msgs[:1], add_generation_prompt=True) == "User: hi\nBot:\n"


def test_template_raise_exception_and_tojson(small_tok):
    """The transformers helpers: raise_exception() -> error naming the message; tojson keeps non-ASCII."""
    t = ChatTokenizer(small_tok.tok, chat_template="{{ raise_exception('only user turns') }}")
    with pytest.raises(ValueError, match="only user turns"):
        t.render_chat([{"role": "user", "content": "x"}])
    t = ChatTokenizer(small_tok.tok, chat_template="{{ messages[0] | tojson }}")
    assert json.loads(t.render_chat([{"role": "user", "content": "café"}])) == {"role": "user", "content": "café"}
    assert "café" in t.render_chat([{"role": "user", "content": "café"}])


def test_template_is_sandboxed(small_tok):
    """Templates cannot reach Python internals nor mutate the messages (immutable sandbox)."""
    msgs = [{"role": "user", "content": "x"}]
    t = ChatTokenizer(small_tok.tok, chat_template="{{ ''.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(SecurityError):
        t.render_chat(msgs)
    t = ChatTokenizer(small_tok.tok, chat_template="{% set _ = messages.append(1) %}{{ messages | length }}")
    with pytest.raises(SecurityError):
        t.render_chat(msgs)
    assert len(msgs) == 1


def test_template_loop_controls_like_transformers(small_tok):
    """Real chat templates may use {% break %} / {% continue %}, which transformers allows."""
    tpl = "{% for m in messages %}{% if m['role'] == 'system' %}{% continue %}{% endif %}{{ m['content'] }}{% endfor %}"
    t = ChatTokenizer(small_tok.tok, chat_template=tpl)
    assert t.render_chat([{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]) == "U"


def test_missing_special_token_rejected(small_tok):
    with pytest.raises(ValueError, match="not in the tokenizer's vocabulary"):
        ChatTokenizer(small_tok.tok, eos_token="<|eot_id|>")


def test_pad_falls_back_to_eos(small_tok):
    """Without a pad token, padding uses the eos id (as many real chat tokenizers do)."""
    t = ChatTokenizer(small_tok.tok, bos_token=None, pad_token=None)
    assert t.pad_token_id == t.eos_token_id and t.bos_token_id is None
    assert t.render_chat([{"role": "user", "content": "hi"}]) == "<|user|> hi<|end|>"


def test_save_load_round_trip(tok, tmp_path):
    """save -> load gives the same ids for text and chats, the same template and special tokens."""
    tok.save(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"tokenizer.json", "tokenizer_config.json"}
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert (cfg["bos_token"], cfg["eos_token"], cfg["pad_token"]) == (BOS, EOS, PAD)
    assert cfg["chat_template"] == TOY_CHAT_TEMPLATE
    t2 = ChatTokenizer.load(tmp_path)
    for text in ["How can I bake bread?", "naïve 🙂 text", " Review: The movie was great. Verdict: positive."]:
        assert t2.encode(text) == tok.encode(text)
    msgs = [{"role": "user", "content": "Is this review positive?"}, {"role": "assistant", "content": "positive"}]
    assert t2.encode_chat(msgs) == tok.encode_chat(msgs)
    assert t2.chat_template == tok.chat_template and t2.vocab_size == tok.vocab_size
    assert (t2.bos_token_id, t2.eos_token_id, t2.pad_token_id) == (tok.bos_token_id, tok.eos_token_id,
                                                                   tok.pad_token_id)


def test_load_special_tokens_as_content_dicts(tok, tmp_path):
    """Hugging Face tokenizer_config.json may store special tokens as {"content": ...} dicts."""
    tok.save(tmp_path)
    f = tmp_path / "tokenizer_config.json"
    cfg = json.loads(f.read_text())
    for k in ("bos_token", "eos_token", "pad_token"):
        cfg[k] = {"content": cfg[k], "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    f.write_text(json.dumps(cfg))
    t2 = ChatTokenizer.load(tmp_path)
    assert (t2.bos_token, t2.eos_token, t2.pad_token) == (BOS, EOS, PAD)
    assert t2.eos_token_id == tok.eos_token_id


def test_load_without_template_uses_toy_template(tok, tmp_path):
    tok.save(tmp_path)
    f = tmp_path / "tokenizer_config.json"
    cfg = json.loads(f.read_text())
    del cfg["chat_template"]
    f.write_text(json.dumps(cfg))
    assert ChatTokenizer.load(tmp_path).chat_template == TOY_CHAT_TEMPLATE


def test_load_errors(tok, tmp_path):
    """A missing or unreadable tokenizer file is named in the error."""
    with pytest.raises(FileNotFoundError, match="tokenizer.json is missing"):
        ChatTokenizer.load(tmp_path)
    tok.save(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="unreadable tokenizer files"):
        ChatTokenizer.load(tmp_path)
    tok.save(tmp_path)
    (tmp_path / "tokenizer.json").write_text("garbage")
    with pytest.raises(ValueError, match="unreadable tokenizer files"):
        ChatTokenizer.load(tmp_path)
