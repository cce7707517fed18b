"""AR forward rows/s: `nla.ar.AR.reconstruct` vs the full model's forward on the same AR prompts.

Ours: the AR as ar_sft builds it (`nla.ar.new_ar`: blocks 0..K, final norm → identity,
identity head, LoRA adapter unmerged), `reconstruct` with length-sorted batches. The
baseline: the untruncated subject model with `output_hidden_states=True` on the same
prompt tokens in the given order, reading `hidden_states[K+1]` at the last real token, i.e.
what one computes without truncating the model. An untrained AR (LoRA B = 0, identity head)
computes exactly that vector, so the check column is their largest relative difference.

    python benchmarks/bench_ar.py --size small
"""

from __future__ import annotations

from functools import partial

import numpy as np
import torch
from common import SIZES, Result, documents, emit, measure, nla_config, parser, setup

from nla.ar import last_token_index, new_ar, position_ids_from_mask
from nla.models import load_model


def explanation_like(args, n: int, seed: int = 0) -> list[str]:
    """`n` texts of 15–60 words cut from real documents: the length range of explanations."""
    rng = np.random.default_rng(seed)
    words = [doc.split() for doc in documents(args, n)]
    return [" ".join(w[: int(rng.integers(15, 61))]) for w in words]


def run(args, size) -> list[Result]:
    cfg = nla_config(args)
    cfg.ar_sft.lora.r, cfg.ar_sft.lora.alpha = size.lora_r, 2 * size.lora_r
    ar = new_ar(cfg).eval()
    model, _, _ = load_model(cfg.model)
    device, layer, bs = ar.device, cfg.model.layer, size.ar_batch
    texts = explanation_like(args, size.ar_rows)

    @torch.no_grad()
    def baseline() -> torch.Tensor:
        out = []
        for start in range(0, len(texts), bs):
            ids, mask = ar.encode(texts[start : start + bs])
            hidden = model(
                input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), output_hidden_states=True
            ).hidden_states[layer + 1]
            out.append(hidden[torch.arange(len(ids), device=device), last_token_index(mask)].float().cpu())
        return torch.cat(out)

    (base_s, base_peak, base_out), (ours_s, ours_peak, ours_out) = measure(
        (baseline, size.repeats), (partial(ar.reconstruct, texts, batch_size=bs), size.repeats), device=device
    )
    err = float(((ours_out - base_out).norm(dim=-1) / base_out.norm(dim=-1)).max())
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    n_tok = sum(len(ar.prompt_ids(t)) for t in texts)
    config = f"{len(texts)} prompts ({n_tok / len(texts):.0f} tokens avg), batch {bs}, layer {layer}, {dtype}"
    return [
        Result(
            "AR forward",
            config,
            "rows/s",
            len(texts) / ours_s,
            len(texts) / base_s,
            f"AR.reconstruct (blocks 0..{layer}, LoRA r={size.lora_r})",
            "full model forward",
            ours_peak,
            base_peak,
            f"max rel. diff {err:.1e}",
        )
    ]


if __name__ == "__main__":
    args = parser(__doc__.splitlines()[0]).parse_args()
    setup(args)
    emit(run(args, SIZES[args.size]), args.out)
