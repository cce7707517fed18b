"""The activation verbalizer (AV): prompt, marker, injection scale, the model class and its save/load.

The AV prompt is the chat template's user turn (`prompts.av_user` with the marker in the
vector slot) followed by the generation prompt and the prefilled answer opener, so the AV
writes the explanation directly and closes it with `prompts.av_answer_close`:

    <chat user turn: "... <concept>{marker}</concept> ...">  <explanation>  EXPLANATION </explanation> <eos>
    '----------------------- prompt (no loss) -------------------------'  '------ completion (loss) ------'

Public AVs (nanoNLA, the paper's release; `nla.interop`) are not prefilled: they write
``<explanation>\n EXPLANATION \n</explanation>`` themselves. The sidecar's ``av_prefill: false``
says so; the prompt then ends at the generation prompt, the SFT target carries both tags, and
the explanation is read between the tags as written. Sidecars without the key are prefilled.

Every row's prompt is the same token sequence, so batches need no padding on the prompt
side and completions all start at the same index. The activation vector of each row is
written at the marker by `nla.injection.ActivationInjector`, bound around each forward: in
SFT (`nla.av_sft`), in generation (prefill only) and in log-prob passes.

Checkpoint layout (`AV.save`, the one writer for av_sft, RL and publish): the folder itself
loads with PEFT/transformers, i.e. the active LoRA adapter or full weights at its root, the
tokenizer beside them, optional merged weights in `merged/`, and `nla_meta.yaml`. `load_av`
reads it back and refuses a sidecar that disagrees with the live model or tokenizer. Training
lives in `nla.av_sft` (TRL), the α sweep in `nla.sweep`; this module needs neither TRL nor
datasets, so loading and generation work where they are missing.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

import nla.distributed as distributed
from nla.config import InjectionConfig, ModelConfig, PromptConfig
from nla.data import pad_batch
from nla.errors import NLAError
from nla.injection import ActivationInjector, Marker, anchor_marker, choose_marker_char
from nla.io import atomic_dir, check_weight_files
from nla.models import check_layer, d_model, load_model, load_tokenizer, pin_adapter_config, resolve_source
from nla.sampling import Decoder, MergedCopy
from nla.sidecar import base_model_config, read_sidecar, require, sidecar_path, write_sidecar

MERGED_DIR = "merged"  # `AV.save(..., merged=True)`: full weights with the adapter merged in
WEIGHT_FILES = {  # the sidecar's `weights` -> the files, one of which must be there
    "adapter": ("adapter_model.safetensors",),
    "full": ("model.safetensors", "model.safetensors.index.json"),
}


# ----------------------------------------------------------------------------- prompt and marker


def av_prompt(
    tokenizer, prompts: PromptConfig, marker_char: str, *, prefill: bool = True, template_kwargs: dict | None = None
) -> str:
    """The full AV prompt text: the chat template applied (with `template_kwargs`, e.g. a sidecar's
    ``chat_template_kwargs``, and nothing else), then the answer opener when `prefill`."""
    messages = [{"role": "user", "content": prompts.av_user.format(marker=marker_char)}]
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, **(template_kwargs or {})
    )
    return text + (prompts.av_answer_open if prefill else "")


def av_prompt_ids(tokenizer, prompts: PromptConfig, marker_char: str, **style) -> list[int]:
    """Token ids of the AV prompt (`style`: `av_prompt`'s keywords); the template already holds any BOS,
    so no special tokens are added."""
    return tokenizer(av_prompt(tokenizer, prompts, marker_char, **style), add_special_tokens=False)["input_ids"]


def prompt_style(meta: dict) -> dict:
    """`av_prompt`'s keywords as an AV sidecar records them (absent keys: this project's prefilled prompt)."""
    return {"prefill": bool(meta.get("av_prefill", True)), "template_kwargs": meta.get("chat_template_kwargs") or {}}


def av_marker(tokenizer, prompts: PromptConfig, injection: InjectionConfig, **style) -> Marker:
    """Choose the marker for this tokenizer and anchor it in the canonical AV prompt."""
    char = choose_marker_char(tokenizer, injection.marker_ranges, injection.marker_char)
    return anchor_marker(tokenizer, char, av_prompt_ids(tokenizer, prompts, char, **style))


def stop_ids(model, tokenizer) -> set[int]:
    """Every end-of-sequence id: the tokenizer's and each of the generation config's (Qwen3 lists two)."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    configured = configured if isinstance(configured, list | tuple) else [configured]
    return {int(i) for i in [tokenizer.eos_token_id, *configured] if i is not None}


