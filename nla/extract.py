"""The extract and split stages: cached activations as a first-class artifact.

extract: documents → residual-stream vectors at block K, a few positions per document.
Positions are drawn with a generator seeded by (seed, doc_id), so any sharding of the corpus
reproduces the same rows. Documents are processed in shards; each finished shard is written
atomically to a work folder keyed by the config, so a crashed run resumes where it stopped.
Vectors are stored raw (float32) with their norms.

split: assigns whole documents to av_sft / ar_sft / rl / eval, so no document leaks between
training and held-out rows.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

import nla.distributed as distributed
from nla.config import NLAConfig
from nla.corpus import shared_ngram_texts
from nla.data import ACTIVATIONS_FILE, FOREIGN, ROW_SPLITS, SPLIT_NAMES, SPLITS_FILE, pad_batch
from nla.errors import NLAError
from nla.io import read_table, write_table
from nla.models import (
    autocast,
    check_layer,
    context_length,
    d_model,
    load_model,
    model_autocast,
    next_token_logits,
    residual_and_final,
    residual_at,
)
from nla.provenance import beside, write_provenance
from nla.sidecar import make_meta, read_sidecar, write_sidecar

log = logging.getLogger(__name__)


def stable_seed(*parts: object) -> int:
    """A 64-bit seed from arbitrary parts, identical across processes and machines."""
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "little")


def sample_positions(
    doc_id: str, token_ids: list[int], special_ids: set[int], k: int, min_position: int, seed: int
) -> list[int]:
    """Up to k distinct positions ≥ min_position that are not special tokens, sorted."""
    candidates = [p for p in range(min_position, len(token_ids)) if token_ids[p] not in special_ids]
    if not candidates:
        return []
    rng = np.random.default_rng(stable_seed(seed, doc_id))
    chosen = rng.choice(len(candidates), size=min(k, len(candidates)), replace=False)
    return sorted(candidates[i] for i in chosen)


def _config_key(cfg: NLAConfig, fingerprint: str, docs: pd.DataFrame) -> str:
    """Names the shard folder: shards of a crashed run are reused only for the same model, params and documents."""
    documents = hashlib.sha256("\0".join(docs.doc_id + "\t" + docs.text).encode()).hexdigest()
    blob = json.dumps([cfg.model.model_dump(), cfg.extract.model_dump(), fingerprint, documents], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


@torch.no_grad()
def extract_shard(model, tokenizer, docs: pd.DataFrame, cfg: NLAConfig) -> pd.DataFrame:
    """Activations for one shard of documents, batched by length."""
    ex = cfg.extract
    special = set(tokenizer.all_special_ids)
    encoded = tokenizer(list(docs.text), add_special_tokens=True, truncation=True, max_length=ex.max_tokens)[
        "input_ids"
    ]
    order = np.argsort([len(ids) for ids in encoded])[::-1]  # longest first: less padding per batch
    device = next(model.parameters()).device
    mixed = model_autocast(model, cfg.model.autocast)
    pad_id = tokenizer.pad_token_id
    rows = []
    for start in range(0, len(order), ex.batch_size):
        batch = [int(i) for i in order[start : start + ex.batch_size]]
        ids, mask = pad_batch([encoded[i] for i in batch], pad_id)  # (b, longest)
        ids, mask = ids.to(device), mask.to(device)
        with autocast(device, mixed):
            if ex.top_next:
                hidden, final = residual_and_final(model, cfg.model.layer, ids, mask)  # (b, T, d) each
            else:
                hidden, final = residual_at(model, cfg.model.layer, ids, mask), None
        hidden = hidden.float().cpu()
        for r, i in enumerate(batch):
            doc = docs.iloc[i]
            token_ids = encoded[i]
            positions = sample_positions(doc.doc_id, token_ids, special, ex.positions_per_doc, ex.min_position, ex.seed)
            predicted = (
                _top_next(model, tokenizer, final[r, positions].float(), ex.top_next) if final is not None else None
            )
            for j, p in enumerate(positions):
                vector = hidden[r, p].numpy().astype(np.float32)
                extra = {} if predicted is None else {"next_tokens": predicted[0][j], "next_probs": predicted[1][j]}
                rows.append(
                    {
                        "row_id": f"{doc.doc_id}:{p}",
                        "doc_id": doc.doc_id,
                        "position": p,
                        "n_tokens": len(token_ids),
                        "token_id": int(token_ids[p]),
                        "token": tokenizer.decode([token_ids[p]]),
                        "prefix": tokenizer.decode(token_ids[: p + 1], skip_special_tokens=True),
                        "norm": float(np.linalg.norm(vector)),
                        "vector": vector,
                        **extra,
                    }
                )
    return pd.DataFrame(rows)


def _top_next(model, tokenizer, final: torch.Tensor, k: int) -> tuple[list[list[str]], list[list[float]]]:
    """The subject model's k most likely next tokens (decoded) and their probabilities at each of `final`'s rows."""
    if final.shape[0] == 0:
        return [], []
    probs = torch.softmax(next_token_logits(model, final).float(), dim=-1)  # (positions, vocab)
    top_p, top_i = probs.topk(k, dim=-1)
    tokens = [[tokenizer.decode([t]) for t in row] for row in top_i.tolist()]
    return tokens, [[round(float(x), 4) for x in row] for row in top_p.tolist()]


def check_finite(rows: pd.DataFrame) -> None:
    """Refuse NaN/Inf activations (fp16 overflow, broken weights) with the rows that have them."""
    if len(rows) == 0:
        return
    finite = np.isfinite(np.stack(rows.vector.to_numpy())).all(axis=1)
    if not finite.all():
        bad = rows.row_id[~finite].tolist()[:5]
        raise NLAError(f"non-finite activations in rows {bad}; use float32 (model.dtype) or another layer")


def check_window(model, tokenizer, docs: pd.DataFrame, max_tokens: int) -> None:
    """Refuse a window longer than the model's context; say how many documents the window cuts.

    Documents are read through their first `extract.max_tokens` tokens (positions are sampled
    there), a choice, not an accident: the warning says how much of the corpus it leaves unread.
    """
    context = context_length(model)
    if context is not None and max_tokens > context:
        raise NLAError(
            f"extract.max_tokens={max_tokens} is longer than the model's context of {context} tokens; "
            f"set extract.max_tokens to at most {context}"
        )
    lengths = [len(ids) for ids in tokenizer(list(docs.text), add_special_tokens=True)["input_ids"]]
    cut = sum(n > max_tokens for n in lengths)
    if cut:
        log.warning(
            "%d of %d documents are longer than extract.max_tokens=%d and are read through their first %d tokens "
            "(the longest has %d); raise extract.max_tokens to read more of them",
            cut,
            len(lengths),
            max_tokens,
            max_tokens,
            max(lengths),
        )


def run_extract(
    cfg: NLAConfig,
    documents_path: str | Path,
    out_dir: str | Path,
    work_dir: str | Path = "data/work/extract",
    *,
    provenance_path: str | Path | None = None,
) -> pd.DataFrame:
    """Extract activations for every document, resuming from finished shards; the time taken goes to provenance."""
    started = time.perf_counter()
    docs = read_table(documents_path)
    model, tokenizer, source = load_model(cfg.model)
    check_layer(model, cfg.model.layer)
    check_window(model, tokenizer, docs, cfg.extract.max_tokens)
    key = _config_key(cfg, source.fingerprint, docs)
    shard_dir = Path(work_dir) / key
    shard_dir.mkdir(parents=True, exist_ok=True)
    n_shards = (len(docs) + cfg.extract.shard_docs - 1) // cfg.extract.shard_docs
    frames = {}
    # Under a launcher each rank extracts whole shards (dealt round-robin): a shard's rows do not depend on
    # which rank or how many ranks computed it, so the gathered table equals the one-process table.
    mine = distributed.deal(range(n_shards))
    paths = {s: shard_dir / f"shard-{s:05d}.parquet" for s in mine}
    if done := int(distributed.all_sum(sum(path.exists() for path in paths.values()))):
        tqdm.write(f"extract: resuming, {done} of {n_shards} shards already done")
    bar = tqdm(mine, desc="extract (shards)", unit="shard")
    for s in bar:
        path = paths[s]
        if not path.exists():
            part = docs.iloc[s * cfg.extract.shard_docs : (s + 1) * cfg.extract.shard_docs]
            shard = extract_shard(model, tokenizer, part, cfg)
            check_finite(shard)  # before the shard is kept: a resumed run must never reuse bad rows
            write_table(path, shard)
        frames[s] = read_table(path)
        bar.set_postfix(rows=sum(len(f) for f in frames.values()))
    gathered = distributed.gather(frames)
    if gathered is None:  # not rank 0: rank 0 writes the table; this rank's rows are returned
        distributed.barrier()
        return pd.concat(list(frames.values()) or [pd.DataFrame()], ignore_index=True)
    frames = {s: frame for part in gathered for s, frame in part.items()}
    table = pd.concat([frames[s] for s in range(n_shards)], ignore_index=True)
    out_dir = Path(out_dir)
    write_table(out_dir / ACTIVATIONS_FILE, table)
    write_sidecar(
        out_dir,
        make_meta(
            "nla_dataset",
            "extract",
            base_model=cfg.model.name,
            base_model_fingerprint=source.fingerprint,
            d_model=d_model(model),
            layer=cfg.model.layer,
            n_layers=model.config.num_hidden_layers,
            autocast=str(model_autocast(model, cfg.model.autocast) or "off").removeprefix("torch."),
            rows=len(table),
            documents=int(table.doc_id.nunique()),
            norm_quantiles={str(q): float(np.quantile(table.norm, q)) for q in (0.01, 0.25, 0.5, 0.75, 0.99)},
            extract=cfg.extract.model_dump(),
            parents=[str(documents_path)],
        ),
    )
    shutil.rmtree(shard_dir, ignore_errors=True)  # the final table is written: shards are no longer needed
    seconds = time.perf_counter() - started
    write_provenance(
        provenance_path or beside(out_dir), "extract", seconds=round(seconds, 1), rows_per_s=len(table) / seconds
    )
    distributed.barrier()  # the others wait until the table is there
    return table


def assign_splits(doc_ids: list[str], fractions: dict[str, float], seed: int) -> dict[str, str]:
    """Whole documents to splits, in proportion to `fractions`, deterministically."""
    unique = sorted(set(doc_ids))
    order = np.random.default_rng(stable_seed(seed, "split")).permutation(len(unique))
    bounds = np.cumsum([fractions[name] for name in SPLIT_NAMES]) * len(unique)
    assignment = {}
    for rank, idx in enumerate(order):
        split = next((name for name, b in zip(SPLIT_NAMES, bounds, strict=True) if rank < round(b)), SPLIT_NAMES[-1])
        assignment[unique[idx]] = split
    return assignment


def run_split(
    cfg: NLAConfig,
    activations_dir: str | Path,
    out_dir: str | Path,
    documents_path: str | Path | None = None,
    *,
    needed: tuple[str, ...] = SPLIT_NAMES,
) -> pd.DataFrame:
    """Rows to splits by document group; foreign documents to `foreign`; no eval text shares a long n-gram with training.

    With the documents table, the unit of assignment is a document's `group` (all pieces cut
    from one article go to one split) and its `foreign` flag sends it to the foreign split. An
    eval group that shares a word `corpus.leak_ngram`-gram with a training document (boilerplate
    repeated across speeches, a quoted passage) moves to av_sft, so held-out text is unseen text.

    Every split feeds a later stage of the pipeline (av_sft, ar_sft, rl, and eval for evaluate
    and the quality gate), so a `needed` split with a share of 0 is refused here rather than
    failing stages later, and one that got no document is warned about; a partial pipeline (a
    test, a notebook) names the splits it uses in `needed`.
    """
    empty = [name for name in needed if cfg.split.fractions[name] == 0]
    if empty:
        raise NLAError(
            f"split.fractions gives {empty} a share of 0, but the {'/'.join(empty)} stage needs documents; "
            "give every split a positive fraction (the four sum to 1)"
        )
    table = read_table(Path(activations_dir) / ACTIVATIONS_FILE, columns=["row_id", "doc_id"])
    docs = read_table(documents_path) if documents_path is not None else None
    if docs is None or "group" not in docs.columns:
        docs = pd.DataFrame(
            {"doc_id": table.doc_id.unique(), "text": None, "group": table.doc_id.unique(), "foreign": False}
        )
    docs = docs[docs.doc_id.isin(set(table.doc_id))]
    local = docs[~docs.foreign.astype(bool)]
    assignment = assign_splits(local.group.tolist(), cfg.split.fractions, cfg.split.seed)
    split_of = {doc: assignment[group] for doc, group in zip(local.doc_id, local.group, strict=True)}
    moved = 0
    if local.text.notna().all():
        training = local[local.doc_id.map(split_of) != "eval"].text
        held = local[local.doc_id.map(split_of) == "eval"]
        leaking = {held.group.iloc[i] for i in shared_ngram_texts(training, held.text.tolist(), cfg.corpus.leak_ngram)}
        for doc, group in zip(local.doc_id, local.group, strict=True):
            if group in leaking:
                split_of[doc], moved = "av_sft", moved + 1
    split_of |= dict.fromkeys(docs[docs.foreign.astype(bool)].doc_id, FOREIGN)
    table["split"] = table.doc_id.map(split_of)
    if missing := [name for name in needed if name not in set(split_of.values())]:
        log.warning(
            "splits %s got no document of %d (too few documents for split.fractions); raise corpus.max_docs",
            missing,
            len(local),
        )
    write_table(Path(out_dir) / SPLITS_FILE, table)
    meta = read_sidecar(activations_dir)
    meta.update(
        make_meta(
            "nla_dataset",
            "split",
            split=cfg.split.model_dump(),
            split_rows={s: int((table.split == s).sum()) for s in ROW_SPLITS},
            eval_documents_moved_for_ngram_overlap=moved,
            parents=[str(activations_dir)] + ([str(documents_path)] if documents_path is not None else []),
        )
    )
    write_sidecar(out_dir, meta)
    return table
