"""The local labeler: a chat model through transformers (the embedded SmolLM2 by default).

The system prompt and few-shot turns are the same for every row, so their KV cache is
computed once and shared; each batch only prefills its rows' own text, then decodes
greedily (or samples at `label.temperature`), dropping rows from the batch as soon as they
close `</analysis>`. Every finished row is cached, keyed by model, dtype, prompt and
decoding settings; batches are fixed over all rows, so a resumed run decodes exactly what an
uninterrupted one would have.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from transformers import DynamicCache

import nla.distributed as distributed
from nla.config import ModelConfig, NLAConfig
from nla.data import pad_batch
from nla.errors import NLAError
from nla.label.backends.base import BackendStats, Result
from nla.label.cache import ResponseCache
from nla.label.parse import ANALYSIS_CLOSE, ANALYSIS_OPEN
from nla.label.prompt import chat_messages
from nla.models import load_model, load_tokenizer, resolve_source


def local_model_config(cfg: NLAConfig) -> ModelConfig:
    """The subject model's config when the labeler is the same model, else a fresh one for `local_model`."""
    dtype = cfg.model.dtype if cfg.label.dtype == "auto" else cfg.label.dtype
    if cfg.label.local_model == cfg.model.name:
        return cfg.model.model_copy(update={"dtype": dtype})
    return ModelConfig(name=cfg.label.local_model, dtype=dtype, device=cfg.model.device)


def common_prefix_len(sequences: list[list[int]]) -> int:
    first = sequences[0]
    n = min(len(s) for s in sequences)
    for s in sequences[1:]:
        n = next((i for i in range(n) if s[i] != first[i]), n)
    return n


def label_local(
    cfg: NLAConfig,
    contexts: list[str],
    tokens: list[str],
    stats: BackendStats,
    next_tokens: list[list[str]] | None = None,
) -> list[Result]:
    """Batched greedy (or sampled) decoding with a shared-prefix KV cache; finished rows cached per batch."""

    lab = cfg.label
    mcfg = local_model_config(cfg)
    source = resolve_source(mcfg.name, mcfg.gguf_file, mcfg.revision)
    stats.model = source.fingerprint
    tokenizer = load_tokenizer(source)
    if not getattr(tokenizer, "chat_template", None):
        raise NLAError(f"label.local_model '{lab.local_model}' has no chat template; use a chat/instruct model")
    prompts = [
        tokenizer.apply_chat_template(chat_messages(cfg, c, t), tokenize=False, add_generation_prompt=True)
        + f"{ANALYSIS_OPEN}\n"
        for c, t in zip(contexts, tokens, strict=True)
    ]  # prefilled: the model only writes features
    cache = ResponseCache(Path(lab.cache_dir) / "local")
    keys = [
        cache.key(
            {
                "model": source.fingerprint,
                "dtype": mcfg.dtype,
                "prompt": p,
                "max_new_tokens": lab.max_new_tokens,
                "temperature": lab.temperature,
                "seed": lab.seed,
            }
        )
        for p in prompts
    ]
    results: list[Result | None] = [Result(raw=hit) if (hit := cache.get(k)) is not None else None for k in keys]
    stats.cache_hits = sum(r is not None for r in results)
    for r in results:
        if r is not None:
            stats.progress.row_done(r, cached=True)
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    # Batches are fixed over all rows, shortest first (little padding), so a resumed run decodes each missing
    # row in the same batch, with the same shared prefix, as an uninterrupted run: identical outputs.
    order = sorted(range(len(ids)), key=lambda i: (len(ids[i]), i))
    batches = [order[s : s + lab.batch_size] for s in range(0, len(order), lab.batch_size)]
    todo = [(n, batch) for n, batch in enumerate(batches) if any(results[i] is None for i in batch)]
    # Under a launcher each rank decodes whole batches (dealt round-robin): the same batches as one process.
    if mine := distributed.deal(todo):
        generate_local(cfg, mcfg, tokenizer, ids, keys, mine, results, cache, stats)
    stats.generated_tokens = int(distributed.all_sum(stats.generated_tokens))
    return distributed.merge(results)  # type: ignore[return-value]


