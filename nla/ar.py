"""The activation reconstructor (AR): explanation text → activation vector.

Architecture (DESIGN.md): the first K+1 decoder blocks of the subject model with its final
norm replaced by the identity, and a ``Linear(d, d, bias=False)`` head initialised to the
identity, read at the last real token of ``prompts.ar_template`` wrapping the explanation.
Untrained, it returns the subject's own residual at block K on the prompt's last token, so
training starts from the right space and scale. Loss: mse_nrm between unit vectors
(``‖v̂/‖v̂‖ − v/‖v‖‖²``), averaged over the batch.

Padding either side gives the same result: position ids come from the attention mask and
the read position is the last index where the mask is 1.

The ar_sft stage fine-tunes it (LoRA through PEFT by default, full as an option; the head
has its own learning rate) and saves: adapter (or full block weights), ``head.safetensors``,
``mean_unit.safetensors`` (ū of the training rows, the FVE reference), the tokenizer and
``nla_meta.yaml``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from nla.config import PATHS, ModelConfig, NLAConfig, NLAError
from nla.evaluate import mse_nrm, unit
from nla.io import atomic_dir, atomic_path, read_table, vectors_of, write_json
from nla.models import check_layer, d_model, decoder_blocks, final_norm, load_model, resolve_source
from nla.sidecar import make_meta, read_sidecar, write_sidecar

HEAD_FILE = "head.safetensors"
MEAN_UNIT_FILE = "mean_unit.safetensors"
AR_CHECKPOINT, AR_STATE_FILE = "checkpoint", "state.pt"  # mid-run state of ar_sft, under its work folder
BACKBONE_FILE = "backbone.safetensors"  # full fine-tuning only; LoRA saves adapter_model.safetensors
LABELS_FILE = "explanations.parquet"
MSE_NORMALISATION = "unit: mse_nrm = ||v_hat/|v_hat| - v/|v|||^2 per row, mean over rows"
PROBE_TEXT = "The Eiffel Tower is in Paris. 12345 {}"  # tokenizer identity check on load


# ----------------------------------------------------------------------------- model surgery


def _module_name(root: nn.Module, module: nn.Module) -> str:
    for name, candidate in root.named_modules():
        if candidate is module:
            return name
    raise NLAError(f"cannot locate {type(module).__name__} inside {type(root).__name__}")


def _set_module(root: nn.Module, dotted: str, new: nn.Module) -> None:
    parent_name, _, attr = dotted.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, attr, new)


def truncate_to_layer(causal_lm: nn.Module, layer: int) -> tuple[nn.Module, nn.ModuleList]:
    """Keep blocks 0..layer, make the final norm the identity, drop the LM head: (backbone, its blocks)."""
    check_layer(causal_lm, layer)
    blocks = nn.ModuleList(list(decoder_blocks(causal_lm))[: layer + 1])
    _set_module(causal_lm, _module_name(causal_lm, decoder_blocks(causal_lm)), blocks)
    _set_module(causal_lm, _module_name(causal_lm, final_norm(causal_lm)), nn.Identity())
    backbone = causal_lm.base_model  # e.g. LlamaModel: returns last_hidden_state, no LM head
    if backbone is causal_lm:
        raise NLAError(f"{type(causal_lm).__name__} has no separate base transformer; the AR needs one")
    return backbone, blocks


def identity_head(d: int) -> nn.Linear:
    head = nn.Linear(d, d, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.eye(d))
    return head


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token per row, for left or right padding alike."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.long() * positions).argmax(dim=1)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """0, 1, 2, … over real tokens whatever the padding side (HF would count left pads)."""
    return (attention_mask.long().cumsum(dim=1) - 1).clamp_min(0)


# ----------------------------------------------------------------------------- the AR


class AR(nn.Module):
    """Backbone (blocks 0..K, norm → identity, maybe PEFT-wrapped) + identity-initialised head."""

    def __init__(
        self,
        backbone: nn.Module,
        tokenizer,
        meta: dict[str, Any],
        head: nn.Linear | None = None,
        mean_unit: torch.Tensor | None = None,
    ):
        super().__init__()
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.meta = meta
        self.d = int(meta["d_model"])
        self.head = head if head is not None else identity_head(self.d)
        self.head.float()  # the head stays float32 whatever the backbone dtype
        self.mean_unit = mean_unit  # ū of the training rows (float32, cpu) or None before training
        before, self._after = meta["prompts"]["ar_template"].split("{explanation}")
        # Whitespace before the slot goes with the explanation, so " Final" tokenizes as in running text.
        self._before = before.rstrip()
        self._gap = before[len(self._before) :]
        self.max_explanation_tokens = int(meta["max_explanation_tokens"])

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    @property
    def fve_denominator(self) -> float | None:
        return self.meta.get("fve_denominator")

    def prompt_ids(self, explanation: str) -> list[int]:
        """Template tokens around the (capped) explanation tokens; special tokens as the tokenizer adds them."""
        tok = self.tokenizer
        before = tok(self._before, add_special_tokens=True)["input_ids"]
        middle = tok(self._gap + explanation, add_special_tokens=False)["input_ids"][: self.max_explanation_tokens]
        after = tok(self._after, add_special_tokens=False)["input_ids"]
        return before + middle + after

    def encode(self, explanations: list[str], padding_side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
        ids = [self.prompt_ids(text) for text in explanations]
        width = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for r, row in enumerate(ids):
            span = slice(0, len(row)) if padding_side == "right" else slice(width - len(row), width)
            input_ids[r, span] = torch.tensor(row)
            mask[r, span] = 1
        return input_ids.to(self.device), mask.to(self.device)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Head output at the last real token: (N, d) float32, not normalised."""
        out = self.backbone(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
            use_cache=False,
        )
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return self.head(hidden[rows, last_token_index(attention_mask)].float())

    @torch.no_grad()
    def reconstruct(self, explanations: list[str], batch_size: int = 32, progress: bool = False) -> torch.Tensor:
        """v̂ for each explanation: (N, d) float32 on the cpu. Batches are length-sorted."""
        was_training = self.training
        self.eval()
        lengths = [len(self.prompt_ids(text)) for text in explanations]
        order = np.argsort(lengths, kind="stable")
        out = torch.empty((len(explanations), self.d), dtype=torch.float32)
        starts = range(0, len(order), batch_size)
        for start in tqdm(starts, desc="AR reconstruct", unit="batch", disable=not progress):
            idx = order[start : start + batch_size]
            out[torch.as_tensor(idx)] = self(*self.encode([explanations[i] for i in idx])).cpu()
        self.train(was_training)
        return out

    def loss(self, explanations: list[str], target_vectors: torch.Tensor) -> torch.Tensor:
        """Differentiable mean mse_nrm of the reconstructions against the targets."""
        pred = self(*self.encode(explanations))
        return mse_nrm(pred, target_vectors.to(pred.device)).mean()

    def parameters_to_train(self) -> list[nn.Parameter]:
        """Adapter (or all backbone) weights plus the head."""
        return [p for p in self.parameters() if p.requires_grad]

    def param_groups(self, lr: float, head_lr: float) -> list[dict[str, Any]]:
        head = list(self.head.parameters())
        body = [p for p in self.backbone.parameters() if p.requires_grad]
        return [{"params": body, "lr": lr}, {"params": head, "lr": head_lr}]

    def set_reference(self, train_vectors: torch.Tensor) -> None:
        """Record ū and mean ‖u − ū‖² of the training rows: the FVE reference for every later use."""
        u = unit(train_vectors.cpu())
        self.mean_unit = u.mean(dim=0)
        self.meta["fve_denominator"] = float((u - self.mean_unit).pow(2).sum(-1).mean())
        self.meta["mean_unit_norm"] = float(self.mean_unit.norm())

    def save(self, out_dir: str | Path, meta_updates: dict[str, Any] | None = None) -> Path:
        """Write the checkpoint folder atomically (adapter or weights, head, ū, tokenizer, sidecar)."""
        from safetensors.torch import save_file

        updates = dict(meta_updates or {})
        meta = dict(self.meta)
        meta.update(make_meta("nla_model", updates.get("stage", meta["stage"])))
        meta.update(updates)
        with atomic_dir(out_dir) as tmp:
            if meta["finetune"] == "lora":
                self.backbone.save_pretrained(tmp)
            else:
                state = {k: v.detach().contiguous().cpu() for k, v in self.backbone.state_dict().items()}
                save_file(state, str(tmp / BACKBONE_FILE))
            save_file({"weight": self.head.weight.detach().float().cpu().contiguous()}, str(tmp / HEAD_FILE))
            if self.mean_unit is not None:
                save_file({"mean_unit": self.mean_unit.float().contiguous()}, str(tmp / MEAN_UNIT_FILE))
            self.tokenizer.save_pretrained(tmp)
            write_sidecar(tmp, meta)
        self.meta = meta
        return Path(out_dir)


