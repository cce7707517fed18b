"""The labeler's prompt, paper-style: instruction, two worked examples, then the row.

The system turn is `label.instruction`; each example and the row itself are a user turn
from `label.user_template` ({context}, {token}), and each example's answer is an assistant
turn in the `<analysis>` format the parser reads. Context is cut by words, not by a
tokenizer, so every backend (and every labeler model) sees the same text.
"""

from __future__ import annotations

import json
import math
import re

from nla.config import NLAConfig
from nla.label.parse import ANALYSIS_CLOSE, ANALYSIS_OPEN

WORDS_PER_TOKEN = 0.75  # context truncation counts words, so every backend sees the same text

# Two worked examples shown to the local and openai labelers before each row (few-shot turns).
FEW_SHOT = (
    (
        "…the coast guard said the fishing boat ignored warning shots and was spotted near the island by",
        " by",
        'A news report about a coast guard chasing a boat.\nWhere the boat was seen.\nThe final token "by" asks who '
        "spotted it.",
    ),
    (
        "Preheat the oven to 180 degrees. Mix the flour, sugar and two",
        " two",
        'A cooking recipe listing ingredients.\nThe final token "two" is a number; a food like "eggs" comes next.',
    ),
)


def context_of(prefix: str, context_tokens: int) -> str:
    """The end of `prefix` (≈ context_tokens tokens, counted as words), with '…' when cut."""
    words = re.findall(r"\s*\S+", prefix)
    keep = max(1, math.ceil(context_tokens * WORDS_PER_TOKEN))
    if len(words) <= keep:
        return prefix.strip()
    return "…" + "".join(words[-keep:]).lstrip()


def fill(template: str, context: str, token: str) -> str:
    """The user turn: slots filled in one pass, so braces inside the text are left alone."""
    values = {"context": context, "token": json.dumps(token, ensure_ascii=False)}  # quotes show the token's spaces
    return re.sub(r"\{(context|token)\}", lambda m: values[m.group(1)], template)


def chat_messages(cfg: NLAConfig, context: str, token: str) -> list[dict[str, str]]:
    """System instruction, the few-shot turns, then this row's text and final token."""
    lab = cfg.label
    messages = [{"role": "system", "content": lab.instruction}]
    for ex_context, ex_token, ex_answer in FEW_SHOT:
        messages.append({"role": "user", "content": fill(lab.user_template, ex_context, ex_token)})
        messages.append({"role": "assistant", "content": f"{ANALYSIS_OPEN}\n{ex_answer}\n{ANALYSIS_CLOSE}"})
    messages.append({"role": "user", "content": fill(lab.user_template, context, token)})
    return messages
