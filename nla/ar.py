"""The activation reconstructor (AR): explanation text → activation vector.

Architecture (docs/design.md, "The AR"): the first K+1 decoder blocks of the subject model with its final
norm replaced by the identity, and a ``Linear(d, d, bias=False)`` head initialised to the
identity, read at the last real token of ``prompts.ar_template`` wrapping the explanation.
Untrained, it returns the subject's own residual at block K on the prompt's last token, so
training starts from the right space and scale. Loss: mse_nrm between unit vectors
(``‖v̂/‖v̂‖ − v/‖v‖‖²``, `nla.metrics`), averaged over the batch.

Prompt tokenization (`ar_prompt_tokenization` in the sidecar; absent means piecewise, so
every older checkpoint loads as it was trained): this project's ARs tokenize the template
around the explanation piecewise (template head with special tokens, explanation capped at
`max_explanation_tokens`, template tail); the public ARs (`nla.interop`) tokenize the filled
template as one string (``ar_add_special_tokens`` says whether the tokenizer adds BOS), which
differs at both boundaries. They also rescale the hidden state to norm ``ar_head_input_norm``
(√d) before the head; the direction, and so every metric, is the same either way.

Padding either side gives the same result: position ids come from the attention mask and
the read position is the last index where the mask is 1.

The model owns its files: `AR.save` writes the adapter (LoRA through PEFT, the default) or
the full block weights, ``head.safetensors``, ``mean_unit.safetensors`` (ū of the training
rows, the FVE reference), the tokenizer and ``nla_meta.yaml``; `load_ar` reads them back and
refuses a sidecar that disagrees with the live model. Training is `nla.ar_sft`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from nla.config import NLAConfig
from nla.data import pad_batch
from nla.errors import NLAError
from nla.io import atomic_dir, check_weight_files
from nla.metrics import MSE_NORMALISATION, fve_denominator, mse_nrm, unit
from nla.models import (
    check_layer,
    d_model,
    decoder_blocks,
    final_norm,
    load_model,
    pin_adapter_config,
    resolve_source,
)
from nla.sidecar import base_model_config, make_meta, read_sidecar, require, write_sidecar

TOKENIZATIONS = ("piecewise", "one_string")  # the AR prompt conventions a sidecar can record
HEAD_FILE = "head.safetensors"
MEAN_UNIT_FILE = "mean_unit.safetensors"
BACKBONE_FILE = "backbone.safetensors"  # full fine-tuning only; LoRA saves adapter_model.safetensors
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


def truncate_to_layer(
    causal_lm: nn.Module, layer: int, *, keep_final_norm: bool = False
) -> tuple[nn.Module, nn.ModuleList]:
    """Keep blocks 0..layer, make the final norm the identity, drop the LM head: (backbone, its blocks).

    `keep_final_norm`: for public ARs trained before the norm was stripped (their ar_meta.json says so).
    """
    check_layer(causal_lm, layer)
    blocks = nn.ModuleList(list(decoder_blocks(causal_lm))[: layer + 1])
    _set_module(causal_lm, _module_name(causal_lm, decoder_blocks(causal_lm)), blocks)
    if not keep_final_norm:
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
        cap = meta.get("max_explanation_tokens")
        self.max_explanation_tokens = None if cap is None else int(cap)  # None: no cap (public ARs)
        self.tokenization = meta.get("ar_prompt_tokenization", "piecewise")
        if self.tokenization not in TOKENIZATIONS:
            raise NLAError(
                f"ar_prompt_tokenization={self.tokenization!r} is not one of {TOKENIZATIONS}; fix the sidecar"
            )
        self.add_special_tokens = bool(meta.get("ar_add_special_tokens", False))  # one_string only
        norm = meta.get("ar_head_input_norm")
        self.head_input_norm = None if norm is None else float(norm)

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    @property
    def fve_denominator(self) -> float | None:
        return self.meta.get("fve_denominator")

    def prompt_ids(self, explanation: str) -> list[int]:
        """Template tokens around the (capped) explanation tokens; special tokens as the tokenizer adds them.

        one_string: the filled template as one string, as the public ARs were trained.
        """
        tok = self.tokenizer
        if self.tokenization == "one_string":
            text = self.meta["prompts"]["ar_template"].replace("{explanation}", explanation)
            return tok(text, add_special_tokens=self.add_special_tokens)["input_ids"]
        before = tok(self._before, add_special_tokens=True)["input_ids"]
        middle = tok(self._gap + explanation, add_special_tokens=False)["input_ids"][: self.max_explanation_tokens]
        after = tok(self._after, add_special_tokens=False)["input_ids"]
        return before + middle + after

    def encode(self, explanations: list[str], padding_side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask), both (N, longest prompt), on the AR's device."""
        ids, mask = pad_batch(
            [self.prompt_ids(text) for text in explanations], self.tokenizer.pad_token_id, padding_side
        )
        return ids.to(self.device), mask.to(self.device)

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
        last = hidden[rows, last_token_index(attention_mask)].float()  # (N, d)
        if self.head_input_norm is not None:  # the public ARs' rescaling (norm in float32, as theirs)
            last = last / (last.norm(dim=-1, keepdim=True).clamp_min(1e-12) / self.head_input_norm)
        return self.head(last).float()  # float32 under autocast too

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
        self.meta["fve_denominator"] = fve_denominator(train_vectors.cpu(), self.mean_unit)
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
                pin_adapter_config(self.backbone)
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
        autocast=cfg.model.autocast,  # trained with bf16 matmuls where 'auto' resolved to them
        d_model=d_model(model),
        layer=cfg.model.layer,
        blocks_kept=cfg.model.layer + 1,
        architecture=model.config.model_type,
        prompts=cfg.prompts.model_dump(),
        max_explanation_tokens=cfg.ar_sft.max_explanation_tokens,
        mse_normalisation=MSE_NORMALISATION,
        ar_prompt_tokenization="piecewise",
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


def load_ar(checkpoint_dir: str | Path, device: str = "auto", *, meta: dict[str, Any] | None = None) -> AR:
    """Load a saved AR; refuse (NLAError) when the sidecar disagrees with the live model or tokenizer.

    The files and the base model's fingerprint are checked before the (slow) base model load.
    `meta`: a sidecar to use instead of the folder's own (e.g. with another dtype, `nla.interop`).
    """
    from safetensors.torch import load_file

    folder = Path(checkpoint_dir)
    where = str(folder)
    meta = read_sidecar(folder) if meta is None else meta
    require(meta, where=where, role="ar")
    if meta.get("ar_layout", "nla") != "nla":
        raise NLAError(
            f"{folder} holds a public ({meta['ar_layout']}) AR; load it with nla.interop.load_any_ar or NLA.load"
        )
    weights = "adapter_model.safetensors" if meta.get("finetune") == "lora" else BACKBONE_FILE
    missing = [name for name in (weights, HEAD_FILE) if not (folder / name).is_file()]
    if missing:
        raise NLAError(f"{folder} lacks {missing}; the checkpoint is incomplete: copy the whole folder or rerun ar_sft")
    check_weight_files(folder)
    base = base_model_config(meta, device)
    require(meta, where=where, fingerprint=resolve_source(base.name, base.gguf_file, base.revision).fingerprint)
    model, live_tokenizer, _ = load_model(base)
    require(meta, where=where, d_model=d_model(model))
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