def trained_blocks(n_blocks: int, last: int | None) -> range:
    """Indices of the blocks that train: all, or the top `last` (nothing below them needs a backward pass)."""
    return range(max(0, n_blocks - last) if last else 0, n_blocks)


def _lora_config(lora, backbone: nn.Module, block_list: nn.ModuleList, blocks: range):
    """PEFT LoRA on `lora.target_modules` inside the chosen blocks, named in full so any layout works."""
    from peft import LoraConfig as PeftLoraConfig

    prefix = _module_name(backbone, block_list)
    targets = [
        f"{prefix}.{i}.{name}"
        for i in blocks
        for name, _ in block_list[i].named_modules()
        if name and name.rsplit(".", 1)[-1] in lora.target_modules
    ]
    if not targets:
        raise NLAError(f"no module named {lora.target_modules} in the decoder blocks; set ar_sft.lora.target_modules")
    return PeftLoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets, bias="none"
    )


def ar_meta(cfg: NLAConfig, source, model: nn.Module, stage: str = "ar_sft", **fields: Any) -> dict[str, Any]:
    lora = cfg.ar_sft.lora
    return make_meta(
        "nla_model",
        stage,
        role="ar",
        base_model=cfg.model.name,
        base_model_fingerprint=source.fingerprint,
        base_model_gguf_file=cfg.model.gguf_file,
        base_model_revision=cfg.model.revision,
        dtype=cfg.model.dtype,
        d_model=d_model(model),
        layer=cfg.model.layer,
        blocks_kept=cfg.model.layer + 1,
        architecture=model.config.model_type,
        prompts=cfg.prompts.model_dump(),
        max_explanation_tokens=cfg.ar_sft.max_explanation_tokens,
        mse_normalisation=MSE_NORMALISATION,
        finetune="lora" if lora.enabled else "full",
        lora=lora.model_dump() if lora.enabled else None,
        head_file=HEAD_FILE,
        mean_unit_file=MEAN_UNIT_FILE,
        **fields,
    )


