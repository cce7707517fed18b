"""Fast batched sampling for AV rollouts: one prefill, then single-token steps on a static KV cache.

Why not `model.generate`: a decode step of the 135M AV at batch 128 is well under a
millisecond of GPU work, but `generate` spends many milliseconds per step in Python (logits
processors, stopping criteria, cache bookkeeping) and in ~500 separate kernel launches, so
RL and evaluation, which are mostly generation, ran at ~800 tokens/s on an H100. Here:

* **prefill**: one eager forward over the left-padded prompts. The injection hook
  (`nla.injection.ActivationInjector`) sees the marker sites in `input_ids` here, exactly as
  in `generate`'s prefill.
* **decode**: the same single-token step every time. Keys/values go into buffers allocated
  once (`StaticKV`) at a slot held in a device tensor, and the attention mask is a
  preallocated additive bias; every input of the step is a fixed buffer updated in place,
  so on CUDA the step is captured in a CUDA graph and each step is one graph replay plus a
  few sampling kernels. On the CPU the same step runs eagerly (same code, same numbers).
* **stopping**: per row, on stop tokens (e.g. eos) or stop sequences (e.g. the tokens of
  ``</explanation>``), decided on the device; the host reads "all rows done" only every
  `check_every` steps, so the GPU is never idle waiting for the CPU.

What a graph captures: only device work. Python state read while the model runs (hooks,
the active LoRA adapter, bound vectors, train/eval mode) is read once at capture. `sample`
therefore captures afresh in every call, so whatever was switched between calls holds in the
next one; a `Decoder` keeps its graphs across calls for a model whose Python state stays put
and whose weights change only in place (RL's merged rollout copy, `MergedCopy` below).
Decode steps hold no marker sites (the injection hook returns at once for ``seq_len == 1``,
as it does in `generate`), so the graph contains no injection; the prefill, which carries
it, always runs eagerly.

Positions come from the attention mask (0, 1, 2, … over real tokens), so left padding gives
each row the same logits as it would get alone; under greedy decoding the tokens equal
`model.generate`'s (tests/test_sampling.py checks this with injection on).
"""

from __future__ import annotations

import copy
import os
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from nla.errors import NLAError
from nla.injection import ActivationInjector
from nla.models import input_embeddings

FULL, SLIDING = "full_attention", "sliding_attention"


class StaticKV:
    """Preallocated keys and values per layer, written at ``slots`` (a device tensor we own).

    It provides the one method transformers' attention layers call on ``past_key_values``:
    ``update(key, value, layer_idx) -> (all keys, all values)``. Owning the write slots, rather
    than using transformers' ``StaticCache`` (whose layers advance an internal counter on
    every update), keeps CUDA-graph warm-up runs harmless and keeps this module independent
    of cache internals that change between transformers releases (5.17 on the GPU machine,
    5.23 here).
    """

    def __init__(self, length: int):
        self.length = length
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.slots: torch.Tensor | None = None  # (q,) cache slots the current forward writes

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        if layer_idx not in self.keys:
            n, heads, _, _ = key.shape
            self.keys[layer_idx] = key.new_zeros(n, heads, self.length, key.shape[-1])
            # Values in the keys' dtype: under CPU autocast the projections are bf16 but rotary returns fp32
            # keys, and attention needs one dtype (without autocast both are the model's dtype anyway).
            self.values[layer_idx] = key.new_zeros(n, heads, self.length, value.shape[-1])
        # Under autocast the prefill and the decode steps may hand over different dtypes: keep the buffer's.
        self.keys[layer_idx].index_copy_(2, self.slots, key.to(self.keys[layer_idx].dtype))
        self.values[layer_idx].index_copy_(2, self.slots, value.to(self.values[layer_idx].dtype))
        return self.keys[layer_idx], self.values[layer_idx]


def _text_config(model: nn.Module):
    cfg = model.config
    return getattr(cfg, "text_config", None) or cfg


