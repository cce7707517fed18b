"""AV rollout tokens/s: RL's sampling path vs plain `model.generate`, same AV, batch and lengths.

The AV as RL uses it: the subject model with a LoRA adapter (unmerged: it is being trained),
the injector bound to one random vector per row, the real AV prompt, temperature 1, pure
sampling. Ours is what `AV.generate` does in RL: refresh the merged inference copy
(`nla.sampling.MergedCopy.sync`, timed) and decode with its `Decoder` (static KV cache, CUDA graph
captured once per shape and replayed by later calls). The baseline is `generate` on the LoRA
AV. Every row generates exactly `new` tokens (no stop tokens), so both sides produce the same
count. Ablations on the GPU: `sample` on the unmerged LoRA AV (a graph captured per call), and
the merged copy decoded eagerly. The check column: the share of rows whose greedy tokens equal
`generate`'s on the same (merged) weights (exact in float32; in bf16 near-tied logits may flip).

    python benchmarks/bench_rollout.py --size small [--device cuda --size gpu --model path/to/model.gguf]
"""

from __future__ import annotations

from functools import partial

import torch
from common import SIZES, Result, emit, measure, nla_config, parser, setup

from nla.av import attach_injector, av_marker, av_prompt_ids
from nla.models import load_model
from nla.sampling import Decoder, MergedCopy, sample, sample_with_generate


def load_av_like(args, lora_r: int):
    """(model, tokenizer, injector, prompt ids): the subject model wrapped as the RL-stage AV."""
    from peft import LoraConfig, get_peft_model

    cfg = nla_config(args)
    model, tokenizer, _ = load_model(cfg.model)
    lora = cfg.av_sft.lora
    model = get_peft_model(model, LoraConfig(r=lora_r, lora_alpha=2 * lora_r, target_modules=list(lora.target_modules)))
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # a trained-looking adapter rather than the zero init
            torch.nn.init.normal_(p, std=1e-3)
    model.eval()
    marker = av_marker(tokenizer, cfg.prompts, cfg.injection)
    injector = attach_injector(model, marker, cfg.injection, scale=40.0)
    return model, tokenizer, injector, av_prompt_ids(tokenizer, cfg.prompts, marker.char)


def run(args, size) -> list[Result]:
    model, tokenizer, injector, prompt = load_av_like(args, size.lora_r)
    merged = MergedCopy(model, injector)
    results = [
        row for batch, new in size.rollouts for row in rollouts(model, injector, merged, prompt, batch, new, size)
    ]
    injector.remove()
    return results


def rollouts(model, injector, merged: MergedCopy, prompt: list[int], batch: int, new: int, size) -> list[Result]:
    device = next(model.parameters()).device
    d = model.config.hidden_size
    ids = torch.tensor(prompt, device=device).repeat(batch, 1)
    mask = torch.ones_like(ids)
    generator = torch.Generator(device=device).manual_seed(0)
    vectors = torch.randn(batch, d, device=device)
    with injector.bound(vectors), merged.injector.bound(vectors):

        def ours() -> torch.Tensor:  # RL's path: sync the copy, decode with the reused graph
            merged.sync()
            return merged.decoder.sample(ids, mask, new, temperature=1.0, generator=generator)

        base = partial(sample_with_generate, model, ids, mask, new, temperature=1.0)
        sample_with_generate(model, ids, mask, 4, temperature=1.0)  # warm-ups: generate cheaply (it is slow), ours
        ours()
        base_repeats = 1 if device.type == "cuda" else size.repeats  # generate takes ~10 s a run on the GPU
        (base_s, base_peak, base_out), (ours_s, ours_peak, ours_out) = measure(
            (base, base_repeats), (ours, size.repeats), device=device, warmup=0
        )
        assert ours_out.shape == base_out.shape == (batch, new), (ours_out.shape, base_out.shape)
        config = f"batch {batch} x {new} new tokens, LoRA r={size.lora_r}"
        tokens = batch * new
        label = "merged copy + Decoder" + (" (CUDA graph reused)" if device.type == "cuda" else "")
        results = [
            Result(
                "AV rollout",
                config,
                "tokens/s",
                tokens / ours_s,
                tokens / base_s,
                label,
                "model.generate",
                ours_peak,
                base_peak,
            )
        ]
        if device.type == "cuda":
            eager = Decoder(merged.model, cuda_graph=False)
            ablations = {
                "sample on the LoRA AV, graph per call": partial(
                    sample, model, ids, mask, new, temperature=1.0, generator=generator
                ),
                "merged copy, no CUDA graph": partial(
                    eager.sample, ids, mask, new, temperature=1.0, generator=generator
                ),
            }
            for name, fn in ablations.items():
                [(seconds, peak, _)] = measure((fn, size.repeats), device=device)
                results.append(
                    Result(
                        "AV rollout",
                        config,
                        "tokens/s",
                        tokens / seconds,
                        tokens / base_s,
                        name,
                        "model.generate",
                        peak,
                        base_peak,
                        "ablation",
                    )
                )

    rows = min(batch, 16)  # greedy agreement on a slice (generate is slow), on the same merged weights
    check = torch.randn(rows, d, device=device, generator=torch.Generator(device=device).manual_seed(1))
    with merged.injector.bound(check):
        greedy = merged.decoder.sample(ids[:rows], mask[:rows], new)
        reference = sample_with_generate(merged.model, ids[:rows], mask[:rows], new)
    same = (greedy == reference).all(dim=1).float().mean().item()
    results[0].check = f"greedy rows equal to generate: {same:.0%}"
    return results


if __name__ == "__main__":
    args = parser(__doc__.splitlines()[0]).parse_args()
    setup(args)
    emit(run(args, SIZES[args.size]), args.out)
