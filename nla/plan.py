"""`nla plan`: GPU memory per stage on 1 GPU, N GPUs with DDP and N GPUs with FSDP, from the model's config alone.

    nla plan --profile qwen3-8b                # the seed's Qwen3-8B at the preset's batch sizes
    nla plan --profile llama-3.3-70b --gpus 8
    nla plan --check                           # the estimate against a measured AR-SFT step on this CPU

Nothing is downloaded and no weight is allocated: the model is built on the `meta` device
from a config JSON (profiles/configs/<name>.json for hub models, the folder's config.json
for local ones) and prepared as each stage prepares it (PEFT LoRA on the AV, the AR's
truncation to blocks 0..K with its head, through `nla.ar.new_ar` itself), so the parameter
counts are exact. Per GPU, in the preset's dtype:

* **weights**: every parameter; RL adds the AR and, on 1 GPU and DDP, the merged sampling
  copy of the AV (`nla.sampling.MergedCopy`); the LoRA reference adapter is counted with
  the AV.
* **grads** and **optimizer**: the trainable parameters, once and twice (AdamW's two moments).
* **activations**: what autograd keeps for the backward, measured on `meta` (the bytes of
  every tensor saved for backward) for one and two blocks at two sequence lengths, so
  that per block, per head and per token costs separate; the part that grows with T²
  (the attention scores of the math kernel) is left out, because the flash and
  memory-efficient kernels used on GPUs keep O(T) per head. With gradient checkpointing a
  block keeps its input only, plus one block's activations while it is recomputed. The
  LM head's logits (fp32 for the loss) count for every token whose logits are computed,
  and their gradient once more.
* **sampling** (label, RL, evaluate): the KV cache of the batch being decoded; under FSDP
  RL also gathers the AV's full weights for sampling (`nla.distributed.unsharded`).

DDP keeps a full replica and splits the global batch N ways; FSDP splits weights, grads and
optimizer N ways and holds the gathered weights of the two blocks in flight (the one
computing, the one prefetched) and of the root (embeddings, LM head). A setting fits a GPU
when peak × 1.1 (allocator fragmentation) + 1 GiB (CUDA context, NCCL buffers) is below its
usable memory. Inference stages (extract, label, evaluate) do not shard: each process holds
the model and splits the rows, so N GPUs need per GPU what one needs.
"""

from __future__ import annotations

import ctypes
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from nla.ar import new_ar, trained_blocks
from nla.config import NLAConfig
from nla.errors import NLAError
from nla.metrics import mse_nrm
from nla.models import (
    ModelSource,
    converted_gguf_dir,
    decoder_blocks,
    load_model,
    resolve_device,
    resolve_dtype,
    resolve_source,
)

CONFIG_DIR = Path("profiles") / "configs"
GIB = 1 << 30
GPUS = {"80 GB": 79.2 * GIB, "141 GB": 139.7 * GIB}  # usable memory of an A100/H100 80 GB and an H200
FRAGMENTATION, CONTEXT = 1.1, 1 * GIB
AV_PROMPT_EXTRA = 16  # chat-template tokens around prompts.av_user (≈ 4 characters per token)
LABEL_PROMPT_TOKENS = 250  # label.instruction and the two worked examples (≈ 1000 characters)
T1, T2 = 64, 128  # the two sequence lengths the activation costs are measured at


# ----------------------------------------------------------------------------- the model, from its config


def model_config(cfg: NLAConfig, root: str | Path = ".", path: str | Path | None = None):
    """The transformers config of `cfg.model.name` (or of `path`): a shipped JSON, a local folder, or embedded."""
    from transformers import AutoConfig

    if path is None:
        name = cfg.model.name
        shipped = Path(root) / CONFIG_DIR / f"{name.rstrip('/').split('/')[-1].lower()}.json"
        local = Path(name).expanduser()
        if shipped.is_file():
            path = shipped
        elif name == "embedded" or local.suffix == ".gguf" or (local.is_dir() and cfg.model.gguf_file):
            path = converted_gguf_dir(resolve_source(name, cfg.model.gguf_file)) / "config.json"
        elif (local / "config.json").is_file():
            path = local / "config.json"
        else:
            raise NLAError(f"no config for model.name={name!r}; pass --model-config FILE or add {shipped}")
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        return AutoConfig.for_model(data.pop("model_type"), **data)
    except (OSError, ValueError, KeyError) as err:
        raise NLAError(f"{path} is not a model config ({err}); give a config.json with a model_type") from None