def attach_injector(
    model, marker: Marker, injection: InjectionConfig, scale: float | None = None
) -> ActivationInjector:
    """Hook `model` so every forward writes the bound vectors at anchored marker sites."""
    return ActivationInjector(
        model, marker, injection.mode, scale if scale is not None else injection.scale, injection.karvonen_block
    )


def completion_ids(tokenizer, prompts: PromptConfig, explanation: str, *, prefill: bool = True) -> list[int]:
    """The SFT target: explanation, closing tag, end of sequence (not prefilled: the opener and newlines too)."""
    text = explanation.strip() + prompts.av_answer_close
    if not prefill:
        text = f"{prompts.av_answer_open}\n{explanation.strip()}\n{prompts.av_answer_close}"
    return tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def parse_completion(text: str, prompts: PromptConfig, *, prefill: bool = True) -> tuple[str, bool]:
    """(clean explanation, closed).

    Prefilled: the text before the closing tag, tags stripped, whitespace collapsed. Not
    prefilled (public AVs): the text between the first opener and the closing tag after it,
    stripped but otherwise as written, as the reference clients read it (their ARs were trained
    on it); without both tags, the whole text stripped and `closed` False.
    """
    if prefill:
        head, sep, _ = text.partition(prompts.av_answer_close)
        head = head.replace(prompts.av_answer_open, " ")
        return " ".join(head.split()), bool(sep)
    _, opened, rest = text.partition(prompts.av_answer_open)
    body, closed, _ = rest.partition(prompts.av_answer_close)
    return (body.strip(), True) if opened and closed else (text.strip(), False)


# ----------------------------------------------------------------------------- injection scale


def injection_scale(
    injection: InjectionConfig, activations_meta: dict, sweep_path: str | Path | None = None
) -> tuple[float | None, str]:
    """α for `replace` and how it was chosen: params > the α sweep's pick > 75th percentile of norms.

    The sweep is an optional stage: a sweep path whose file does not exist falls through to
    the rule of thumb, and the returned note (recorded in the sidecar) says so.
    """
    if injection.mode == "karvonen":
        return None, "karvonen: norm-matched (||h_p|| * u), no scale"
    if injection.scale is not None:
        return float(injection.scale), "params: injection.scale"
    note = ""
    if sweep_path is not None:
        path = Path(sweep_path)
        if path.is_file():
            try:
                alpha = float(json.loads(path.read_text())["alpha"])
            except (ValueError, KeyError, TypeError):
                raise NLAError(f"{path} is not an α sweep result; re-run `nla sweep-alpha`") from None
            return alpha, f"alpha sweep: {path} (largest shuffled-minus-correct loss gap)"
        note = f" (no sweep result at {path})"
    quantiles = activations_meta.get("norm_quantiles") or {}
    if "0.75" not in quantiles:
        raise NLAError("the activations sidecar has no norm_quantiles['0.75']; set injection.scale or re-run extract")
    return float(quantiles["0.75"]), "rule of thumb: 75th percentile of activation norms (activations sidecar)" + note


# ----------------------------------------------------------------------------- the AV


@dataclass(frozen=True)
class Explanation:
    text: str  # parsed and cleaned, without tags
    token_ids: tuple[int, ...]  # the completion as generated, up to and including the first EOS
    closed: bool  # the closing tag came before the token cap
    raw: str = ""  # the decoded completion the text was parsed from (special tokens skipped)


