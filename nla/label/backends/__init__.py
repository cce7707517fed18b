"""The labeler backends, TRL-style: plain functions in one registry, chosen by `label.backend`.

- baseline: deterministic labels from the text itself (`baseline.py`): the copy control.
- grounded: the text plus the subject model's own next-token predictions (`grounded.py`).
- openai: any /v1/chat/completions server, retried and cached (`openai.py`).
- local: a chat model through transformers with a shared-prefix KV cache (`local.py`).

Each is a `Backend` (`base.py`): `(cfg, contexts, tokens, stats, next_tokens) -> list[Result]`, one raw
response per row; the stage parses them all the same way. Adding one: write that function
in its own module, register it in `BACKENDS` below, and add its name to `label.backend`'s
choices in `nla.config`.
"""

from nla.label.backends.base import Backend, BackendStats, Result
from nla.label.backends.baseline import label_baseline
from nla.label.backends.grounded import label_grounded
from nla.label.backends.local import label_local
from nla.label.backends.openai import label_openai

BACKENDS: dict[str, Backend] = {
    "baseline": label_baseline,
    "grounded": label_grounded,
    "openai": label_openai,
    "local": label_local,
}

__all__ = ["BACKENDS", "Backend", "BackendStats", "Result"]
