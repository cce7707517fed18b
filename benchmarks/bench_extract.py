"""Extraction tokens/s: the extract stage's path vs a plain full forward with `output_hidden_states`.

Ours mirrors `nla.extract.extract_shard`'s model work: documents sorted by length (longest
first, less padding), `nla.models.residual_at` (stops after block K, no LM head), the
configured dtype (bf16 on CUDA), the block-K output moved to the CPU as extract_shard does.
The baseline: the same tokens in corpus order through the full model with
`output_hidden_states=True`, reading `hidden_states[K+1]` at the same positions. Both take
the same sampled positions; the check column is the largest relative difference between
the two sets of vectors. On CUDA a second row measures a cheap what-if for `extract_shard`:
moving only the sampled positions to the CPU instead of the whole block-K output. The last
row times `extract_shard` itself end to end (tokenising, position sampling and prefix
decoding included). Tokens/s counts real (unpadded) tokens.

    python benchmarks/bench_extract.py --size small
"""

from __future__ import annotations

from functools import partial

import numpy as np
import pandas as pd
import torch
from common import SIZES, Result, documents, emit, measure, nla_config, parser, setup

from nla.extract import extract_shard, sample_positions
from nla.models import load_model, residual_at


def padded(encoded: list[list[int]], batch: list[int], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(encoded[i]) for i in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for r, i in enumerate(batch):
        ids[r, : len(encoded[i])] = torch.tensor(encoded[i])
        mask[r, : len(encoded[i])] = 1
    return ids.to(device), mask.to(device)


def run(args, size) -> list[Result]:
    cfg = nla_config(args)
    cfg.extract.max_tokens, cfg.extract.batch_size = size.extract_tokens, size.extract_batch
    model, tokenizer, _ = load_model(cfg.model)
    device = next(model.parameters()).device
    layer, bs, ex = cfg.model.layer, size.extract_batch, cfg.extract
    texts = documents(args, size.extract_docs)
    encoded = tokenizer(texts, add_special_tokens=True, truncation=True, max_length=ex.max_tokens)["input_ids"]
    special = set(tokenizer.all_special_ids)
    positions = [
        sample_positions(f"d{i}", ids, special, ex.positions_per_doc, ex.min_position, ex.seed)
        for i, ids in enumerate(encoded)
    ]
    n_tokens = sum(len(ids) for ids in encoded)

    @torch.no_grad()
    def ours(gather_on_device: bool = False) -> dict[int, np.ndarray]:
        order = np.argsort([len(ids) for ids in encoded])[::-1]
        out = {}
        for start in range(0, len(order), bs):
            batch = [int(i) for i in order[start : start + bs]]
            hidden = residual_at(model, layer, *padded(encoded, batch, tokenizer.pad_token_id, device))
            if gather_on_device:  # move only the sampled positions, not the whole (batch, width, d) block
                rows = torch.tensor([r for r, i in enumerate(batch) for _ in positions[i]], dtype=torch.long)
                cols = torch.tensor([p for i in batch for p in positions[i]], dtype=torch.long)
                picked = hidden[rows.to(device), cols.to(device)].float().cpu().numpy()
                offsets = np.cumsum([0] + [len(positions[i]) for i in batch])
                out.update({i: picked[offsets[r] : offsets[r + 1]] for r, i in enumerate(batch)})
                continue
            hidden = hidden.float().cpu()  # as extract_shard does
            for r, i in enumerate(batch):
                out[i] = hidden[r, positions[i]].numpy()
        return out

    @torch.no_grad()
    def baseline() -> dict[int, np.ndarray]:
        out = {}
        for start in range(0, len(encoded), bs):
            batch = list(range(start, min(start + bs, len(encoded))))
            ids, mask = padded(encoded, batch, tokenizer.pad_token_id, device)
            hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[layer + 1]
            hidden = hidden.float().cpu()
            for r, i in enumerate(batch):
                out[i] = hidden[r, positions[i]].numpy()
        return out

    (base_s, base_peak, base_out), (ours_s, ours_peak, ours_out) = measure(
        (baseline, size.repeats), (ours, size.repeats), device=device
    )
    err = max(
        float(np.linalg.norm(ours_out[i] - base_out[i]) / max(np.linalg.norm(base_out[i]), 1e-12))
        for i in base_out
        if len(positions[i])
    )
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    config = f"{len(texts)} docs, {n_tokens} tokens (max {ex.max_tokens}), batch {bs}, layer {layer}, {dtype}"
    results = [
        Result(
            "extraction",
            config,
            "tokens/s",
            n_tokens / ours_s,
            n_tokens / base_s,
            "residual_at, length-sorted",
            "full forward, hidden_states",
            ours_peak,
            base_peak,
            f"max rel. diff {err:.1e}",
        )
    ]

    if device.type == "cuda":  # a cheap speedup for extract_shard, measured
        [(gather_s, gather_peak, _)] = measure((partial(ours, True), size.repeats), device=device)
        results.append(
            Result(
                "extraction",
                config,
                "tokens/s",
                n_tokens / gather_s,
                n_tokens / base_s,
                "residual_at, sorted, positions gathered on GPU",
                "full forward, hidden_states",
                gather_peak,
                base_peak,
                "what-if for extract_shard",
            )
        )

    docs = pd.DataFrame({"doc_id": [f"d{i}" for i in range(len(texts))], "text": texts})
    [(shard_s, shard_peak, rows)] = measure(
        (partial(extract_shard, model, tokenizer, docs, cfg), size.repeats), device=device
    )
    results.append(
        Result(
            "extraction",
            config + ", end to end",
            "tokens/s",
            n_tokens / shard_s,
            None,
            "extract_shard: + tokenise, positions, decode",
            "-",
            shard_peak,
            None,
            f"{len(rows)} rows",
        )
    )
    return results


if __name__ == "__main__":
    args = parser(__doc__.splitlines()[0]).parse_args()
    setup(args)
    emit(run(args, SIZES[args.size]), args.out)
