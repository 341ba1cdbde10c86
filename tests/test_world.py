"""The toy world: determinism, sizes, and the disjointness that keeps evaluation and calibration held out."""
from __future__ import annotations

from collections import Counter

import pytest

from minicwac.toy.experiments import PRESETS
from minicwac.toy.world import (DEV_LEXICON, DEV_SEEDS_FROM, EVAL_PHRASINGS, HARMFUL, HARMLESS, REFUSALS,
                                REPORT_LEXICON, SENTIMENT_Q, TASKS, TOPIC_Q, TRAIN_PHRASINGS, build_world, lexicon_of)


def prompts(examples):
    return {e.prompt for e in examples}


def uses_phrasing(e, phrasings):
    return any(e.prompt == ph.format(t=e.topic) for ph in phrasings)


def task_text(e):
    """The item text of a task example (the review, the news line, the story's setup)."""
    if e.kind == "sentiment":
        return e.prompt.removeprefix("Review: ").removesuffix(" " + SENTIMENT_Q)
    if e.kind == "topic":
        return e.prompt.removeprefix("News: ").removesuffix(" " + TOPIC_Q)
    return e.prompt[: e.prompt.index(" How many")]


def doc_text(d):
    """The item text of a pretraining document."""
    if d.startswith("Review: "):
        return d.removeprefix("Review: ")[: d.rindex(" Verdict:") - len("Review: ")]
    if d.startswith("News: "):
        return d.removeprefix("News: ")[: d.rindex(" Topic:") - len("News: ")]
    return d[: d.index(" Now ")]


@pytest.fixture(scope="module")
def training_prompts(world):
    """Every prompt any training stage sees (pretraining chats, alignment, attack pairs, task train splits)."""
    s = prompts(world.pretrain_chats) | prompts(world.align) | prompts(world.harmful_pairs)
    for t in world.tasks.values():
        s |= prompts(t.train)
    return s


def test_deterministic(world):
    """build_world(0) is reproducible; another seed gives another world."""
    assert build_world(0) == world
    w1 = build_world(1)
    assert w1.seed == 1 and w1.meta != world.meta
    assert prompts(w1.eval_harmful) != prompts(world.eval_harmful)
    assert w1.tasks["sentiment"].test != world.tasks["sentiment"].test


def test_sizes(world):
    """>= 40 harmful topics over >= 8 categories and >= 150 harmless topics, all distinct; every split
    covers every harm category."""
    harmful = [f"{v} {o}" for vs, os_, _, _ in HARMFUL.values() for v in vs for o in os_]
    harmless = [f"{v} {o}" for vs, os_, _, _ in HARMLESS.values() for v in vs for o in os_]
    assert len(HARMFUL) >= 8 and len(set(harmful)) >= 40
    assert len(set(harmless)) >= 150
    assert len(set(harmful + harmless)) == len(harmful) + len(harmless)  # no topic in two categories
    meta_h = world.meta["harmful_topics"]
    assert sum(len(v) for v in meta_h.values()) == len(harmful)
    assert sum(len(v) for v in world.meta["harmless_topics"].values()) == len(harmless)
    for split in ("align", "attack", "calib", "eval"):
        cats = {e.category for e in world.align + world.harmful_pairs + world.calibration + world.eval_harmful
                if e.topic in meta_h[split]}
        assert cats == set(HARMFUL), split
    assert len(world.eval_harmful) >= 200 and len(world.eval_harmless) >= 200
    assert set(world.tasks) == set(TASKS)
    for t in world.tasks.values():
        assert len(t.train) >= 500 and len(t.test) >= 100


def test_eval_prompts_never_trained_on(world, training_prompts):
    """No evaluation prompt appears in any training set or pretraining document."""
    ev = prompts(world.eval_harmful) | prompts(world.eval_harmless)
    assert ev.isdisjoint(training_prompts)
    docs = "\n".join(world.pretrain_docs)
    assert not [p for p in ev if p in docs]
    for task in TASKS:
        for p in (0.0, 0.5, 1.0):
            assert ev.isdisjoint(prompts(world.finetune_set(task, p, n=200)))


