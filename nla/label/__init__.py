"""The label stage: warm-start explanations for activation rows.

The paper's warm start: a labeler LLM reads the text up to and including the position and
writes the 2-3 features a language model would use to predict what comes next (the last one
about the final token) inside `<analysis>…</analysis>`. Every backend returns a raw response
per row and one parser judges them all: a row either becomes a cleaned, plain-text
explanation (one feature per line) or is recorded as failed with its reason. Nothing is lost.

    prompt.py    the instruction, few-shot turns and the row's text, as chat messages
    parse.py     the `<analysis>` parser and cleaning, shared by every backend
    cache.py     the on-disk response cache that makes a crashed run resume
    backends/    the labelers (baseline, openai, local), plain functions in one registry
    stage.py     `run_label`: rows in, explanations + failed rows + stats + sidecar out

Usage: `nla label` (or `dvc repro label`); the backend is `label.backend` in params.yaml.
"""

from nla.label.stage import run_label

__all__ = ["run_label"]
