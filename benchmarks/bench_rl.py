"""RL steps/minute: `nla.rl.rl_step` with the fast sampler vs the same step with `model.generate`.

One RL step as the rl stage runs it: `prompts × group` rollouts from the AV (LoRA, vector
injected), AR rewards, the reference (SFT adapter loaded as ``ref``) and policy log-prob
passes, one AV update and one AR update. The AV and AR are fresh (untrained LoRA on the
subject model), which changes the numbers but not the work of a step, except that rows
stop early when they emit eos, so both sides run a fixed token budget: the closing tag is
not taught yet and rows rarely stop. The only difference between the two sides is how
`AV.generate` decodes: RL's path (merged copy + reused `Decoder`) or `model.generate` on the
LoRA AV (`nla.sampling.sample_with_generate`).

    python benchmarks/bench_rl.py --size small
"""

from __future__ import annotations

import tempfile
from functools import partial

import torch
from common import SIZES, Result, emit, measure, nla_config, parser, setup

from nla.ar import new_ar
from nla.av import AV
from nla.rl import reference_log_probs, rl_step
from nla.sampling import sample_with_generate


class GenerateDecoder:
    """The baseline behind `Decoder.sample`'s interface: plain `model.generate` on the LoRA AV."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def sample(self, ids, mask, max_new_tokens, temperature=0.0, stop_ids=None, *, pad_id=None):
        return sample_with_generate(self.model, ids, mask, max_new_tokens, temperature, stop_ids, pad_id=pad_id)


def run(args, size) -> list[Result]:
    from bench_rollout import load_av_like

    cfg = nla_config(args)
    cfg.rl.prompts_per_step, cfg.rl.group_size = size.rl_prompts, size.rl_group
    cfg.rl.max_new_tokens = size.rl_new_tokens
    cfg.ar_sft.lora.r, cfg.ar_sft.lora.alpha = size.lora_r, 2 * size.lora_r
    model, tokenizer, injector, _ = load_av_like(args, size.lora_r)
    meta = {"d_model": model.config.hidden_size, "layer": cfg.model.layer, "base_model": cfg.model.name}
    av = AV(model, tokenizer, injector, injector.marker, meta, cfg.prompts)
    ar = new_ar(cfg)
    device = av.device
    with tempfile.TemporaryDirectory() as sft_dir:
        model.save_pretrained(sft_dir)  # the "SFT" adapter, loaded again as the frozen reference
        ref = reference_log_probs(av, sft_dir, cfg.rl.temperature)
    av_opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    ar_opt = torch.optim.AdamW(ar.parameters_to_train(), lr=1e-5)
    vectors = torch.randn(size.rl_prompts, meta["d_model"], generator=torch.Generator().manual_seed(0)) * 10

    def steps(baseline: bool) -> float:
        if baseline:  # an instance attribute shadows AV._decoding for this run only
            av._decoding = lambda: (av.injector, GenerateDecoder(av.model))
        try:
            for _ in range(size.rl_steps):
                stats = rl_step(av, ref, ar, vectors, cfg.rl, av_opt, ar_opt)
        finally:
            av.__dict__.pop("_decoding", None)
        return stats["len_mean"]

    rl_step(av, ref, ar, vectors, cfg.rl, av_opt, ar_opt)  # warm-up: library init, optimizer state
    (base_s, base_peak, base_len), (ours_s, ours_peak, ours_len) = measure(
        (partial(steps, True), 1), (partial(steps, False), 1), device=device, warmup=0
    )
    rows = size.rl_prompts * size.rl_group
    config = (
        f"{size.rl_prompts} prompts x {size.rl_group} samples x <={size.rl_new_tokens} tokens, "
        f"LoRA r={size.lora_r}, {size.rl_steps} steps"
    )
    per_min = 60 * size.rl_steps
    return [
        Result(
            "RL step",
            config,
            "steps/min",
            per_min / ours_s,
            per_min / base_s,
            "rl_step (merged copy + Decoder)",
            "rl_step + generate",
            ours_peak,
            base_peak,
            f"{rows} rollouts/step, mean length {ours_len:.0f} / {base_len:.0f}",
        )
    ]


if __name__ == "__main__":
    args = parser(__doc__.splitlines()[0]).parse_args()
    setup(args)
    emit(run(args, SIZES[args.size]), args.out)