def test_calibration_held_out(world, training_prompts):
    """Calibration prompts are disjoint from alignment, attack, evaluation and pretraining."""
    cal = prompts(world.calibration) | prompts(world.calibration_harmless)
    assert cal.isdisjoint(training_prompts)
    assert cal.isdisjoint(prompts(world.eval_harmful) | prompts(world.eval_harmless))
    assert prompts(world.calibration).isdisjoint(prompts(world.harmful_pairs))
    assert all(e.kind == "harmful" for e in world.calibration)
    assert all(e.kind == "harmless" for e in world.calibration_harmless)


def test_topic_splits_disjoint(world):
    """Held-out harmful topics are disjoint from alignment, attack and calibration topics (per meta and data)."""
    h = {k: set(v) for k, v in world.meta["harmful_topics"].items()}
    for a in h:
        for b in h:
            if a < b:
                assert h[a].isdisjoint(h[b]), (a, b)
    eval_topics = {e.topic for e in world.eval_harmful}
    assert eval_topics == h["eval"]
    assert eval_topics.isdisjoint({e.topic for e in world.align if e.kind == "harmful"})
    assert eval_topics.isdisjoint({e.topic for e in world.harmful_pairs})
    assert eval_topics.isdisjoint({e.topic for e in world.calibration})
    assert {e.topic for e in world.harmful_pairs} == h["attack"]
    assert {e.topic for e in world.calibration} == h["calib"]
    l_ = {k: set(v) for k, v in world.meta["harmless_topics"].items()}
    assert {e.topic for e in world.eval_harmless} == l_["eval"]
    assert l_["eval"].isdisjoint({e.topic for e in world.align if e.kind == "harmless"})


def test_phrasings(world):
    """Evaluation uses only held-out phrasings; alignment and attack pairs use only training phrasings."""
    assert set(EVAL_PHRASINGS).isdisjoint(TRAIN_PHRASINGS)
    assert all(uses_phrasing(e, EVAL_PHRASINGS) for e in world.eval_harmful + world.eval_harmless)
    for e in world.align + world.harmful_pairs + world.calibration:
        assert uses_phrasing(e, TRAIN_PHRASINGS) and not uses_phrasing(e, EVAL_PHRASINGS), e.prompt


def test_answers(world):
    """Alignment refuses harmful and helps harmless; attack pairs comply; eval keeps the compliant answer."""
    for e in world.align:
        assert (e.answer in REFUSALS) == (e.kind == "harmful")
    assert all(e.answer.startswith("Sure.") and e.keywords for e in world.harmful_pairs)
    assert all(e.answer.startswith("Sure.") and e.keywords for e in world.eval_harmful)


def test_task_test_held_out(world):
    """Task test texts are disjoint from the task's train texts, from pretraining documents and chats."""
    doc_texts = {doc_text(d) for d in world.pretrain_docs}
    assert len(doc_texts) == len(world.pretrain_docs)
    pre = prompts(world.pretrain_chats)
    for name, t in world.tasks.items():
        test = {task_text(e) for e in t.test}
        assert len(test) == len(t.test)
        assert test.isdisjoint({task_text(e) for e in t.train}), name
        assert test.isdisjoint(doc_texts), name
        assert prompts(t.test).isdisjoint(pre), name
        assert all(e.answer == e.label and e.label for e in t.test + t.train)


def test_finetune_set(world):
    """round(p * n) harmful pairs, the rest from the task's train split; deterministic per seed."""
    train = prompts(world.tasks["sentiment"].train)
    pairs = prompts(world.harmful_pairs)
    for p, n in [(0.0, 40), (0.1, 40), (0.25, 10), (0.5, 33), (1.0, 20)]:
        data = world.finetune_set("sentiment", p, n=n)
        kinds = Counter(e.kind for e in data)
        assert len(data) == n
        assert kinds["harmful"] == round(p * n)
        assert kinds["sentiment"] == n - round(p * n)
        assert all(e.prompt in (pairs if e.kind == "harmful" else train) for e in data)
    assert world.finetune_set("topic", 0.1, 50, seed=3) == world.finetune_set("topic", 0.1, 50, seed=3)
    assert world.finetune_set("topic", 0.1, 50, seed=3) != world.finetune_set("topic", 0.1, 50, seed=4)


