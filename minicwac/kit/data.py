"""Your fine-tuning data: conversations from a JSONL file, rendered with the model's chat template."""
from __future__ import annotations

import json
from pathlib import Path

from ..core.data import Seq, encode_conversations
from ..io.prompts import jsonl_values


def load_conversations(path: str | Path) -> list[list[dict]]:
    """Conversations from a JSONL file: one {"messages": [{"role", "content"}, ...]} or {"prompt", "completion"}
    object per line (blank lines skipped). Every error names the file and the line."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; expected a JSONL file of conversations")
    if not path.is_file():  # a folder, /dev/null, a pipe: nothing to read lines from
        kind = "a folder" if path.is_dir() else "not a regular file"
        raise ValueError(f"{path} is {kind}; expected a JSONL file of conversations")
    out = []
    # every line named: encoding, JSON syntax, depth and unpaired surrogates (`io.prompts`, as for prompt files)
    for where, d in jsonl_values(path):
        if isinstance(d, dict) and "messages" in d:
            msgs = d["messages"]
            if not isinstance(msgs, list) or not msgs:
                raise ValueError(f"{where}: \"messages\" must be a non-empty list of {{role, content}} objects")
            for i, m in enumerate(msgs):
                if not (isinstance(m, dict) and isinstance(m.get("role"), str)
                        and isinstance(m.get("content"), str)):
                    raise ValueError(f"{where}: message {i} must be an object with string \"role\" and "
                                     f"\"content\", got {json.dumps(m)[:80]}")
            if not any(m["role"] == "assistant" for m in msgs):
                raise ValueError(f"{where}: the conversation has no assistant turn (nothing to train on)")
            out.append([{"role": m["role"], "content": m["content"]} for m in msgs])
        elif isinstance(d, dict) and isinstance(d.get("prompt"), str) and isinstance(d.get("completion"), str):
            out.append([{"role": "user", "content": d["prompt"]},
                        {"role": "assistant", "content": d["completion"]}])
        else:
            raise ValueError(f"{where}: expected {{\"messages\": [...]}} or "
                             f"{{\"prompt\": str, \"completion\": str}}")
    if not out:
        raise ValueError(f"{path} holds no conversations")
    return out


def encode_data(tok, conversations: list[list[dict]], max_len: int,
                too_long: str = "truncate") -> tuple[list[Seq], int]:
    """Render with the model's chat template; loss on the assistant tokens only. A sequence longer than max_len
    is cut (too_long="truncate") or refused ("refuse"). Returns (sequences, number cut)."""
    if too_long not in ("truncate", "refuse"):
        raise ValueError(f"too_long={too_long!r}, expected 'truncate' or 'refuse'")
    seqs, cut = [], 0
    for i, (ids, mask) in enumerate(encode_conversations(tok, conversations, max_len=None)):
        if not any(mask):
            raise ValueError(f"conversation {i + 1}: the chat template marks no assistant token (nothing to train on)")
        if len(ids) > max_len:
            if too_long == "refuse":
                raise ValueError(f"conversation {i + 1} has {len(ids)} tokens, more than --max-len {max_len} "
                                 "(raise --max-len or pass --too-long truncate)")
            cut += 1
            ids, mask = ids[:max_len], mask[:max_len]
            if not any(mask):
                raise ValueError(f"conversation {i + 1}: no assistant token is left in its first {max_len} tokens "
                                 "(raise --max-len)")
        seqs.append((ids, mask))
    return seqs, cut
