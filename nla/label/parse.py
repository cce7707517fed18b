"""The one parser every labeler's response goes through: `<analysis>` block -> plain features.

Labelers format their answers every which way (bullets, numbering, markdown, headings,
special tokens, the example answers quoted back). The AV is trained to write what this
module returns, so it strips all of that to one plain-text feature per line, and refuses a
response (with a reason) rather than guess: a malformed row is recorded as failed, never
silently repaired.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

ANALYSIS_OPEN, ANALYSIS_CLOSE = "<analysis>", "</analysis>"
FEATURE_SEP = "\n"  # an explanation is its features, one per line

_ANALYSIS = re.compile(r"<analysis>((?:(?!<analysis>).)*?)</analysis>", re.S | re.I)  # innermost when repeated
# Tags never belong in a plain-text explanation: special tokens (<|im_end|>), html/xml tags (</explanation> would end
# the AV's target early), and fragments of the prompts' own tags, even unclosed.
_TAG = re.compile(r"<\|[^<>|]*\|>|</?\s*[A-Za-z_][\w:-]*\s*/?>|</?\s*(?:analysis|explanation|concept)\b", re.I)
# One leading bullet: dashes, stars, dots and box/shape glyphs, "1." "(2)" "b)" "Feature 3:" "> ".
_BULLET = re.compile(
    r"^(?:[-*+•‣∙·–—>\u25a0-\u25ff]+|\(?\d{1,2}[.):]|\(?[a-zA-Z][.)]|feature\s*\d+\s*[:.)\-]?)\s+", re.I
)
_HEADING = re.compile(r"^\s*#{1,6}\s")  # a markdown heading names a section, it is not a feature
_INLINE_NUMBER = re.compile(r"(?:^|\s)\(?\d{1,2}[.)]\s+")  # "1. foo 2. bar" written on one line
_MARKDOWN = re.compile(r"\*\*|__|`+|~~|(?<!\w)[*_](?=\w)|(?<=\w)[*_](?!\w)")


@dataclass(frozen=True)
class Parsed:
    explanation: str | None  # the features, one per line; None when malformed
    n_features: int
    reason: str | None  # why the row was dropped; None when it is well-formed


def clean_features(body: str) -> list[str]:
    """Plain-text features of an analysis body: tags, bullets, numbering, markdown and blank lines removed."""
    lines = [line for line in body.replace("\r", "\n").split("\n") if line.strip() and not _HEADING.match(line)]
    if len(lines) == 1 and len(_INLINE_NUMBER.findall(lines[0])) >= 2:
        lines = [part for part in _INLINE_NUMBER.split(lines[0]) if part.strip()]
    features = []
    for line in lines:
        text = line
        while (untagged := _TAG.sub("", text)) != text:  # repeated: removing one tag may join another
            text = untagged
        text = text.strip()
        while (stripped := _BULLET.sub("", text, count=1)) != text:
            text = stripped.strip()
        text = " ".join(_MARKDOWN.sub("", text).split())
        if re.search(r"\w", text):  # separator lines ("---", "***") carry no feature
            features.append(text)
    return features


def has_marker_char(text: str, ranges: list[tuple[int, int]], marker_char: str | None = None) -> bool:
    """Whether `text` holds a character that the AV prompt would read as an injection site."""
    return any(any(a <= ord(c) <= b for a, b in ranges) or c == marker_char for c in text)


def parse_response(
    raw: object, min_features: int, marker_ranges: list[tuple[int, int]], marker_char: str | None = None
) -> Parsed:
    """Explanation of one labeler response, or the reason it is malformed. Never raises.

    Reasons: no_analysis, unclosed_analysis, empty, marker_leak (a marker-range character would add
    injection sites in the AV prompt), too_few_features (fewer than `min_features`).
    """
    if not isinstance(raw, str):
        return Parsed(None, 0, "no_analysis")
    blocks = _ANALYSIS.findall(raw)
    if not blocks:
        reason = "unclosed_analysis" if ANALYSIS_OPEN in raw.lower() else "no_analysis"
        return Parsed(None, 0, reason)
    features = clean_features(blocks[-1])  # the last block: a labeler that quotes the example answers after it
    if not features:
        return Parsed(None, 0, "empty")
    explanation = FEATURE_SEP.join(features)
    if has_marker_char(explanation, marker_ranges, marker_char):
        return Parsed(None, len(features), "marker_leak")
    if len(features) < min_features:
        return Parsed(None, len(features), "too_few_features")
    return Parsed(explanation, len(features), None)