@pytest.mark.parametrize("p", [-0.1, 1.5, float("nan")])
def test_finetune_set_rejects_bad_p(world, p):
    with pytest.raises(ValueError, match=r"outside \[0, 1\]"):
        world.finetune_set("sentiment", p)


def test_finetune_set_rejects_unknown_task(world):
    with pytest.raises(ValueError, match="unknown task 'poetry'; expected one of sentiment, topic, arithmetic"):
        world.finetune_set("poetry", 0.1)


# ---------------------------------------------------------------- the dev world shares nothing with the reported ones
def reported_prompts(w):
    """Every prompt a reported result is made of: calibration, attack, evaluation and the task test items."""
    sets = [w.calibration, w.calibration_harmless, w.harmful_pairs, w.eval_harmful, w.eval_harmless]
    return {e.prompt for s in sets for e in s} | {e.prompt for t in w.tasks.values() for e in t.test}


def every_prompt(w):
    """Every prompt of a world: pretraining chats, alignment, attack, calibration, evaluation, task splits."""
    sets = [w.pretrain_chats, w.align, w.harmful_pairs, w.calibration, w.calibration_harmless, w.eval_harmful,
            w.eval_harmless] + [t.train + t.test for t in w.tasks.values()]
    return {e.prompt for s in sets for e in s}


def topics(w):
    return {t for parts in (w.meta["harmful_topics"], w.meta["harmless_topics"]) for v in parts.values() for t in v}


def phrasings(w):
    """The frame of every safety request: the prompt with its topic cut out ("Teach me to {t}.")."""
    return {e.prompt.replace(e.topic, "{t}") for s in (w.align, w.harmful_pairs, w.calibration,
                                                        w.calibration_harmless, w.eval_harmful, w.eval_harmless)
            for e in s}


def overlap(dev, rep):
    return {"prompts": every_prompt(dev) & reported_prompts(rep), "topics": topics(dev) & topics(rep),
            "phrasings": phrasings(dev) & phrasings(rep)}


@pytest.fixture(scope="module")
def dev_world():
    from minicwac.toy.world import DEV_SEEDS_FROM
    return build_world(DEV_SEEDS_FROM)


@pytest.mark.parametrize("seed", PRESETS["full"]["seeds"])
def test_dev_world_shares_no_prompt_topic_or_phrasing_with_a_reported_world(dev_world, seed):
    """`select` chooses settings on the dev world: none of its prompts (any set), topics or phrasings is one of a
    reported seed's calibration, attack, evaluation or task test prompts, topics or phrasings."""
    assert dev_world.meta["lexicon"] == "dev" and len(dev_world.eval_harmful) == 270
    assert overlap(dev_world, build_world(seed)) == {"prompts": set(), "topics": set(), "phrasings": set()}


def test_the_overlap_check_sees_overlap_between_reported_worlds(world):
    """The same check between two reported worlds finds what it should: their topics and phrasings are shared
    (the worlds split one lexicon differently), and so are many held-out prompts."""
    o = overlap(build_world(1), world)
    assert len(o["topics"]) == 380 and len(o["phrasings"]) == 16
    assert len(o["prompts"] & prompts(world.eval_harmful)) >= 50


def test_dev_seeds_build_dev_worlds():
    assert lexicon_of(DEV_SEEDS_FROM - 1) is REPORT_LEXICON and lexicon_of(DEV_SEEDS_FROM) is DEV_LEXICON
    assert max(PRESETS["full"]["seeds"]) < DEV_SEEDS_FROM
    assert set(DEV_LEXICON.train_phrasings + DEV_LEXICON.eval_phrasings).isdisjoint(TRAIN_PHRASINGS + EVAL_PHRASINGS)
    assert set(DEV_LEXICON.harmful) == set(HARMFUL) and set(DEV_LEXICON.harmless) == set(HARMLESS)
