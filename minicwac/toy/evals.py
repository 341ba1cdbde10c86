"""Evaluation on the toy world: the core's refusal evaluation on its held-out prompts, with its answer keys, and
fine-tune accuracy (FA) on a task's test split."""
from __future__ import annotations

import math

from ..core.evals import answer_matches, evaluate_prompts, generate_answers
from ..io.tokenizer import ChatTokenizer
from .world import Example, World


def evaluate(model, tok: ChatTokenizer, world: World, task: str | None = None,
             max_new_tokens: int = 40, judge=None) -> dict:
    """HS (by `judge`, default the refusal matcher), compliance, refusal score, over-refusal (held-out sets) and
    FA on `task`'s test split, in percent."""
    if task is not None and task not in world.tasks:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(world.tasks)}")
    harmful: list[Example] = world.eval_harmful
    res = evaluate_prompts(model, tok, [e.prompt for e in harmful], [e.prompt for e in world.eval_harmless],
                           keywords=[e.keywords for e in harmful], max_new_tokens=max_new_tokens, judge=judge)
    res["fa"] = math.nan if task is None else task_accuracy(model, tok, world.tasks[task].test, max_new_tokens=8)
    return res


def task_accuracy(model, tok: ChatTokenizer, test: list[Example], max_new_tokens: int = 8) -> float:
    """FA: % of test examples whose greedy answer exactly matches the label."""
    if not test:
        raise ValueError("no test examples to score FA on; expected at least one")
    answers = generate_answers(model, tok, [e.prompt for e in test], max_new_tokens)
    return 100.0 * sum(answer_matches(a, e.label) for a, e in zip(answers, test)) / len(test)