def meta_model(config, dtype: torch.dtype, layers: int | None = None) -> nn.Module:
    """The causal LM of `config` on the meta device (shapes only), optionally with fewer blocks."""
    from transformers import AutoModelForCausalLM

    if layers:
        data = config.to_dict()
        data["num_hidden_layers"] = layers
        if data.get("layer_types"):
            data["layer_types"] = data["layer_types"][:layers]
        config = type(config).from_dict(data)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def lora_av(model: nn.Module, cfg: NLAConfig) -> nn.Module:
    """The AV as `nla.av_sft.fit_av` prepares it: LoRA on av_sft.lora.target_modules, or all weights trainable."""
    lora = cfg.av_sft.lora
    if not lora.enabled:
        return model.requires_grad_(True)
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, target_modules=list(lora.target_modules)))


def meta_ar(model: nn.Module, cfg: NLAConfig, layer: int) -> nn.Module:
    """The AR exactly as `nla.ar.new_ar` builds it (truncated to blocks 0..layer, LoRA, head), on meta."""
    source = ModelSource("meta", None, None, "meta")
    return new_ar(
        cfg.model_copy(update={"model": cfg.model.model_copy(update={"layer": layer})}), (model, None, source)
    )


def nbytes(params, trainable: bool | None = None) -> int:
    return sum(p.numel() * p.element_size() for p in params if trainable is None or p.requires_grad == trainable)


# ----------------------------------------------------------------------------- activations, measured on meta


def saved_bytes(run, exclude) -> int:
    """Bytes autograd keeps for the backward while `run()` builds the graph (each tensor once, parameters excluded)."""
    skip = {id(p) for p in exclude}
    kept: dict[int, torch.Tensor] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        base = t._base if t._base is not None else t
        if id(base) not in skip:
            kept[id(base)] = base
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(t.untyped_storage().nbytes() for t in kept.values())


def per_token(measure) -> float:
    """The O(T) part of `measure(T)` (bytes), from T1 and T2: measure(T) = a·T + b·T²."""
    s1, s2 = measure(T1), measure(T2)
    b = (s2 - 2 * s1) / (2 * T1 * T1)
    return (s1 - b * T1 * T1) / T1


