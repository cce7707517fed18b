"""The corpus stage: a table of documents (doc_id, text, source).

Sources: ``embedded`` (the Lee news corpus, 300 real Australian news articles that ship in
the `gensim` wheel, located without importing gensim), a local ``.txt`` (one document per
blank-line-separated paragraph), ``.jsonl`` or ``.parquet`` file, or ``hf:<dataset id>``
through `datasets.load_dataset` (needs a network to the Hub).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pandas as pd

from nla.config import CorpusConfig
from nla.errors import NLAError
from nla.io import read_table, write_table

EMBEDDED_CORPUS = ("gensim", "test/test_data/lee_background.cor")
EMBEDDED_INSTALL_HINT = "pip install gensim"


def embedded_corpus_path() -> Path:
    package, relative = EMBEDDED_CORPUS
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise NLAError(f"the embedded corpus needs the '{package}' wheel; run `{EMBEDDED_INSTALL_HINT}`")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise NLAError(f"{path} is missing from the {package} wheel; reinstall it with `{EMBEDDED_INSTALL_HINT}`")
    return path


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


def load_documents(cfg: CorpusConfig) -> pd.DataFrame:
    """Documents as a frame, cleaned: whitespace collapsed, short ones dropped, long ones cut."""
    if cfg.source == "embedded":
        path = embedded_corpus_path()
        texts, source = _texts_from_file(path, cfg.text_field), f"gensim:{path.name}"
    elif cfg.source.startswith("hf:"):
        texts, source = _texts_from_hub(cfg.source[3:], cfg), cfg.source
    else:
        path = Path(cfg.source)
        texts, source = _texts_from_file(path, cfg.text_field), path.name
    docs = []
    for text in texts:
        text = " ".join(str(text).split())
        if len(text) >= cfg.min_chars:
            docs.append(text[: cfg.max_chars])
        if len(docs) >= cfg.max_docs:
            break
    if not docs:
        raise NLAError(f"no document of at least {cfg.min_chars} characters in {source}; lower corpus.min_chars")
    width = max(4, len(str(len(docs))))
    return pd.DataFrame({"doc_id": [f"doc-{i:0{width}d}" for i in range(len(docs))], "text": docs, "source": source})


def run_corpus(cfg: CorpusConfig, out_path: str | Path) -> pd.DataFrame:
    docs = load_documents(cfg)
    write_table(out_path, docs)
    return docs
