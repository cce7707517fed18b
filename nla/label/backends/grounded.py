"""The grounded labeler: what the subject model itself computes at the position, in the label format.

The `baseline` labeler copies the text, so an AR reading its labels reads the input, and an
AV trained on them learns to recite context. This one keeps the paper's 2-3 short features,
the last one about the final token, and grounds that last feature in the subject model's own
forward pass at the position: its most likely next tokens (extract's `next_tokens`, computed
in the same forward that produced the activation). A copy of the context cannot contain them.

    Topic: <up to 3 content words of the context>.
    Before: "<the last few words>".
    Final token "<token>"; next likely: "<a>", "<b>", "<c>".
"""

from __future__ import annotations

import json

from nla.config import NLAConfig
from nla.errors import NLAError
from nla.label.backends.base import BackendStats, Result, computed
from nla.label.backends.baseline import analysis_block, context_features

N_NEXT = 3  # predictions named in the final-token feature


def _quoted(token: str) -> str:
    return json.dumps(token.strip() or token, ensure_ascii=False)


def grounded_response(context: str, token: str, next_tokens: list[str]) -> str:
    """The text's two features, then the final token with what the subject model predicts after it."""
    predicted: list[str] = []
    for t in next_tokens:
        if (q := _quoted(t)) not in predicted:  # " the" and "the" read alike
            predicted.append(q)
    final = f"Final token {_quoted(token)}; next likely: {', '.join(predicted[:N_NEXT])}."
    return analysis_block([*context_features(context), final])


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
    rows = zip(contexts, tokens, next_tokens, strict=True)
    return computed((grounded_response(c, t, list(n)) for c, t, n in rows), stats)