def _causal_lm_bytes(model: nn.Module, dtype: torch.dtype, with_head: bool):
    def measure(T: int) -> int:
        ids = torch.zeros(1, T, dtype=torch.long, device="meta")
        mask = torch.zeros(1, 1, T, T, dtype=dtype, device="meta")  # a 4-D mask: no data-dependent mask building

        def run():
            if with_head:
                logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
                torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), ids.flatten())
            else:  # the AR's forward (`AR.forward`) with the 4-D mask: backbone, head at the last token
                hidden = model.backbone(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
                model.head(hidden[:, -1].float()).sum()

        return saved_bytes(run, model.parameters())

    return measure


@dataclass(frozen=True)
class Costs:
    """Bytes kept for the backward: per token per block (trained), per token for the LM head and loss."""

    block: float
    head: float
    checkpointed_block: float  # with gradient checkpointing: the block's input only


def av_costs(config, cfg: NLAConfig, dtype: torch.dtype) -> Costs:
    """Per-token costs of the AV (LoRA as av_sft) from 1- and 2-block meta models, with and without checkpointing."""
    one, two = (lora_av(meta_model(config, dtype, n), cfg).train() for n in (1, 2))
    a1, a2 = (per_token(_causal_lm_bytes(m, dtype, True)) for m in (one, two))
    for m in (one, two):
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    c1, c2 = (per_token(_causal_lm_bytes(m, dtype, True)) for m in (one, two))
    return Costs(block=a2 - a1, head=a1 - (a2 - a1), checkpointed_block=c2 - c1)


def ar_costs(config, cfg: NLAConfig, dtype: torch.dtype) -> Costs:
    """Per-token cost of one trained AR block (as `new_ar` builds it), from 1- and 2-block ARs; no LM head."""
    plain = cfg.model_copy(update={"ar_sft": cfg.ar_sft.model_copy(update={"gradient_checkpointing": False})})
    ars = [meta_ar(meta_model(config, dtype, n), plain, n - 1).train() for n in (1, 2)]
    a1, a2 = (per_token(_causal_lm_bytes(ar, dtype, False)) for ar in ars)
    return Costs(block=a2 - a1, head=0.0, checkpointed_block=config.hidden_size * dtype.itemsize)


# ----------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Need:
    """Bytes per GPU for one stage under one setting."""

    stage: str
    setting: str
    weights: float
    grads: float = 0.0
    optimizer: float = 0.0
    activations: float = 0.0
    sampling: float = 0.0
    note: str = ""

    @property
    def peak(self) -> float:
        return self.weights + self.grads + self.optimizer + max(self.activations, self.sampling)

    def fits(self, capacity: float) -> bool:
        return self.peak * FRAGMENTATION + CONTEXT <= capacity


def kv_cache(config, dtype: torch.dtype, rows: int, tokens: int) -> float:
    """Keys and values of every block for `rows` sequences of `tokens`."""
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * heads * head_dim * dtype.itemsize * rows * tokens


def logits_grad(config, tokens: int) -> float:
    """The gradient of the logits in the backward: fp32 and the model dtype, for every token with logits."""
    return tokens * config.vocab_size * (4 + 2)


def train_settings(
    stage: str,
    model: nn.Module,
    blocks: list[nn.Module],
    rows: int,
    activations,
    gpus: int,
    frozen: float = 0.0,
    replicas: float = 0.0,
    sampling=lambda rows: 0.0,
    gathered: float = 0.0,
    note: str = "",
) -> list[Need]:
    """1 GPU, DDP×N and FSDP×N for a training stage; `activations(rows)` / `sampling(rows)` are per-GPU bytes.

    `frozen`: weights outside `model` that are sharded like it (RL's reference); `replicas`: weights
    held on 1 GPU and under DDP only (RL's merged sampling copy); `gathered`: weights FSDP gathers
    whole for sampling (RL's AV).
    """
    params = list(model.parameters())
    weights, trainable = nbytes(params) + frozen, nbytes(params, trainable=True)
    opt = 2 * trainable
    per_gpu = -(-rows // gpus)
    block_bytes = [nbytes(b.parameters()) for b in blocks]
    working = 2 * max(block_bytes) + nbytes(params) - sum(block_bytes)  # two blocks in flight + the unsharded root
    one = Need(stage, "1 GPU", weights + replicas, trainable, opt, activations(rows), sampling(rows), note)
    ddp = Need(stage, f"DDP ×{gpus}", weights + replicas, trainable, opt, activations(per_gpu), sampling(per_gpu), note)
    shard = (stage, f"FSDP ×{gpus}", weights / gpus + working, trainable / gpus, opt / gpus, activations(per_gpu))
    fsdp = Need(*shard, sampling(per_gpu) + gathered, note)
    return [one, ddp, fsdp]


def plan(cfg: NLAConfig, gpus: int = 8, root: str | Path = ".", config_path: str | Path | None = None) -> list[Need]:
    """Per-GPU memory of every GPU stage of `cfg`, for 1 GPU, DDP×gpus and FSDP×gpus."""
    if gpus < 1:
        raise NLAError(f"--gpus {gpus}: plan for at least 1 GPU")
    config = model_config(cfg, root, config_path)
    dtype = resolve_dtype(cfg.model.dtype, resolve_device("cuda"))  # planned for GPUs: "auto" is bf16 there
    layer = cfg.model.layer
    full = meta_model(config, dtype)
    weights = nbytes(full.parameters())
    d, vocab = config.hidden_size, config.vocab_size
    av_prompt = (len(cfg.prompts.av_user) + len(cfg.prompts.av_answer_open)) // 4 + AV_PROMPT_EXTRA
    ar_prompt = len(cfg.prompts.ar_template) // 4
    needs: list[Need] = []

    ex = cfg.extract
    block_peak = ex.batch_size * ex.max_tokens * (3 * config.intermediate_size + 4 * d) * dtype.itemsize
    needs.append(Need("extract", "each GPU", weights, activations=block_peak, note="inference: rows split"))

    lab = cfg.label
    if lab.backend == "local":
        tokens = LABEL_PROMPT_TOKENS + lab.context_tokens + lab.max_new_tokens
        kv = kv_cache(config, dtype, lab.batch_size, tokens) + lab.batch_size * vocab * 4
        needs.append(Need("label", "each GPU", weights, sampling=kv, note="local labeler = model.name assumed"))

    av = lora_av(meta_model(config, dtype), cfg)
    costs = av_costs(config, cfg, dtype)
    sft = cfg.av_sft
    block_cost = costs.checkpointed_block if sft.gradient_checkpointing else costs.block
    recompute = costs.block if sft.gradient_checkpointing else 0.0

    def sft_activations(rows: int) -> float:
        tokens = rows * sft.max_length
        blocks = config.num_hidden_layers
        return tokens * (blocks * block_cost + recompute + costs.head) + logits_grad(config, tokens)

    av_blocks = list(decoder_blocks(av))
    needs += train_settings("av_sft", av, av_blocks, sft.batch_size, sft_activations, gpus)

    ar = meta_ar(meta_model(config, dtype), cfg, layer)
    ar_cost = ar_costs(config, cfg, dtype)
    arc = cfg.ar_sft
    trained = len(trained_blocks(layer + 1, arc.train_last_blocks))
    ar_tokens = arc.max_explanation_tokens + ar_prompt

    def ar_activations(rows: int, tokens_per_row: int = ar_tokens, checkpointing: bool = arc.gradient_checkpointing):
        per = ar_cost.checkpointed_block if checkpointing else ar_cost.block
        return rows * tokens_per_row * (trained * per + (ar_cost.block if checkpointing else 0.0))

    ar_blocks = list(decoder_blocks(ar.backbone))
    needs += train_settings("ar_sft", ar, ar_blocks, arc.batch_size, ar_activations, gpus)

    rl = cfg.rl
    rows = rl.prompts_per_step * rl.group_size
    seq = av_prompt + rl.max_new_tokens
    # The frozen reference: a second copy of the adapter in the AV (LoRA) or a second model (full fine-tuning).
    reference = nbytes(av.parameters(), trainable=True) if sft.lora.enabled else weights
    merged = weights if sft.lora.enabled else 0.0  # MergedCopy: full base weights, merged adapter

    def rl_activations(rows: int) -> float:
        policy = rows * seq * config.num_hidden_layers * costs.block + rows * rl.max_new_tokens * costs.head
        ref_logits = rows * rl.max_new_tokens * vocab * (2 + 4)  # the no-grad reference pass's logits, transient
        ar_step = ar_activations(rows, rl.max_new_tokens + ar_prompt, False)
        return max(policy + logits_grad(config, rows * rl.max_new_tokens), ref_logits, ar_step)

    def rl_sampling(rows: int) -> float:
        return kv_cache(config, dtype, rows, seq) + rows * vocab * 4

    needs += train_settings(
        "rl",
        nn.ModuleList([av, ar]),
        av_blocks + ar_blocks,
        rows,
        rl_activations,
        gpus,
        frozen=reference,
        replicas=merged,
        sampling=rl_sampling,
        gathered=weights,
        note="sampling: KV cache; FSDP gathers the AV for it",
    )

    ev = cfg.evaluate
    kv = kv_cache(config, dtype, ev.batch_size, av_prompt + ev.max_new_tokens)
    ar_weights = nbytes(ar.parameters())
    needs.append(Need("evaluate", "each GPU", weights + ar_weights, sampling=kv, note="AV merged + AR; rows split"))
    return needs


def format_plan(needs: list[Need], title: str) -> str:
    """A markdown table: GiB per GPU and whether each setting fits an 80 GB and a 141 GB GPU."""

    def gib(x: float) -> str:
        return f"{x / GIB:.1f}" if x else "–"

    head = ["stage", "setting", "weights", "grads", "optimizer", "activations", "sampling", "peak GiB"]
    head += [f"fits {name}" for name in GPUS]
    lines = [f"### {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for n in needs:
        cells = [n.stage, n.setting, gib(n.weights), gib(n.grads), gib(n.optimizer), gib(n.activations)]
        cells += [gib(n.sampling), f"{n.peak / GIB:.1f}"] + ["yes" if n.fits(c) else "no" for c in GPUS.values()]
        lines.append("| " + " | ".join(cells) + " |")
    notes = sorted({f"{n.stage}: {n.note}" for n in needs if n.note})
    return "\n".join(lines + [""] + [f"- {note}" for note in notes])


# ----------------------------------------------------------------------------- the check on this machine


def _malloc_returns_memory() -> None:
    """glibc: blocks of ≥ 64 KiB come from mmap and go back when freed, so resident memory follows live tensors.

    By default glibc raises that threshold after the first large free and then keeps freed
    tensors in its heap, which makes a peak of resident memory overstate live memory by 2x.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: resident memory is measured as it comes
        return
    libc.mallopt(-3, 64 << 10)  # M_MMAP_THRESHOLD
    libc.mallopt(-1, 0)  # M_TRIM_THRESHOLD


@contextmanager
def peak_rss_growth(interval_s: float = 0.002) -> Iterator[list[float]]:
    """Sample this process's resident memory while the block runs; yields a list holding the peak growth (bytes)."""
    import psutil

    process = psutil.Process()
    start = process.memory_info().rss
    growth, done = [0.0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            growth[0] = max(growth[0], process.memory_info().rss - start)
            done.wait(interval_s)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield growth
    finally:
        done.set()
        thread.join()
        growth[0] = max(growth[0], process.memory_info().rss - start)


def measure_ar_step(cfg: NLAConfig) -> dict[str, float]:
    """One AR-SFT step of `cfg`'s model on the CPU at ar_sft.batch_size rows of full length, measured.

    Returns the bytes autograd kept for the backward (real tensors, each once), the growth of
    the process's peak resident memory over the step, and the plan's estimates for the same
    model, dtype and batch (activations; activations + grads + optimizer).
    """
    _malloc_returns_memory()
    model, tokenizer, _ = load_model(cfg.model.model_copy(update={"device": "cpu"}), for_training=True)
    dtype = next(model.parameters()).dtype
    ar = new_ar(cfg, (model, tokenizer, resolve_source(cfg.model.name, cfg.model.gguf_file)))
    ar.train()
    arc = cfg.ar_sft
    words = " ".join(["feature"] * (2 * arc.max_explanation_tokens))  # cut to max_explanation_tokens by the AR
    ids, mask = ar.encode([words] * arc.batch_size)
    target = torch.randn(arc.batch_size, ar.d)
    optimizer = torch.optim.AdamW(ar.param_groups(arc.learning_rate, arc.head_learning_rate))
    kept: list[torch.Tensor] = []

    def step():
        loss = mse_nrm(ar(ids, mask), target).mean()
        kept.append(loss)

    with peak_rss_growth() as growth:
        saved = saved_bytes(step, ar.parameters())
        kept[0].backward()
        optimizer.step()
    peak = growth[0]
    trainable = nbytes(ar.parameters(), trainable=True)

    config = model.config
    per = ar_costs(config, cfg, dtype)
    tokens = ids.shape[1] * arc.batch_size
    blocks = len(trained_blocks(len(decoder_blocks(ar.backbone)), arc.train_last_blocks))
    estimate = tokens * (blocks * (per.checkpointed_block if arc.gradient_checkpointing else per.block))
    return {
        "tokens": tokens,
        "measured_saved_bytes": saved,
        "estimated_activation_bytes": estimate,
        "measured_peak_rss_growth": peak,
        "estimated_step_bytes": estimate + 3 * trainable,
    }