def _is_peft(model: torch.nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


@dataclass
class AV:
    """A model with an attached injector, ready to verbalize activation vectors."""

    model: torch.nn.Module
    tokenizer: object
    injector: ActivationInjector
    marker: Marker
    meta: dict
    prompts: PromptConfig = field(default_factory=PromptConfig)
    _decoder: Decoder | None = field(default=None, init=False, repr=False)
    _merged: MergedCopy | None = field(default=None, init=False, repr=False)

    @property
    def prompt_ids(self) -> list[int]:
        return av_prompt_ids(self.tokenizer, self.prompts, self.marker.char, **prompt_style(self.meta))

    @property
    def prefill(self) -> bool:
        return prompt_style(self.meta)["prefill"]

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _check(self, vectors: torch.Tensor) -> torch.Tensor:
        d = self.meta["d_model"]
        if vectors.ndim != 2 or vectors.shape[1] != d:
            raise NLAError(
                f"vectors must have shape (n, {d}) for this AV, got {tuple(vectors.shape)}; "
                f"use activations from layer {self.meta['layer']} of {self.meta['base_model']}"
            )
        return vectors.to(self.device, torch.float32)

    def generate(
        self, vectors: torch.Tensor, max_new_tokens: int, temperature: float = 0.0, batch_size: int = 16
    ) -> list[Explanation]:
        """One explanation per vector: greedy at temperature 0, else pure sampling softmax(logits / T).

        Decoding runs through `nla.sampling.Decoder` (static KV cache; CUDA graphs on GPU), which
        gives the same tokens as `model.generate` under greedy decoding. The vectors are bound for
        the prefill only: decode steps carry no marker site. A row stops at any end-of-sequence
        id of the tokenizer or the generation config (`stop_ids`).
        """
        vectors = self._check(vectors)
        prompt = torch.tensor(self.prompt_ids, device=self.device)
        stops = stop_ids(self.model, self.tokenizer)
        injector, decoder = self._decoding()
        out: list[Explanation] = []
        starts = range(0, len(vectors), batch_size)
        for start in tqdm(starts, desc="av generate", unit="batch", disable=len(starts) < 2):
            batch = vectors[start : start + batch_size]
            # Identical prompts: no padding is needed; decode appends on the right.
            ids = prompt.expand(len(batch), -1)
            with injector.bound(batch):
                new = decoder.sample(
                    ids, torch.ones_like(ids), max_new_tokens, temperature, stops, pad_id=self.tokenizer.pad_token_id
                )
            seqs = torch.cat([ids, new], dim=1)
            for row in seqs[:, len(prompt) :].tolist():
                end = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
                row = row[:end]
                raw = self.tokenizer.decode(row, skip_special_tokens=True)
                text, closed = parse_completion(raw, self.prompts, prefill=self.prefill)
                out.append(Explanation(text, tuple(row), closed, raw))
        return out

    def _decoding(self) -> tuple[ActivationInjector, Decoder]:
        """What generation runs on: the model itself, or for a LoRA AV (in training) its merged copy, synced."""
        if distributed.is_sharded(self.model):  # FSDP: no merged copy; a fresh decoder on the gathered weights
            return self.injector, Decoder(self.model, cuda_graph=False)
        if _is_peft(self.model):  # inference loads are merged already (`load_av`)
            if self._merged is None:
                self._merged = MergedCopy(self.model, self.injector)
            self._merged.sync()
            return self._merged.injector, self._merged.decoder
        if self._decoder is None:
            self._decoder = Decoder(self.model)
        return self.injector, self._decoder

    def completion_log_probs(
        self, vectors: torch.Tensor, completion_ids: list[list[int]], temperature: float = 1.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(log_probs, mask), both (n, max_len) float32: log p(token_t | injected prompt, tokens_<t).

        Completions are right-padded (mask 0, log-prob 0). Gradients flow unless the caller
        uses no_grad; logits are divided by `temperature` (1.0 = the sampling policy at T=1).
        """
        vectors = self._check(vectors)
        if len(completion_ids) != len(vectors):
            raise NLAError(f"{len(completion_ids)} completions for {len(vectors)} vectors; pass one per vector")
        prompt = torch.tensor(self.prompt_ids, dtype=torch.long)
        n, p = len(vectors), len(prompt)
        completions, mask = pad_batch(completion_ids, self.tokenizer.pad_token_id)  # (n, length) each
        length = completions.shape[1]
        ids = torch.cat([prompt.expand(n, -1), completions], dim=1).to(self.device)  # (n, p + length)
        attention = torch.cat([torch.ones(n, p, dtype=torch.long), mask], dim=1).to(self.device)
        with self.injector.bound(vectors):
            # Logits at positions p-1 .. p+length-2 predict completion tokens 0 .. length-1.
            logits = self.model(
                input_ids=ids, attention_mask=attention, use_cache=False, logits_to_keep=length + 1
            ).logits[:, :-1]
        mask = mask.to(self.device, torch.float32)
        logp = torch.log_softmax(logits.float() / temperature, dim=-1)
        logp = logp.gather(-1, ids[:, p:].unsqueeze(-1)).squeeze(-1)
        return logp * mask, mask

    def completion_loss(self, vectors: torch.Tensor, explanations: list[str], batch_size: int = 16) -> float:
        """Mean per-token NLL of the SFT targets for `explanations` given `vectors` (no grad)."""
        total, count = 0.0, 0.0
        for start in range(0, len(vectors), batch_size):
            targets = [
                completion_ids(self.tokenizer, self.prompts, e, prefill=self.prefill)
                for e in explanations[start : start + batch_size]
            ]
            with torch.no_grad():
                logp, mask = self.completion_log_probs(vectors[start : start + batch_size], targets)
            total, count = total - float(logp.sum()), count + float(mask.sum())
        return total / max(count, 1.0)

    def save(self, out_dir: str | Path, meta: dict, *, merged: bool = False) -> Path:
        """Write the checkpoint `load_av` reads, atomically, with `meta` as its sidecar.

        A PEFT model saves its active adapter only (RL's frozen `ref` copy stays out), anything
        else its full weights; the sidecar's `weights` and `merged` say which. `merged` (LoRA
        only) adds full weights with the adapter merged in under `merged/`, from a copy, so
        this AV keeps training unchanged.
        """
        peft = _is_peft(self.model)
        meta = {**meta, "weights": "adapter" if peft else "full", "merged": bool(merged and peft)}
        with atomic_dir(out_dir) as tmp:
            if peft:
                pin_adapter_config(self.model)
                self.model.save_pretrained(tmp, selected_adapters=[self.model.active_adapter])
            else:
                self.model.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
            if meta["merged"]:
                with self.injector.detached():  # copy the modules, not the hooks
                    clone = copy.deepcopy(self.model)
                clone.merge_and_unload().save_pretrained(tmp / MERGED_DIR)
                self.tokenizer.save_pretrained(tmp / MERGED_DIR)
            write_sidecar(tmp, meta)
        self.meta = meta
        return Path(out_dir)


def load_av(
    checkpoint_dir: str | Path,
    device: str = "auto",
    *,
    layer: int | None = None,
    trainable: bool = False,
    meta: dict | None = None,
) -> AV:
    """Load an AV checkpoint and refuse when its sidecar disagrees with the live model/tokenizer.

    `layer`: the layer of the activations you will feed (checked against the sidecar).
    `trainable`: LoRA adapters load with gradients on (RL); otherwise they are merged into the
    base weights (a plain transformers model). Full weights are always trainable and need no
    base model, so only an adapter's base is resolved and its fingerprint checked, before any
    weights load. `meta`: a sidecar to use instead of the folder's own, e.g. one translated from a
    public format by `nla.interop` (the folder's files are the same layout).
    """
    ckpt = Path(checkpoint_dir)
    where = str(ckpt)
    meta = read_sidecar(ckpt) if meta is None else meta
    require(meta, where=where, role="av", layer=layer)
    weights = meta.get("weights")
    if weights not in WEIGHT_FILES:
        raise NLAError(f"{sidecar_path(ckpt)}: weights={weights!r} is not 'adapter' or 'full'; rebuild the checkpoint")
    expected = WEIGHT_FILES[weights]
    if not any((ckpt / name).is_file() for name in expected):
        raise NLAError(
            f"{ckpt} has no {' or '.join(expected)}: the checkpoint is incomplete; rebuild it (dvc repro av_sft)"
        )
    check_weight_files(ckpt)
    if weights == "adapter":
        base = base_model_config(meta, device)
        require(meta, where=where, fingerprint=resolve_source(base.name, base.gguf_file, base.revision).fingerprint)
        model, _, _ = load_model(base)
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, where, is_trainable=trainable)
        if not trainable:  # one matmul per projection instead of three plus an add: faster decoding
            model = model.merge_and_unload()
    else:
        model, _, _ = load_model(ModelConfig(name=where, dtype=meta.get("dtype", "auto"), device=device))
    model.train(trainable)
    return _with_injector(model, load_tokenizer(resolve_source(where)), meta, where)


def base_av(checkpoint_dir: str | Path, device: str = "auto") -> AV:
    """The untrained-AV control: the checkpoint's base model with its marker, prompt and injection, no tuning.

    What the round trip scores when the AV has learned nothing: if a trained AV does not beat
    this, its explanations come from the prompt, not from the vector.
    """
    where = str(checkpoint_dir)
    meta = read_sidecar(checkpoint_dir)
    require(meta, where=where, role="av")
    model, tokenizer, source = load_model(base_model_config(meta, device))
    require(meta, where=where, fingerprint=source.fingerprint)
    return _with_injector(model.eval(), tokenizer, meta, where)


def _with_injector(model: torch.nn.Module, tokenizer, meta: dict, where: str) -> AV:
    """`model` as an AV: the sidecar's prompt, marker (checked against `tokenizer`) and injection attached."""
    require(meta, where=where, d_model=d_model(model))
    check_layer(model, meta["layer"])
    prompts = PromptConfig(**meta["prompts"])
    inj = meta["injection"]
    injection = InjectionConfig(
        mode=inj["mode"],
        scale=inj.get("scale"),
        karvonen_block=inj["karvonen_block"],
        marker_char=meta["marker"]["char"],
    )
    marker = av_marker(tokenizer, prompts, injection, **prompt_style(meta))
    require(meta, where=where, marker=marker.to_dict())
    injector = attach_injector(model, marker, injection)
    return AV(model, tokenizer, injector, marker, meta, prompts)
