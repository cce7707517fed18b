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
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

import nla.distributed as distributed
from nla.config import NLAConfig
from nla.data import ACTIVATIONS_FILE, SPLIT_NAMES, SPLITS_FILE, pad_batch
from nla.errors import NLAError
from nla.io import read_table, write_table
from nla.models import check_layer, d_model, load_model, residual_at
from nla.sidecar import make_meta, read_sidecar, write_sidecar


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
    pad_id = tokenizer.pad_token_id
    rows = []
    for start in range(0, len(order), ex.batch_size):
        batch = [int(i) for i in order[start : start + ex.batch_size]]
        ids, mask = pad_batch([encoded[i] for i in batch], pad_id)  # (b, longest)
        hidden = residual_at(model, cfg.model.layer, ids.to(device), mask.to(device)).float().cpu()
        for r, i in enumerate(batch):
            doc = docs.iloc[i]
            token_ids = encoded[i]
            for p in sample_positions(doc.doc_id, token_ids, special, ex.positions_per_doc, ex.min_position, ex.seed):
                vector = hidden[r, p].numpy().astype(np.float32)
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
                    }
                )
    return pd.DataFrame(rows)


def check_finite(rows: pd.DataFrame) -> None:
    """Refuse NaN/Inf activations (fp16 overflow, broken weights) with the rows that have them."""
    if len(rows) == 0:
        return
    finite = np.isfinite(np.stack(rows.vector.to_numpy())).all(axis=1)
    if not finite.all():
        bad = rows.row_id[~finite].tolist()[:5]
        raise NLAError(f"non-finite activations in rows {bad}; use float32 (model.dtype) or another layer")


def run_extract(
    cfg: NLAConfig, documents_path: str | Path, out_dir: str | Path, work_dir: str | Path = "data/work/extract"
) -> pd.DataFrame:
    """Extract activations for every document, resuming from finished shards."""
    docs = read_table(documents_path)
    model, tokenizer, source = load_model(cfg.model)
    check_layer(model, cfg.model.layer)
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
            rows=len(table),
            documents=int(table.doc_id.nunique()),
            norm_quantiles={str(q): float(np.quantile(table.norm, q)) for q in (0.01, 0.25, 0.5, 0.75, 0.99)},
            extract=cfg.extract.model_dump(),
            parents=[str(documents_path)],
        ),
    )
    shutil.rmtree(shard_dir, ignore_errors=True)  # the final table is written: shards are no longer needed
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


def run_split(cfg: NLAConfig, activations_dir: str | Path, out_dir: str | Path) -> pd.DataFrame:
    table = read_table(Path(activations_dir) / ACTIVATIONS_FILE, columns=["row_id", "doc_id"])
    assignment = assign_splits(table.doc_id.tolist(), cfg.split.fractions, cfg.split.seed)
    table["split"] = table.doc_id.map(assignment)
    write_table(Path(out_dir) / SPLITS_FILE, table)
    meta = read_sidecar(activations_dir)
    meta.update(
        make_meta(
            "nla_dataset",
            "split",
            split=cfg.split.model_dump(),
            split_rows={s: int((table.split == s).sum()) for s in SPLIT_NAMES},
            parents=[str(activations_dir)],
        )
    )
    write_sidecar(out_dir, meta)
    return table