def generate_local(
    cfg: NLAConfig,
    mcfg: ModelConfig,
    tokenizer,
    ids: list[list[int]],
    keys: list[str],
    todo: list[tuple[int, list[int]]],
    results: list[Result | None],
    cache: ResponseCache,
    stats: BackendStats,
) -> None:
    # lazy: only the local labeler needs torch, transformers and the model loader

    lab = cfg.label
    model, _, _ = load_model(mcfg)
    device = next(model.parameters()).device
    # Everything before the rows' own text is identical: prefill it once, batch 1, and share its KV cache.
    shared = max(0, common_prefix_len(ids) - 1)  # every row keeps ≥ 1 token of its own
    prefix_cache = DynamicCache(config=model.config)
    with torch.no_grad():
        if shared:
            model(
                input_ids=torch.tensor([ids[0][:shared]], device=device),
                past_key_values=prefix_cache,
                use_cache=True,
                logits_to_keep=1,
            )
    eos = model.generation_config.eos_token_id
    stop_ids = {tokenizer.eos_token_id, *(eos if isinstance(eos, list) else [eos])} - {None}
    generator = torch.Generator(device=device)
    for n, batch in todo:
        generator.manual_seed(lab.seed + n)  # per batch, so a resumed run samples the same tokens
        outputs = decode_batch(
            model,
            prefix_cache,
            shared,
            [ids[i][shared:] for i in batch],
            lab.max_new_tokens,
            lab.temperature,
            tokenizer.pad_token_id,
            stop_ids,
            tokenizer,
            generator,
        )
        for i, out in zip(batch, outputs, strict=True):
            if results[i] is None:  # rows cached by a crashed run keep their files untouched
                stats.generated_tokens += len(out)
                raw = ANALYSIS_OPEN + "\n" + tokenizer.decode(out, skip_special_tokens=True)
                cache.put(keys[i], raw)
                results[i] = Result(raw=raw)
                stats.progress.row_done(results[i])


def decode_batch(
    model,
    prefix_cache,
    shared: int,
    suffixes: list[list[int]],
    max_new_tokens: int,
    temperature: float,
    pad_id: int,
    stop_ids: set[int],
    tokenizer,
    generator,
) -> list[list[int]]:
    """New token ids per row, stopping a row at `</analysis>` or an end token.

    Layout of a batch: [shared prefix | left padding | the row's own tokens]. The attention mask
    hides the padding and positions continue from the prefix, so each row sees exactly its prompt.
    Finished rows leave the batch (their KV rows are dropped), so compute follows the live rows.
    """

    device = next(model.parameters()).device
    b = len(suffixes)
    input_ids, own_mask = pad_batch(suffixes, pad_id, side="left")  # (b, width) each
    mask = torch.cat([own_mask.new_ones((b, shared)), own_mask], dim=1)  # (b, shared + width)
    positions = (shared + own_mask.cumsum(-1) - 1).clamp(min=shared)  # (b, width): padding sits at `shared`
    cache = copy.deepcopy(prefix_cache)
    if shared:
        cache.batch_repeat_interleave(b)
    input_ids, mask, positions = input_ids.to(device), mask.to(device), positions.to(device)
    out: list[list[int]] = [[] for _ in range(b)]
    alive = list(range(b))  # batch row -> original row
    with torch.no_grad():
        logits = model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        ).logits[:, -1]
        next_pos = positions[:, -1:] + 1
        for _ in range(max_new_tokens):
            if temperature > 0:
                probs = torch.softmax(logits.float() / temperature, dim=-1)
                nxt = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
            else:
                nxt = logits.argmax(-1)
            keep = []
            for k, r in enumerate(alive):
                token = int(nxt[k])
                if token in stop_ids:
                    continue
                out[r].append(token)
                if ANALYSIS_CLOSE not in tokenizer.decode(out[r][-8:]):
                    keep.append(k)
            if not keep:
                break
            if len(keep) < len(alive):
                sel = torch.tensor(keep, device=device)
                cache.batch_select_indices(sel)
                mask, next_pos, nxt = mask[sel], next_pos[sel], nxt[sel]
                alive = [alive[k] for k in keep]
            mask = torch.cat([mask, mask.new_ones((len(alive), 1))], dim=1)
            logits = model(
                input_ids=nxt[:, None],
                attention_mask=mask,
                position_ids=next_pos,
                past_key_values=cache,
                use_cache=True,
            ).logits[:, -1]
            next_pos = next_pos + 1
    return out
