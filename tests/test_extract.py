"""Corpus, extract and split: exact vectors, deterministic positions, disjoint splits, resume."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from nla.config import CorpusConfig, NLAConfig
from nla.corpus import build_corpus, shared_ngram_texts
from nla.data import load_rows
from nla.errors import NLAError
from nla.extract import assign_splits, extract_shard, run_extract, run_split, sample_positions
from nla.io import write_table


class ToyTokenizer:
    """Whitespace tokenizer over a fixed vocabulary, enough to drive extract_shard on tiny models."""

    pad_token_id = 0
    all_special_ids = [0, 1]

    def __init__(self, docs):
        words = sorted({w for d in docs for w in d.split()})
        self.vocab = {w: i + 2 for i, w in enumerate(words)}
        self.inverse = {i: w for w, i in self.vocab.items()}

    def __call__(self, texts, add_special_tokens=True, truncation=True, max_length=None):
        ids = [[1] + [self.vocab[w] for w in t.split()][: (max_length or 10**9) - 1] for t in texts]
        return {"input_ids": ids}

    def decode(self, ids, skip_special_tokens=False):
        return " ".join(self.inverse.get(i, f"<{i}>") for i in ids if i > 1)  # predictions may be unseen ids


def docs_frame(n=6):
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(40)]
    texts = [" ".join(rng.choice(words, size=int(rng.integers(12, 30)))) for _ in range(n)]
    return pd.DataFrame({"doc_id": [f"doc-{i}" for i in range(n)], "text": texts, "source": "toy"})


def toy_cfg(layer=2) -> NLAConfig:
    cfg = NLAConfig()
    cfg.model.layer = layer
    cfg.extract.batch_size = 4
    cfg.extract.min_position = 2
    cfg.extract.positions_per_doc = 3
    cfg.extract.top_next = 0  # the toy tokenizer cannot decode arbitrary predicted ids
    cfg.model.autocast = "off"  # compared with an fp32 forward to 1e-4
    return cfg


def test_extracted_vectors_equal_full_forward_hidden_states(tiny_arch_model):
    arch, model = tiny_arch_model
    docs = docs_frame()
    tok = ToyTokenizer(docs.text)
    rows = extract_shard(model, tok, docs, toy_cfg(layer=2))
    assert len(rows) == 3 * len(docs)
    for row in rows.itertuples():
        ids = tok([docs.set_index("doc_id").text[row.doc_id]])["input_ids"][0]
        with torch.no_grad():
            full = model(torch.tensor([ids]), output_hidden_states=True).hidden_states[3][0, row.position]
        np.testing.assert_allclose(row.vector, full.numpy(), rtol=1e-4, atol=1e-4)
        assert row.norm == pytest.approx(float(np.linalg.norm(row.vector)), rel=1e-5)
        assert 2 <= row.position < row.n_tokens


def test_positions_are_deterministic_and_avoid_special_tokens():
    ids = [1] + list(range(2, 40))
    a = sample_positions("doc-7", ids, {1}, 5, 4, seed=0)
    assert a == sample_positions("doc-7", ids, {1}, 5, 4, seed=0)
    assert a != sample_positions("doc-8", ids, {1}, 5, 4, seed=0)
    assert a == sorted(set(a)) and min(a) >= 4
    special = {ids[p] for p in a[:2]}
    assert not set(sample_positions("doc-7", ids, special | {1}, 5, 4, 0)) & set(a[:2])


def test_positions_do_not_depend_on_sharding_or_batching(tiny_arch_model):
    _, model = tiny_arch_model
    docs = docs_frame(8)
    tok = ToyTokenizer(docs.text)
    cfg = toy_cfg()
    whole = extract_shard(model, tok, docs, cfg)
    cfg.extract.batch_size = 3
    parts = pd.concat([extract_shard(model, tok, docs.iloc[:3], cfg), extract_shard(model, tok, docs.iloc[3:], cfg)])
    key = ["doc_id", "position"]
    a, b = whole.sort_values(key).reset_index(drop=True), parts.sort_values(key).reset_index(drop=True)
    assert a.row_id.tolist() == b.row_id.tolist()
    np.testing.assert_allclose(np.stack(a.vector), np.stack(b.vector), rtol=1e-4, atol=1e-4)


def test_splits_are_disjoint_by_document_and_follow_fractions():
    doc_ids = [f"d{i}" for i in range(200) for _ in range(3)]
    fractions = {"av_sft": 0.4, "ar_sft": 0.3, "rl": 0.2, "eval": 0.1}
    assignment = assign_splits(doc_ids, fractions, seed=1)
    assert set(assignment) == set(doc_ids)
    counts = pd.Series(assignment).value_counts()
    assert counts.to_dict() == {"av_sft": 80, "ar_sft": 60, "rl": 40, "eval": 20}
    assert assignment == assign_splits(list(reversed(doc_ids)), fractions, seed=1)


def load_documents(cfg: CorpusConfig):
    return build_corpus(cfg)[0]


def test_corpus_sources(tmp_path):
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text("\n".join(json.dumps({"body": f"word{i} " * 60}) for i in range(3)))
    assert len(load_documents(CorpusConfig(source=str(jsonl), text_field="body", foreign={}))) == 3
    latin = tmp_path / "c.txt"
    latin.write_bytes("caf\xe9 ".encode("latin1") * 100)
    with pytest.raises(NLAError, match="not UTF-8"):
        load_documents(CorpusConfig(source=str(latin)))
    with pytest.raises(NLAError, match="no string field 'text'"):
        load_documents(CorpusConfig(source=str(jsonl)))
    huge = tmp_path / "h.txt"
    huge.write_text("x " * 50_000)
    assert load_documents(CorpusConfig(source=str(huge), max_chars=1000, foreign={})).text.str.len().max() == 1000


def test_corpus_drops_exact_and_near_duplicates(tmp_path):
    base = " ".join(f"w{i}" for i in range(80))
    near = base.replace("w40", "other")  # one word changed: near-identical shingles
    texts = [base, base, near, " ".join(f"v{i}" for i in range(80))]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"text": t}) for t in texts))
    docs, stats = build_corpus(CorpusConfig(source=str(path), foreign={}))
    assert len(docs) == 2 and stats["exact_duplicates"] == 1 and stats["near_duplicates"] == 1


@pytest.fixture(scope="module")
def embedded_corpus():
    return build_corpus(CorpusConfig(max_docs=500))


def test_the_embedded_corpus_is_multi_source_without_duplicates_or_foreign_leaks(embedded_corpus):
    docs, stats = embedded_corpus
    local, foreign = docs[~docs.foreign], docs[docs.foreign]
    assert set(local.source) == {"wiki", "sotu"} and set(foreign.source) == {"lee"}
    assert len(local) > 400 and 0 < len(foreign) <= 64
    assert docs.text.str.split().str.join(" ").str.lower().is_unique
    assert stats["exact_duplicates"] >= 5  # the Lee corpus' duplicate pairs, at least
    assert not shared_ngram_texts(local.text, foreign.text.tolist(), 8)  # foreign text is unseen text
    assert set(stats["licenses"]) == {"wiki", "sotu", "lee"}


def test_no_eval_text_shares_a_long_ngram_with_training_text(embedded_corpus, tmp_path):
    """The split keeps pieces of one article together and moves eval documents that share an 8-gram
    with a training document (repeated boilerplate) into training: held-out text is unseen text."""
    from nla.sidecar import make_meta, write_sidecar

    docs = embedded_corpus[0]
    act = tmp_path / "act"
    write_table(act / "activations.parquet", pd.DataFrame({"row_id": docs.doc_id + ":9", "doc_id": docs.doc_id}))
    write_sidecar(act, make_meta("nla_dataset", "extract", base_model="x", d_model=4, layer=0))
    write_table(tmp_path / "docs.parquet", docs)
    table = run_split(NLAConfig(), act, tmp_path / "split", tmp_path / "docs.parquet")
    split_of = dict(zip(table.doc_id, table.split, strict=True))
    docs = docs.assign(split=docs.doc_id.map(split_of))
    assert (docs[docs.foreign].split == "foreign").all()
    training = docs[docs.split.isin(["av_sft", "ar_sft", "rl"])]
    held = docs[docs.split == "eval"]
    assert len(held) > 20
    assert not shared_ngram_texts(training.text, held.text.tolist(), 8)
    assert docs.groupby("group").split.nunique().max() == 1  # one article, one split


@pytest.mark.slow
def test_extract_and_split_on_the_embedded_model_resume_after_a_crash(tmp_path, monkeypatch):
    cfg = NLAConfig()
    cfg.corpus.max_docs = 6
    cfg.corpus.foreign = {}
    cfg.extract.shard_docs = 2
    cfg.extract.max_tokens = 32
    docs = load_documents(cfg.corpus)
    write_table(tmp_path / "docs.parquet", docs)

    import nla.extract as extract

    real, calls = extract.extract_shard, []

    def crash_on_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(extract, "extract_shard", crash_on_third)
    with pytest.raises(RuntimeError):
        run_extract(cfg, tmp_path / "docs.parquet", tmp_path / "act", tmp_path / "work")
    assert not (tmp_path / "act" / "activations.parquet").exists()
    calls.clear()
    monkeypatch.setattr(extract, "extract_shard", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    table = run_extract(cfg, tmp_path / "docs.parquet", tmp_path / "act", tmp_path / "work")
    assert len(calls) == 1  # two finished shards were kept
    assert len(table) == 6 * cfg.extract.positions_per_doc and table.norm.gt(0).all()
    run_split(cfg, tmp_path / "act", tmp_path / "split")
    rows = load_rows(tmp_path / "act", tmp_path / "split", d_model=576, layer=20)
    assert rows.groupby("doc_id").split.nunique().max() == 1
    with pytest.raises(NLAError, match="sidecar d_model=576"):
        load_rows(tmp_path / "act", tmp_path / "split", d_model=64)


def test_extract_stores_the_models_own_next_token_predictions(tiny_arch_model):
    """With top_next, each row carries the subject model's k most likely next tokens from the same forward."""
    arch, model = tiny_arch_model
    docs = docs_frame()
    tok = ToyTokenizer(docs.text)
    cfg = toy_cfg(layer=1)
    cfg.extract.top_next = 3
    with torch.no_grad():
        rows = extract_shard(model, tok, docs, cfg)
    base = extract_shard(model, tok, docs, toy_cfg(layer=1))
    np.testing.assert_allclose(np.stack(rows.vector), np.stack(base.vector), rtol=1e-5, atol=1e-5)  # same vectors
    row = rows.iloc[0]
    ids = tok([docs.set_index("doc_id").text[row.doc_id]])["input_ids"][0][: row.position + 1]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -1]
    expected = [tok.decode([i]) for i in logits.topk(3).indices.tolist()]
    assert list(row.next_tokens) == expected
    assert list(row.next_probs) == sorted(row.next_probs, reverse=True) and 0 < sum(row.next_probs) <= 1.0001
