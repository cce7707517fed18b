"""The grounded labeler: what the subject model itself computes at the position, in the label format.

The `baseline` labeler copies the text, so an AR reading its labels reads the input, and an
AV trained on them learns to recite context. This one keeps the paper's 2-3 short features,
the last one about the final token, and grounds one feature in the subject model's own forward
pass at the position: its most likely next tokens (extract's `next_tokens`, computed in the same
forward that produced the activation), which a copy of the context cannot contain. They get a line
of their own, so the last line names the final token alone and the `final_only` control of
evaluate reads exactly what knowing the token gives. With the default `label.topic_words: 0` and
`label.before_words: 1`:

    Before: "<the word before the final one>".
    Next likely: "<a>", "<b>", "<c>".
    Final token "<token>".
"""

from __future__ import annotations

import json

from nla.config import NLAConfig
from nla.errors import NLAError
from nla.label.backends.base import BackendStats, Result, computed
from nla.label.backends.baseline import analysis_block, context_features

N_NEXT = 3  # predictions named in the next-token feature


def _quoted(token: str) -> str:
    return json.dumps(token.strip() or token, ensure_ascii=False)


def final_feature(token: str) -> str:
    """The last line of a grounded label: the final token, named alone."""
    return f"Final token {_quoted(token)}."


def grounded_response(context: str, token: str, next_tokens: list[str], topic_words: int, before_words: int) -> str:
    """The text's features, what the subject model predicts next, then the final token."""
    predicted: list[str] = []
    for t in next_tokens:
        if (q := _quoted(t)) not in predicted:  # " the" and "the" read alike
            predicted.append(q)
    features = context_features(context, topic_words, before_words)
    return analysis_block([*features, f"Next likely: {', '.join(predicted[:N_NEXT])}.", final_feature(token)])


def label_grounded(
    cfg: NLAConfig,
    contexts: list[str],
    tokens: list[str],
    stats: BackendStats,
    next_tokens: list[list[str]] | None = None,
) -> list[Result]:
    if next_tokens is None:
        raise NLAError(
            "the grounded labeler needs the subject model's predictions; set extract.top_next > 0, rerun extract"
        )
    stats.model = "grounded"
    topic, before = cfg.label.topic_words, cfg.label.before_words
    rows = zip(contexts, tokens, next_tokens, strict=True)
    return computed((grounded_response(c, t, list(n), topic, before) for c, t, n in rows), stats)
