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
import re
from collections import Counter

from tqdm.auto import tqdm

from nla.config import NLAConfig
from nla.errors import NLAError
from nla.label.backends.base import BackendStats, Result
from nla.label.backends.baseline import STOPWORDS
from nla.label.parse import ANALYSIS_CLOSE, ANALYSIS_OPEN

N_NEXT = 3  # predictions named in the final-token feature
N_TOPIC = 3


def _quoted(token: str) -> str:
    return json.dumps(token.strip() or token, ensure_ascii=False)


def topic_words(context: str, k: int = N_TOPIC) -> list[str]:
    """The k most frequent content words of the context (ties in first-seen order)."""
    words = re.findall(r"[A-Za-z][A-Za-z'-]+", context)
    return [w for w, _ in Counter(w.lower() for w in words if len(w) > 2 and w.lower() not in STOPWORDS).most_common(k)]


def grounded_response(context: str, token: str, next_tokens: list[str]) -> str:
    """The `<analysis>` block the other backends return too, so one parser judges them all."""
    topics = topic_words(context)
    predicted: list[str] = []
    for t in next_tokens:
        if (q := _quoted(t)) not in predicted:  # " the" and "the" read alike
            predicted.append(q)
    features = [
        f"Topic: {', '.join(topics)}." if topics else "Topic: none yet.",
        f'Before: "{" ".join(context.split()[-5:-1]) or "(none)"}".',
        f"Final token {_quoted(token)}; next likely: {', '.join(predicted[:N_NEXT])}.",
    ]
    return f"{ANALYSIS_OPEN}\n" + "\n".join(f"- {f}" for f in features) + f"\n{ANALYSIS_CLOSE}"


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
    return [
        Result(raw=grounded_response(c, t, list(n)))
        for c, t, n in tqdm(rows, total=len(contexts), desc="label (grounded)", unit="row")
    ]