def new_ar(cfg: NLAConfig, loaded=None) -> AR:
    """A fresh AR from the subject model in `cfg.model` (or an already `loaded` (model, tokenizer, source))."""
    model, tokenizer, source = loaded or load_model(cfg.model, for_training=True)
    meta = ar_meta(cfg, source, model)
    backbone, block_list = truncate_to_layer(model, cfg.model.layer)
    blocks = trained_blocks(len(block_list), cfg.ar_sft.train_last_blocks)
    meta["trained_blocks"] = [blocks.start, blocks.stop - 1]
    if cfg.ar_sft.lora.enabled:
        from peft import get_peft_model

        backbone = get_peft_model(backbone, _lora_config(cfg.ar_sft.lora, backbone, block_list, blocks))
    else:
        backbone.requires_grad_(blocks.start == 0)  # embeddings train only when every block does
        for i in blocks:
            block_list[i].requires_grad_(True)
    if cfg.ar_sft.gradient_checkpointing:
        backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ar = AR(backbone, tokenizer, meta)
    return ar.to(next(backbone.parameters()).device)


def load_ar(checkpoint_dir: str | Path, device: str = "auto") -> AR:
    """Load a saved AR; refuse (NLAError) when the sidecar disagrees with the live model or tokenizer."""
    from safetensors.torch import load_file

    folder = Path(checkpoint_dir)
    meta = read_sidecar(folder)
    if meta["kind"] != "nla_model" or meta.get("role") != "ar":
        raise NLAError(
            f"{folder} is a {meta['kind']}/{meta.get('role')} artifact, not an AR checkpoint; "
            "pass the ar_sft or RL AR folder"
        )
    weights = "adapter_model.safetensors" if meta.get("finetune") == "lora" else BACKBONE_FILE
    missing = [name for name in (weights, HEAD_FILE) if not (folder / name).is_file()]
    if missing:  # before the (slow) base model load
        raise NLAError(f"{folder} lacks {missing}; the checkpoint is incomplete: copy the whole folder or rerun ar_sft")
    source = resolve_source(meta["base_model"], meta.get("base_model_gguf_file"), meta.get("base_model_revision"))
    if source.fingerprint != meta.get("base_model_fingerprint"):
        raise NLAError(
            f"{folder}: trained on {meta.get('base_model_fingerprint')} but '{meta['base_model']}' "
            f"resolves to {source.fingerprint}; install the model it was trained on or retrain"
        )
    model_cfg = ModelConfig(
        name=meta["base_model"],
        gguf_file=meta.get("base_model_gguf_file"),
        revision=meta.get("base_model_revision"),
        dtype=meta.get("dtype", "auto"),
        layer=meta["layer"],
        device=device,
    )
    model, live_tokenizer, _ = load_model(model_cfg)
    if d_model(model) != meta["d_model"]:
        raise NLAError(
            f"{folder}: sidecar d_model={meta['d_model']} but the model has {d_model(model)}; "
            "use the model the AR was trained on"
        )
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer(PROBE_TEXT)["input_ids"] != live_tokenizer(PROBE_TEXT)["input_ids"]:
        raise NLAError(f"{folder}: the saved tokenizer disagrees with the base model's; use the matching base model")
    backbone, block_list = truncate_to_layer(model, meta["layer"])
    if meta["finetune"] == "lora":
        from peft import PeftModel

        backbone = PeftModel.from_pretrained(backbone, folder, is_trainable=True)
    else:
        state = load_file(str(folder / BACKBONE_FILE))
        backbone.load_state_dict({k: v.to(next(backbone.parameters()).dtype) for k, v in state.items()})
        first, last = meta.get("trained_blocks", [0, meta["layer"]])
        backbone.requires_grad_(first == 0)
        for i in range(first, last + 1):
            block_list[i].requires_grad_(True)
    head_weight = load_file(str(folder / HEAD_FILE))["weight"]
    if tuple(head_weight.shape) != (meta["d_model"], meta["d_model"]):
        raise NLAError(
            f"{folder}/{HEAD_FILE}: shape {tuple(head_weight.shape)} does not match d_model "
            f"{meta['d_model']}; the checkpoint is corrupt, retrain it"
        )
    head = identity_head(meta["d_model"])
    with torch.no_grad():
        head.weight.copy_(head_weight)
    mean_unit = load_file(str(folder / MEAN_UNIT_FILE))["mean_unit"] if (folder / MEAN_UNIT_FILE).exists() else None
    ar = AR(backbone, tokenizer, meta, head, mean_unit)
    ar.to(next(backbone.parameters()).device)
    return ar.eval()