def _mask_kinds(model: nn.Module, length: int) -> tuple[list[str] | None, int | None]:
    """Which attention masks the model needs: None (one causal mask) or per layer type, and the window."""
    cfg = _text_config(model)
    window = getattr(cfg, "sliding_window", None)
    types = getattr(cfg, "layer_types", None)
    if not types:
        if window and length > window:  # a Mistral-style model without layer_types: one sliding mask everywhere
            raise NLAError(
                f"prompt + max_new_tokens = {length} exceeds the sliding window {window} of this model; "
                "shorten the prompts or max_new_tokens"
            )
        return None, None
    kinds = sorted(set(types))
    if unknown := set(kinds) - {FULL, SLIDING}:
        raise NLAError(
            f"the fast sampler supports full and sliding attention layers, not {sorted(unknown)}; "
            "use nla.sampling.sample_with_generate for this model"
        )
    return (kinds, int(window)) if SLIDING in kinds else (None, None)


def _bias(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive attention bias (N, 1, q, L): 0 where allowed, the dtype's minimum elsewhere."""
    bias = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return bias.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


def _pick(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    """Next token per row: argmax, or a draw from softmax(logits / T)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _default_pad(model: nn.Module) -> int:
    pad = getattr(model.config, "pad_token_id", None)
    if pad is None:
        raise NLAError("the model has no pad_token_id; pass pad_id= or set model.config.pad_token_id")
    return int(pad)


def _check_inputs(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    temperature: float,
    generator: torch.Generator | None,
    device: torch.device,
) -> None:
    if input_ids.ndim != 2 or attention_mask.shape != input_ids.shape:
        raise NLAError(
            f"input_ids {tuple(input_ids.shape)} and attention_mask {tuple(attention_mask.shape)} "
            "must both be (rows, prompt_len)"
        )
    if max_new_tokens < 1 or temperature < 0:
        raise NLAError(f"max_new_tokens must be ≥ 1 and temperature ≥ 0 (got {max_new_tokens}, {temperature})")
    if not bool(attention_mask[:, -1].all()):
        raise NLAError(
            "the prompts must be left-padded (the last column all real tokens); set tokenizer.padding_side = 'left'"
        )
    if generator is not None and temperature > 0 and generator.device.type != device.type:
        raise NLAError(
            f"the generator is on {generator.device} but the model on {device}; "
            f"create it with torch.Generator(device='{device.type}')"
        )


@dataclass
class _StepInputs:
    """The fixed inputs of the one-token decode step for one batch shape, and its captured graph."""

    kv: StaticKV
    ids: torch.Tensor  # (N, 1) the token fed
    positions: torch.Tensor  # (N, 1) its position
    slot: torch.Tensor  # (1,) the cache slot it is written to
    mask: torch.Tensor | dict[str, torch.Tensor] | None = None  # additive attention bias, or one per layer type
    replay: Callable[[], torch.Tensor] | None = None  # the captured step (CUDA), else None


def _biases(mask: torch.Tensor | dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """The bias tensors of a step mask in a fixed order: the one, or one per layer type."""
    return [mask[kind] for kind in sorted(mask)] if isinstance(mask, dict) else [mask]


class Decoder:
    """`sample` for one model, keeping the decode buffers and CUDA graphs of each batch shape.

    A graph is captured once per shape (rows, prompt length, max_new_tokens) and replayed by
    every later call of that shape: RL and evaluation sample the same shape again and again and
    so pay the capture (a few eager forwards) once. Reuse is valid while the model's one-token
    step does the same device work: weights may change **in place** (optimizer steps, `copy_`),
    but not the module structure, the active adapter or the hooks. The function `sample` makes a
    fresh Decoder per call and so never reuses anything.
    """

    def __init__(self, model: nn.Module, cuda_graph: bool | None = None, max_shapes: int = 4):
        self.model = model
        self.device = input_embeddings(model).weight.device
        self.dtype = input_embeddings(model).weight.dtype
        if cuda_graph is None:
            cuda_graph = self.device.type == "cuda" and os.environ.get("NLA_CUDA_GRAPHS", "1") != "0"
        if cuda_graph and self.device.type != "cuda":
            raise NLAError("cuda_graph=True needs the model on a CUDA device")
        self.cuda_graph, self.max_shapes = cuda_graph, max_shapes
        self._steps: OrderedDict[tuple[int, int, int], _StepInputs] = OrderedDict()

    def _step_inputs(self, n: int, prompt_len: int, max_new_tokens: int) -> _StepInputs:
        key = (n, prompt_len, max_new_tokens)
        if key in self._steps:
            self._steps.move_to_end(key)
        else:
            if len(self._steps) >= self.max_shapes:
                self._steps.popitem(last=False)  # the least recently used shape and its graph
            zeros = partial(torch.zeros, dtype=torch.long, device=self.device)
            self._steps[key] = _StepInputs(StaticKV(prompt_len + max_new_tokens), zeros(n, 1), zeros(n, 1), zeros(1))
        return self._steps[key]

    @torch.no_grad()
    def sample(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 0.0,
        stop_ids: set[int] | None = None,
        generator: torch.Generator | None = None,
        *,
        stop_sequences: list[list[int]] | None = None,
        pad_id: int | None = None,
        check_every: int = 8,
    ) -> torch.Tensor:
        """Continue left-padded prompts: (N, T_new) new tokens, `pad_id` after each row's stop (see `sample`)."""
        model, device, dtype = self.model, self.device, self.dtype
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device).bool()
        _check_inputs(input_ids, attention_mask, max_new_tokens, temperature, generator, device)
        pad_id = _default_pad(model) if pad_id is None else int(pad_id)
        n, prompt_len = input_ids.shape
        length = prompt_len + max_new_tokens
        kinds, window = _mask_kinds(model, length)
        step_in = self._step_inputs(n, prompt_len, max_new_tokens)
        kv = step_in.kv

        # Prefill: query i (slot i) sees real prompt slots j ≤ i (and j > i − window on sliding layers).
        slot = torch.arange(length, device=device)
        query = slot[:prompt_len, None]
        real = torch.zeros(n, length, dtype=torch.bool, device=device)
        real[:, :prompt_len] = attention_mask
        causal = real[:, None, :] & (slot[None, None, :] <= query)  # (N, P, L)

        def masks(allowed: torch.Tensor, q_slot: torch.Tensor):
            full = _bias(allowed, dtype)
            if kinds is None:
                return full
            sliding = _bias(allowed & (slot > q_slot - window), dtype)
            return {FULL: full, SLIDING: sliding}

        positions = (attention_mask.long().cumsum(dim=1) - 1).clamp_min(0)
        kv.slots = slot[:prompt_len]
        was_training = model.training
        model.eval()  # no dropout, and no gradient-checkpointing path that drops the cache
        try:
            out = model(
                input_ids=input_ids,
                attention_mask=masks(causal, query),
                position_ids=positions,
                past_key_values=kv,
                use_cache=True,
                logits_to_keep=1,
            )
            logits = out.logits[:, -1]

            # Decode inputs: fixed buffers, reset in place for this call and updated in place per step.
            step_in.positions.copy_(attention_mask.long().sum(dim=1, keepdim=True))  # the first new token's position
            step_in.slot.fill_(prompt_len)
            kv.slots = step_in.slot
            first_mask = masks(real[:, None, :] | (slot == prompt_len)[None, None, :], step_in.slot[:, None])
            if step_in.mask is None:
                step_in.mask = first_mask
            else:  # a reused shape: its graph reads these very tensors, so refill them
                for bias, fresh in zip(_biases(step_in.mask), _biases(first_mask), strict=True):
                    bias.copy_(fresh)
            step_mask = step_in.mask
            bias_of = _biases(step_mask)

            def step() -> torch.Tensor:
                return model(
                    input_ids=step_in.ids,
                    attention_mask=step_in.mask,
                    position_ids=step_in.positions,
                    past_key_values=kv,
                    use_cache=True,
                ).logits[:, -1]

            stop_tensor = torch.tensor(sorted(stop_ids or ()), dtype=torch.long, device=device)
            sequences = [torch.tensor(s, dtype=torch.long, device=device) for s in (stop_sequences or []) if len(s)]
            tokens = torch.full((n, max_new_tokens), pad_id, dtype=torch.long, device=device)
            lengths = torch.full((n,), max_new_tokens, dtype=torch.long, device=device)
            done = torch.zeros(n, dtype=torch.bool, device=device)
            for t in range(max_new_tokens):
                if t > 0:
                    if self.cuda_graph and step_in.replay is None:
                        step_in.replay = _capture(step, device)  # at t = 1: the warm-ups rewrite slot prompt_len
                    logits = step_in.replay() if self.cuda_graph else step()
                nxt = torch.where(done, pad_id, _pick(logits, temperature, generator))
                tokens[:, t] = nxt
                hit = torch.isin(nxt, stop_tensor)
                for seq in sequences:
                    if t + 1 >= len(seq):
                        hit |= (tokens[:, t + 1 - len(seq) : t + 1] == seq).all(dim=1)
                lengths = torch.where(hit & ~done, t + 1, lengths)
                done |= hit
                if t + 1 == max_new_tokens or ((t + 1) % check_every == 0 and bool(done.all())):
                    break
                # Feed the token just drawn: it goes to slot prompt_len + t, at position n_real + t.
                step_in.ids.copy_(nxt[:, None])
                if t > 0:
                    step_in.positions.add_(1)
                    step_in.slot.add_(1)
                    for bias in bias_of:
                        bias[..., prompt_len + t] = 0
                    if kinds is not None and prompt_len + t - window >= 0:
                        step_mask[SLIDING][..., prompt_len + t - window] = torch.finfo(dtype).min
            return tokens[:, : int(lengths.max())]
        finally:
            model.train(was_training)


class MergedCopy:
    """An inference copy of a LoRA AV in training, with its active adapter merged in, kept in sync.

    Why: decoding a small model is bound by kernel launches (a step of the 135M AV is ~2k tiny
    kernels, even inside a CUDA graph each costs microseconds), and an unmerged LoRA projection
    adds four kernels (A, B, scale, add) to its one matmul. RL samples from this copy instead.
    `sync()` rewrites each merged weight in place (W + s·BA), so the copy's `Decoder` keeps
    replaying its captured graphs; merging into the trained model itself and unmerging after
    would drift its bf16 base weights by rounding at every RL step. The copy costs one more
    set of base weights in memory. Log-probs for the RL objective still come from the trained
    model, so a last-bit difference between merged and unmerged logits only makes the samples
    negligibly off-policy.
    """

    def __init__(self, peft_model: nn.Module, injector: ActivationInjector):
        from peft.tuners.lora import LoraLayer

        self.adapter = peft_model.active_adapter
        with injector.detached():  # copy the modules, not the hooks (they hold the original's state)
            clone = copy.deepcopy(peft_model)
        self.model = clone.merge_and_unload(adapter_names=[self.adapter]).eval().requires_grad_(False)
        self.injector = injector.like(self.model)
        self.decoder = Decoder(self.model)
        base = peft_model.get_base_model()
        self._pairs = [
            (layer, self.model.get_submodule(name))
            for name, layer in base.named_modules()
            if isinstance(layer, LoraLayer) and self.adapter in layer.lora_A
        ]

    @torch.no_grad()
    def sync(self) -> None:
        """Copy the current adapter into the merged weights: W_copy ← W_base + s·B·A, in place."""
        for layer, target in self._pairs:
            target.weight.copy_(layer.base_layer.weight + layer.get_delta_weight(self.adapter))


def sample(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    stop_ids: set[int] | None = None,
    generator: torch.Generator | None = None,
    *,
    stop_sequences: list[list[int]] | None = None,
    pad_id: int | None = None,
    cuda_graph: bool | None = None,
    check_every: int = 8,
) -> torch.Tensor:
    """Continue left-padded prompts: (N, T_new) new tokens, `pad_id` after each row's stop.

    A row stops after emitting a token of `stop_ids` or completing one of `stop_sequences`
    (the stop tokens are kept, as `generate` keeps eos). T_new is the longest row's length,
    at most `max_new_tokens`. `temperature` 0 is greedy; otherwise tokens are drawn from
    softmax(logits / T) with `generator` (on the model's device) for reproducibility.
    `cuda_graph` None means "on when the model is on CUDA" (NLA_CUDA_GRAPHS=0 in the environment turns
    the default off, a switch for debugging a driver without touching code). Every call captures
    afresh; keep a `Decoder` to reuse graphs across calls.
    """
    return Decoder(model, cuda_graph, max_shapes=1).sample(
        input_ids,
        attention_mask,
        max_new_tokens,
        temperature,
        stop_ids,
        generator,
        stop_sequences=stop_sequences,
        pad_id=pad_id,
        check_every=check_every,
    )


def _capture(step, device: torch.device):
    """Record `step` (whose inputs are fixed buffers) in a CUDA graph; return a function replaying it.

    The warm-up runs write the same keys and values into the same slot as the first replay,
    so they leave the cache as it must be.
    """
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        logits = step()

    def replay() -> torch.Tensor:
        graph.replay()
        return logits

    return replay


def stop_lengths(
    tokens: torch.Tensor, stop_ids: set[int] | None = None, stop_sequences: list[list[int]] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of `sample`'s output: (tokens up to and including the stop, whether it stopped).

    Public API for callers of `sample` / `Decoder.sample`, whose rows run on (padded) after
    their stop: it gives each row's real length, e.g. to compare with `model.generate`.
    """
    n, width = tokens.shape
    hit = torch.isin(tokens, torch.tensor(sorted(stop_ids or ()), dtype=torch.long, device=tokens.device))
    for seq in stop_sequences or []:
        k = len(seq)
        if 0 < k <= width:
            windows = tokens.unfold(1, k, 1) == torch.tensor(seq, device=tokens.device)
            hit[:, k - 1 :] |= windows.all(dim=-1)
    stopped = hit.any(dim=1)
    first = torch.where(stopped, hit.float().argmax(dim=1) + 1, torch.full((n,), width, device=tokens.device))
    return first, stopped


@torch.no_grad()
def sample_with_generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    stop_ids: set[int] | None = None,
    generator: torch.Generator | None = None,
    *,
    stop_sequences: list[list[int]] | None = None,
    pad_id: int | None = None,
) -> torch.Tensor:
    """`sample` through plain `model.generate`: the reference and the baseline of the benchmarks.

    Same contract, but `generate` draws from the global RNG (`generator` only seeds it) and
    stops on `stop_sequences` through a stopping criterion.
    """
    from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

    class StopOnSequences(StoppingCriteria):
        def __call__(self, ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
            hit = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
            for seq in stop_sequences or []:
                if 0 < len(seq) <= ids.shape[1] - input_ids.shape[1]:
                    hit |= (ids[:, -len(seq) :] == torch.tensor(seq, device=ids.device)).all(dim=1)
            return hit

    device = input_embeddings(model).weight.device
    pad_id = _default_pad(model) if pad_id is None else int(pad_id)
    if generator is not None:
        torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device)))
    sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 else {}
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        eos_token_id=sorted(stop_ids) if stop_ids else None,
        pad_token_id=pad_id,
        **sampling,
    )
    criteria = StoppingCriteriaList([StopOnSequences()] if stop_sequences else [])
    # generate fills unset fields (eos included) from the model's own generation config: hide its eos
    # for the call, so that exactly `stop_ids` stop a row, as in `sample`.
    defaults = model.generation_config
    saved_eos, defaults.eos_token_id = defaults.eos_token_id, config.eos_token_id
    try:
        out = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            generation_config=config,
            stopping_criteria=criteria,
        )
    finally:
        defaults.eos_token_id = saved_eos
    return out[:, input_ids.shape[1] :]
