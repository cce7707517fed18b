"""The baseline labeler: deterministic labels from the text itself, no model.

Topic words, the last few words and the final token, in the same `<analysis>` format as the
LLM labelers: a floor the LLM labels must beat, and a fast stand-in for tests.
"""

from __future__ import annotations

import json
import re
from collections import Counter

from nla.config import NLAConfig
from nla.label.backends.base import BackendStats, Result, computed
from nla.label.parse import ANALYSIS_CLOSE, ANALYSIS_OPEN

_STOPWORDS_TEXT = (
    "a about above after again against all also am an and any are as at be because been before being below between "
    "both but by can could did do does doing down during each few for from further had has have having he her here "
    "hers him his how i if in into is it its itself just me more most my no nor not now of off on once only or other "
    "our ours out over own said same says she should so some such than that the their theirs them then there these "
    "they this those through to too under until up very was we were what when where which while who whom why will "
    "with would you your new one two three last first year years told mr mrs ms"
)
STOPWORDS = frozenset(_STOPWORDS_TEXT.split())
TOPIC, BEFORE = "Topic:", "Before:"  # how the two context lines start: read off the text, not the model


def token_kind(token: str) -> str:
    body = token.strip()
    if not body:
        return "whitespace"
    if body.isdigit():
        return "a number"
    if not any(c.isalnum() for c in body):
        return "punctuation"
    if token[0].isspace():
        return "the start of a word"
    return "the middle of a word"


def context_features(context: str, topic_words: int, before_words: int) -> list[str]:
    """The features read off the text: its `topic_words` most common content words (ties keep first-seen
    order) and the `before_words` words before the final one; a count of 0 drops that line."""
    features = []
    if topic_words:
        words = re.findall(r"[A-Za-z][A-Za-z'-]+", context)
        content = [w.lower() for w in words if len(w) > 2 and w.lower() not in STOPWORDS]
        topics = [w for w, _ in Counter(content).most_common(topic_words)]
        features.append(f"{TOPIC} {', '.join(topics)}." if topics else f"{TOPIC} none yet.")
    if before_words:
        recent = " ".join(context.split()[-1 - before_words : -1]) or "(none)"
        features.append(f'{BEFORE} "{recent}".')
    return features


def analysis_block(features: list[str]) -> str:
    """Features as the `<analysis>` block every backend returns, so one parser judges them all."""
    return f"{ANALYSIS_OPEN}\n" + "\n".join(f"- {f}" for f in features) + f"\n{ANALYSIS_CLOSE}"


def baseline_response(context: str, token: str, topic_words: int, before_words: int) -> str:
    """A deterministic analysis from the text: topic words, the last few words, the final token."""
    # Compact on purpose: short labels are easier for the AR to read back (measured: the AR's FVE on
    # terse "Final token ... Context ..." labels was far higher than on sentence-style ones).
    final = f"Final token: {json.dumps(token.strip() or token, ensure_ascii=False)} ({token_kind(token)})."
    return analysis_block([*context_features(context, topic_words, before_words), final])


def label_baseline(
    cfg: NLAConfig,
    contexts: list[str],
    tokens: list[str],
    stats: BackendStats,
    next_tokens: list[list[str]] | None = None,
) -> list[Result]:
    stats.model = "baseline"
    topic, before = cfg.label.topic_words, cfg.label.before_words
    rows = zip(contexts, tokens, strict=True)
    return computed((baseline_response(c, t, topic, before) for c, t in rows), stats)