# ----------------------------------------------------------------------------- the ar_sft stage


def labelled_rows(
    activations_dir, splits_dir, labels_dir, splits: list[str], *, d_model: int | None = None, layer: int | None = None
):
    """Activation rows of `splits` joined with their warm-start explanation (rows without one are dropped)."""
    from nla.extract import load_rows

    path = Path(labels_dir) / LABELS_FILE
    if not path.is_file():
        raise NLAError(f"{path} not found; run the label stage first (`nla label` or `dvc repro label`)")
    labels = read_table(path, columns=["row_id", "explanation"])
    rows = load_rows(activations_dir, splits_dir, splits, d_model=d_model, layer=layer)
    rows = rows.merge(labels, on="row_id", how="inner", validate="one_to_one")
    if rows.empty:
        raise NLAError(f"no labelled rows in splits {splits}; check that the label stage covered them (label.splits)")
    return rows.reset_index(drop=True)


def _lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def fit_ar(
    cfg: NLAConfig,
    texts: list[str],
    targets: torch.Tensor,
    loaded=None,
    work_dir: str | Path | None = None,
    fingerprint: str = "",
) -> tuple[AR, list[dict], dict]:
    """Train a fresh AR on (text → target vector) pairs: AdamW, warm-up + cosine, the head on its own lr.

    Returns (AR, per-step log, summary metrics). ū and the FVE denominator come from `targets`.
    With `work_dir`, a checkpoint every `ar_sft.checkpoint_every` steps lets a killed run continue
    exactly where it stopped (same batches, same updates) when the inputs match `fingerprint`.
    """
    sft = cfg.ar_sft
    torch.manual_seed(sft.seed)
    ar = new_ar(cfg, loaded)
    ar.set_reference(targets)
    ar.train()
    optimizer = torch.optim.AdamW(ar.param_groups(sft.learning_rate, sft.head_learning_rate), weight_decay=0.0)
    steps_per_epoch = math.ceil(len(texts) / sft.batch_size)
    total = sft.max_steps if sft.max_steps > 0 else max(1, round(sft.epochs * steps_per_epoch))
    warmup = max(1, round(sft.warmup_ratio * total))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, total, warmup))
    rng = np.random.default_rng(sft.seed)
    order: list[int] = []
    log: list[dict[str, float]] = []
    denom, tokens = ar.fve_denominator, 0
    first = 0
    if work_dir is not None and (state := _load_ar_state(Path(work_dir), fingerprint, ar, optimizer, scheduler)):
        first, log, order, tokens = state["step"], state["log"], state["order"], state["tokens"]
        rng.bit_generator.state = state["numpy_rng"]
        torch.set_rng_state(state["torch_rng"])
        tqdm.write(f"ar_sft: resumed at step {first} from {Path(work_dir) / AR_CHECKPOINT}")
    start = time.perf_counter() - (log[-1]["seconds"] if log else 0.0)
    bar = tqdm(range(first, total), initial=first, total=total, desc="ar_sft", unit="step")
    for step in bar:
        if len(order) < sft.batch_size:  # epochs of fresh permutations, batches may straddle two
            order += rng.permutation(len(texts)).tolist()
        idx, order = order[: sft.batch_size], order[sft.batch_size :]
        batch = [texts[i] for i in idx]
        loss = ar.loss(batch, targets[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ar.parameters_to_train(), sft.max_grad_norm)
        optimizer.step()
        scheduler.step()
        value = float(loss.detach())
        tokens += sum(len(ar.prompt_ids(t)) for t in batch)
        log.append(
            {
                "step": step + 1,
                "epoch": (step + 1) / steps_per_epoch,
                "loss": value,
                "fve_train_batch": 1 - value / denom,
                "lr": optimizer.param_groups[0]["lr"],
                "seconds": time.perf_counter() - start,
            }
        )
        bar.set_postfix(loss=f"{value:.3f}")
        if work_dir is not None and (step + 1) % sft.checkpoint_every == 0 and step + 1 < total:
            state = {
                "fingerprint": fingerprint,
                "step": step + 1,
                "log": log,
                "order": order,
                "tokens": tokens,
                "params": [p.detach().cpu().clone() for p in ar.parameters_to_train()],
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "numpy_rng": rng.bit_generator.state,
                "torch_rng": torch.get_rng_state(),
            }
            with atomic_dir(Path(work_dir) / AR_CHECKPOINT) as tmp:
                torch.save(state, tmp / AR_STATE_FILE)
    ar.eval()
    seconds = time.perf_counter() - start
    train_mse = float(np.mean([r["loss"] for r in log[-steps_per_epoch:]]))  # ≈ the last epoch's fit
    metrics = {
        "ar_sft_train_mse_nrm": train_mse,
        "ar_sft_train_fve": 1 - train_mse / denom,
        "ar_sft_first_loss": log[0]["loss"],
        "ar_sft_steps": total,
        "ar_sft_rows": len(texts),
        "ar_sft_seconds": seconds,
        "ar_sft_tokens_per_s": tokens / max(seconds, 1e-9),
    }
    return ar, log, metrics


def _load_ar_state(work_dir: Path, fingerprint: str, ar: AR, optimizer, scheduler) -> dict | None:
    """Restore a mid-run checkpoint into `ar`, `optimizer` and `scheduler`; None when there is none for these inputs."""
    path = work_dir / AR_CHECKPOINT / AR_STATE_FILE
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    params = ar.parameters_to_train()
    if state["fingerprint"] != fingerprint or [t.shape for t in state["params"]] != [p.shape for p in params]:
        tqdm.write(f"ar_sft: ignoring the checkpoint in {work_dir} (other inputs or params); starting over")
        return None
    with torch.no_grad():
        for saved, p in zip(state["params"], params, strict=True):
            p.copy_(saved.to(p.device))
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return state


def ar_fingerprint(
    cfg: NLAConfig, source_fingerprint: str, row_ids: list[str], texts: list[str], targets: torch.Tensor
) -> str:
    """Identity of an ar_sft run for resuming: its params, the model and the exact training pairs."""
    blob = json.dumps(
        [cfg.ar_sft.model_dump(), cfg.model.model_dump(), cfg.prompts.ar_template, source_fingerprint, row_ids, texts],
        sort_keys=True,
    )
    digest = hashlib.sha256(blob.encode())
    digest.update(targets.numpy().tobytes())
    return digest.hexdigest()[:16]


def run_ar_sft(
    cfg: NLAConfig,
    activations_dir: str | Path,
    splits_dir: str | Path,
    labels_dir: str | Path,
    out_dir: str | Path,
    *,
    metrics_path: str | Path | None = None,
    plots_path: str | Path | None = None,
    work_dir: str | Path = Path(PATHS.work) / "ar_sft",
) -> dict[str, Any]:
    """Train the AR on (explanation → activation) over the ar_sft rows; save checkpoint, log and metrics.

    A killed run resumes from its last mid-run checkpoint in `work_dir` (removed once the AR is saved).

    Metrics (JSON, for `dvc metrics`) go to `metrics_path` and the per-step loss (CSV, for `dvc plots`)
    to `plots_path`; both default to files beside `out_dir` (DVC outputs must not overlap).
    """
    loaded = load_model(cfg.model, for_training=True)
    model, _, source = loaded
    data_meta = read_sidecar(activations_dir)
    if data_meta.get("base_model_fingerprint") not in (None, source.fingerprint):
        raise NLAError(
            f"{activations_dir} was extracted from {data_meta['base_model_fingerprint']} but model.name "
            f"gives {source.fingerprint}; re-run extract or fix model.name"
        )
    rows = labelled_rows(
        activations_dir, splits_dir, labels_dir, ["ar_sft"], d_model=d_model(model), layer=cfg.model.layer
    )
    labels_meta = read_sidecar(labels_dir) if (Path(labels_dir) / "nla_meta.yaml").is_file() else {}
    texts, targets = rows.explanation.tolist(), torch.from_numpy(vectors_of(rows))
    fingerprint = ar_fingerprint(cfg, source.fingerprint, rows.row_id.tolist(), texts, targets)
    ar, log, metrics = fit_ar(cfg, texts, targets, loaded, work_dir, fingerprint)
    ar.save(
        out_dir,
        {
            "stage": "ar_sft",
            "train_rows": len(rows),
            "train_steps": metrics["ar_sft_steps"],
            "labeler": labels_meta.get("labeler", labels_meta.get("label")),
            "training": {**cfg.ar_sft.model_dump(), **metrics},
            "parents": [str(activations_dir), str(splits_dir), str(labels_dir)],
        },
    )
    out_dir = Path(out_dir)
    _write_log(plots_path or out_dir.with_name(out_dir.name + "_loss.csv"), log)
    write_json(metrics_path or out_dir.with_name(out_dir.name + "_metrics.json"), metrics)
    shutil.rmtree(Path(work_dir) / AR_CHECKPOINT, ignore_errors=True)  # the AR is saved: no run to resume
    return metrics


def _write_log(path: Path, log: list[dict[str, float]]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(log[0]))
        writer.writeheader()
        writer.writerows(log)
