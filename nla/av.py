"""The activation verbalizer (AV): prompt, marker, SFT with TRL, loading and generation.

The AV prompt is the chat template's user turn (`prompts.av_user` with the marker in the
vector slot) followed by the generation prompt and the prefilled answer opener, so the AV
writes the explanation directly and closes it with `prompts.av_answer_close`:

    <chat user turn: "... <concept>{marker}</concept> ...">  <explanation>  EXPLANATION </explanation> <eos>
    '----------------------- prompt (no loss) -------------------------'  '------ completion (loss) ------'

Every row's prompt is the same token sequence, so batches need no padding on the prompt
side and completions all start at the same index. The activation vector of each row is
written at the marker by `nla.injection.ActivationInjector` (bound per batch), in SFT
(`AVTrainer.compute_loss`), in generation (prefill only) and in log-prob passes.

Checkpoint layout (`run_av_sft`): the folder itself loads with PEFT/transformers, i.e.
adapter files (LoRA) or full weights at its root, the tokenizer beside them, optional
merged weights in `merged/`, and `nla_meta.yaml`. TRL and datasets are imported only
inside the training functions, so loading and generation work where they are missing.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from nla.config import InjectionConfig, ModelConfig, NLAConfig, NLAError, PromptConfig
from nla.extract import load_rows
from nla.injection import ActivationInjector, Marker, anchor_marker, choose_marker_char
from nla.io import atomic_dir, read_table, write_json
from nla.models import check_layer, d_model, load_model, load_tokenizer, resolve_source
from nla.sampling import Decoder
from nla.sidecar import check_compatible, make_meta, read_sidecar, sidecar_path, write_sidecar

LABELS_FILE = "explanations.parquet"
MERGED_DIR = "merged"
RESUME_FILE = "nla_resume.json"  # written last into a trainer checkpoint: it is complete and whose run it is
SHUFFLE_SEED = 1234
MSE_NORMALISATION = (
    "unit vectors: u = v/||v||, mse_nrm = mean ||u_hat - u||^2; "
    "the AV sees only the direction in 'replace' (alpha * u) and 'karvonen' (||h|| * u)"
)


# ----------------------------------------------------------------------------- prompt and marker


def av_prompt(tokenizer, prompts: PromptConfig, marker_char: str) -> str:
    """The full AV prompt text (chat template applied, answer opener prefilled)."""
    messages = [{"role": "user", "content": prompts.av_user.format(marker=marker_char)}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return text + prompts.av_answer_open


def av_prompt_ids(tokenizer, prompts: PromptConfig, marker_char: str) -> list[int]:
    """Token ids of the AV prompt: the template already holds any BOS, so no special tokens are added."""
    return tokenizer(av_prompt(tokenizer, prompts, marker_char), add_special_tokens=False)["input_ids"]


def av_marker(tokenizer, prompts: PromptConfig, injection: InjectionConfig) -> Marker:
    """Choose the marker for this tokenizer and anchor it in the canonical AV prompt."""
    char = choose_marker_char(tokenizer, injection.marker_ranges, injection.marker_char)
    return anchor_marker(tokenizer, char, av_prompt_ids(tokenizer, prompts, char))


def attach_injector(
    model, marker: Marker, injection: InjectionConfig, scale: float | None = None
) -> ActivationInjector:
    """Hook `model` so every forward writes the bound vectors at anchored marker sites."""
    return ActivationInjector(
        model, marker, injection.mode, scale if scale is not None else injection.scale, injection.karvonen_block
    )


def completion_ids(tokenizer, prompts: PromptConfig, explanation: str) -> list[int]:
    """The SFT target: explanation, closing tag, end of sequence."""
    ids = tokenizer(explanation.strip() + prompts.av_answer_close, add_special_tokens=False)["input_ids"]
    return ids + [tokenizer.eos_token_id]


def parse_completion(text: str, prompts: PromptConfig) -> tuple[str, bool]:
    """(clean explanation, closed): the text before the closing tag, tags stripped, whitespace collapsed."""
    head, sep, _ = text.partition(prompts.av_answer_close)
    head = head.replace(prompts.av_answer_open, " ")
    return " ".join(head.split()), bool(sep)


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


# ----------------------------------------------------------------------------- the loaded AV


@dataclass(frozen=True)
class Explanation:
    text: str  # parsed and cleaned, without tags
    token_ids: tuple[int, ...]  # the completion as generated, up to and including EOS
    closed: bool  # the closing tag came before the token cap


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

    def __init__(self, peft_model: torch.nn.Module, injector: ActivationInjector):
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
        return av_prompt_ids(self.tokenizer, self.prompts, self.marker.char)

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

        Decoding runs through `nla.sampling.sample` (static KV cache; CUDA graphs on GPU), which
        gives the same tokens as `model.generate` under greedy decoding. The injector is bound for
        the prefill only: decode steps carry no marker site.
        """
        vectors = self._check(vectors)
        prompt = torch.tensor(self.prompt_ids, device=self.device)
        eos = self.tokenizer.eos_token_id
        injector, decoder = self._decoding()
        out: list[Explanation] = []
        starts = range(0, len(vectors), batch_size)
        for start in tqdm(starts, desc="av generate", unit="batch", disable=len(starts) < 2):
            batch = vectors[start : start + batch_size]
            # Identical prompts: no padding is needed; decode appends on the right.
            ids = prompt.expand(len(batch), -1)
            injector.bind(batch)
            try:
                new = decoder.sample(
                    ids, torch.ones_like(ids), max_new_tokens, temperature, {eos}, pad_id=self.tokenizer.pad_token_id
                )
            finally:
                injector.bind(None)
            seqs = torch.cat([ids, new], dim=1)
            for row in seqs[:, len(prompt) :].tolist():
                row = row[: row.index(eos) + 1] if eos in row else row
                text, closed = parse_completion(self.tokenizer.decode(row, skip_special_tokens=True), self.prompts)
                out.append(Explanation(text, tuple(row), closed))
        return out

    def _decoding(self) -> tuple[ActivationInjector, Decoder]:
        """What generation runs on: the model itself, or for a LoRA AV (in training) its merged copy, synced."""
        from peft import PeftModel

        if isinstance(self.model, PeftModel):  # inference loads are merged already (`load_av`)
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
        """(log_probs, mask), both (n, max_len): log p(token_t | injected prompt, tokens_<t).

        Completions are right-padded (mask 0, log-prob 0). Gradients flow unless the caller
        uses no_grad; logits are divided by `temperature` (1.0 = the sampling policy at T=1).
        """
        vectors = self._check(vectors)
        if len(completion_ids) != len(vectors):
            raise NLAError(f"{len(completion_ids)} completions for {len(vectors)} vectors; pass one per vector")
        prompt = self.prompt_ids
        n, p, length = len(vectors), len(prompt), max(1, max((len(c) for c in completion_ids), default=1))
        ids = torch.full((n, p + length), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros(n, length)
        ids[:, :p] = torch.tensor(prompt)
        for i, c in enumerate(completion_ids):
            ids[i, p : p + len(c)] = torch.tensor(c, dtype=torch.long)
            mask[i, : len(c)] = 1
        attention = torch.cat([torch.ones(n, p), mask], dim=1).long()
        ids, attention, mask = ids.to(self.device), attention.to(self.device), mask.to(self.device)
        self.injector.bind(vectors)
        try:
            # Logits at positions p-1 .. p+length-2 predict completion tokens 0 .. length-1.
            logits = self.model(
                input_ids=ids, attention_mask=attention, use_cache=False, logits_to_keep=length + 1
            ).logits[:, :-1]
        finally:
            self.injector.bind(None)
        logp = torch.log_softmax(logits.float() / temperature, dim=-1)
        logp = logp.gather(-1, ids[:, p:].unsqueeze(-1)).squeeze(-1)
        return logp * mask, mask

    def completion_loss(self, vectors: torch.Tensor, explanations: list[str], batch_size: int = 16) -> float:
        """Mean per-token NLL of the SFT targets for `explanations` given `vectors` (no grad)."""
        total, count = 0.0, 0.0
        for start in range(0, len(vectors), batch_size):
            targets = [
                completion_ids(self.tokenizer, self.prompts, e) for e in explanations[start : start + batch_size]
            ]
            with torch.no_grad():
                logp, mask = self.completion_log_probs(vectors[start : start + batch_size], targets)
            total, count = total - float(logp.sum()), count + float(mask.sum())
        return total / max(count, 1.0)


WEIGHT_FILES = {
    "adapter": ("adapter_model.safetensors",),
    "full": ("model.safetensors", "model.safetensors.index.json"),
}


def load_av(
    checkpoint_dir: str | Path, device: str = "auto", *, layer: int | None = None, trainable: bool = False
) -> AV:
    """Load an AV checkpoint and refuse when its sidecar disagrees with the live model/tokenizer.

    `layer`: the layer of the activations you will feed (checked against the sidecar).
    `trainable`: LoRA adapters load with gradients on (RL); otherwise they are merged into the
    base weights (a plain transformers model). Full weights are always trainable.
    """
    ckpt = Path(checkpoint_dir)
    meta = read_sidecar(ckpt)
    if meta["kind"] != "nla_model" or meta.get("role") != "av":
        raise NLAError(
            f"{sidecar_path(ckpt)} describes a {meta['kind']}/{meta.get('role')}, not an AV checkpoint; "
            "point at the av_sft or rl AV folder"
        )
    check_compatible(meta, where=str(ckpt), layer=layer)
    weights = meta.get("weights")
    expected = WEIGHT_FILES.get(weights, ())
    if expected and not any((ckpt / name).is_file() for name in expected):
        raise NLAError(
            f"{ckpt} has no {' or '.join(expected)}: the checkpoint is incomplete; rebuild it (dvc repro av_sft)"
        )
    if weights == "adapter":
        model_cfg = ModelConfig(
            name=meta["base_model"],
            gguf_file=meta.get("base_model_gguf_file"),
            revision=meta.get("base_model_revision"),
            dtype=meta.get("dtype", "auto"),
            device=device,
        )
        model, _, source = load_model(model_cfg)
        if source.fingerprint != meta.get("base_model_fingerprint"):
            raise NLAError(
                f"{ckpt}: base model fingerprint {source.fingerprint} differs from the sidecar's "
                f"{meta.get('base_model_fingerprint')}; install the base model the adapter was trained on"
            )
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(ckpt), is_trainable=trainable)
        if not trainable:  # one matmul per projection instead of three plus an add: faster decoding
            model = model.merge_and_unload()
    elif weights == "full":
        model, _, _ = load_model(ModelConfig(name=str(ckpt), dtype=meta.get("dtype", "auto"), device=device))
    else:
        raise NLAError(f"{sidecar_path(ckpt)}: weights={weights!r} is not 'adapter' or 'full'; rebuild the checkpoint")
    model.train(trainable)
    tokenizer = load_tokenizer(resolve_source(str(ckpt)))
    live_d = d_model(model)
    check_compatible(meta, where=str(ckpt), d_model=live_d)
    check_layer(model, meta["layer"])
    prompts = PromptConfig(**meta["prompts"])
    inj = meta["injection"]
    injection = InjectionConfig(
        mode=inj["mode"],
        scale=inj.get("scale"),
        karvonen_block=inj["karvonen_block"],
        marker_char=meta["marker"]["char"],
    )
    marker = av_marker(tokenizer, prompts, injection)
    check_compatible(meta, where=str(ckpt), marker=marker.to_dict())
    injector = attach_injector(model, marker, injection)
    return AV(model, tokenizer, injector, marker, meta, prompts)


# ----------------------------------------------------------------------------- SFT data


def load_labeled_rows(
    activations_dir: str | Path, splits_dir: str | Path, labels_dir: str | Path, split: str, layer: int | None = None
) -> tuple[pd.DataFrame, dict, dict]:
    """Rows of `split` joined with their explanations, plus the activations and labels sidecars."""
    act_meta = read_sidecar(activations_dir)
    labels_path = Path(labels_dir) / LABELS_FILE
    if not labels_path.is_file():
        raise NLAError(f"{labels_path} not found; run the label stage first (`nla label`)")
    labels_meta = read_sidecar(labels_dir) if sidecar_path(labels_dir).is_file() else {}
    if labels_meta:
        check_compatible(labels_meta, where=str(labels_dir), d_model=act_meta["d_model"], layer=act_meta["layer"])
    rows = load_rows(activations_dir, splits_dir, [split], layer=layer)
    labels = read_table(labels_path, columns=["row_id", "explanation"])
    rows = rows.merge(labels, on="row_id", how="inner", validate="one_to_one")
    rows = rows[rows.explanation.str.strip().str.len() > 0].reset_index(drop=True)
    if rows.empty:
        raise NLAError(
            f"no labeled rows in split {split!r}: {labels_path} shares no row_id with it; "
            "re-run the label stage on the current split"
        )
    return rows, act_meta, labels_meta


def encode_examples(tokenizer, prompts: PromptConfig, prompt_ids: list[int], rows: pd.DataFrame) -> dict[str, list]:
    """Pre-tokenized SFT columns: input_ids, completion_mask (1 on the target), nla_vector."""
    input_ids, masks = [], []
    for explanation in rows.explanation:
        target = completion_ids(tokenizer, prompts, explanation)
        input_ids.append(prompt_ids + target)
        masks.append([0] * len(prompt_ids) + [1] * len(target))
    vectors = np.stack(rows.vector.to_numpy()).astype(np.float32)
    return {"input_ids": input_ids, "completion_mask": masks, "nla_vector": list(vectors)}


class VectorCollator:
    """TRL's language-modeling collator plus an `nla_vectors` (batch, d) tensor, one vector per row."""

    def __init__(self, pad_token_id: int):
        from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

        self.base = DataCollatorForLanguageModeling(pad_token_id=pad_token_id)

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        batch = self.base([{k: v for k, v in e.items() if k != "nla_vector"} for e in examples])
        batch["nla_vectors"] = torch.tensor(np.stack([e["nla_vector"] for e in examples]), dtype=torch.float32)
        return batch


def av_trainer_class():
    """`SFTTrainer` whose compute_loss binds the batch's vectors to the injector before the forward.

    Its checkpoints are the Trainer's own (weights, optimizer, scheduler, RNG states, log
    history) plus `RESUME_FILE` naming the run: HF writes `checkpoint-N` in place, so only a
    folder where that file (renamed in, after everything else) exists is whole. Older
    checkpoints are removed only then. Built lazily because TRL is absent on the GPU machine,
    where only loading/generation runs.
    """
    from trl import SFTTrainer

    class AVTrainer(SFTTrainer):
        def __init__(self, *args, injector: ActivationInjector, resume_key: str = "", **kwargs):
            super().__init__(*args, **kwargs)
            self.injector = injector
            self.resume_key = resume_key

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            self.injector.bind(inputs.pop("nla_vectors"))
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )

        def _save_checkpoint(self, model, trial) -> None:
            if self.state.global_step >= self.state.max_steps:
                return  # the stage saves the final AV; a resume from here would even train one step too many
            super()._save_checkpoint(model, trial)
            folder = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
            write_json(folder / RESUME_FILE, {"key": self.resume_key, "step": self.state.global_step})
            clear_checkpoints(Path(self.args.output_dir), keep=folder)

    return AVTrainer


def clear_checkpoints(work_dir: Path, keep: Path | None = None) -> None:
    """Remove the trainer checkpoints in `work_dir` other than `keep`, each resume file first.

    A kill midway through removing a folder then leaves one that is never resumed from.
    """
    for folder in work_dir.glob("checkpoint-*"):
        if folder != keep:
            (folder / RESUME_FILE).unlink(missing_ok=True)
            shutil.rmtree(folder, ignore_errors=True)


def resume_checkpoint(work_dir: Path, key: str) -> Path | None:
    """The newest complete checkpoint of the run `key` in `work_dir`, the others removed; None: start over.

    Removing the rest at the start also means a half-written folder is never written into again
    while it still holds an old `RESUME_FILE`.
    """
    found, step = None, -1
    for folder in work_dir.glob("checkpoint-*"):
        marker = folder / RESUME_FILE
        info = json.loads(marker.read_text()) if marker.is_file() else {}
        if info.get("key") == key and info["step"] > step:
            found, step = folder, info["step"]
    if found is None and any(work_dir.glob("checkpoint-*")):
        tqdm.write(f"av_sft: ignoring the checkpoints in {work_dir} (incomplete, or other inputs or params)")
    clear_checkpoints(work_dir, keep=found)
    return found


def av_resume_key(cfg: NLAConfig, source_fingerprint: str, scale: float | None, rows: pd.DataFrame) -> str:
    """Identity of an av_sft run for resuming: its params, the model, the scale and the exact training rows."""
    blob = json.dumps(
        [
            cfg.av_sft.model_dump(),
            cfg.model.model_dump(),
            cfg.prompts.model_dump(),
            cfg.injection.model_dump(),
            source_fingerprint,
            scale,
            rows.row_id.tolist(),
            rows.explanation.tolist(),
        ],
        sort_keys=True,
        default=str,
    )
    digest = hashlib.sha256(blob.encode())
    digest.update(np.stack(rows.vector.to_numpy()).astype(np.float32).tobytes())
    return digest.hexdigest()[:16]


# ----------------------------------------------------------------------------- SFT


def fit_av(
    cfg: NLAConfig,
    rows: pd.DataFrame,
    scale: float | None,
    work_dir: str | Path,
    max_steps: int | None = None,
    resume_key: str | None = None,
) -> tuple[AV, list[dict], dict]:
    """Fine-tune a fresh AV on `rows` (vector, explanation); returns (AV, log history, train stats).

    With `resume_key`, a trainer checkpoint every `av_sft.save_steps` steps in `work_dir` lets a
    killed run continue exactly where it stopped when rerun with the same key; the log history
    then holds every step, the ones before the kill included.
    """
    from datasets import Dataset
    from trl import SFTConfig

    sft = cfg.av_sft
    model, tokenizer, source = load_model(cfg.model, for_training=True)
    check_layer(model, cfg.model.layer)
    marker = av_marker(tokenizer, cfg.prompts, cfg.injection)
    injector = attach_injector(model, marker, cfg.injection, scale)
    if sft.lora.enabled:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(sft.seed)  # the LoRA init: the Trainer seeds only later, a rerun must start from the same A
        model = get_peft_model(
            model,
            LoraConfig(
                r=sft.lora.r,
                lora_alpha=sft.lora.alpha,
                lora_dropout=sft.lora.dropout,
                target_modules=list(sft.lora.target_modules),
                task_type="CAUSAL_LM",
            ),
        )
    prompt_ids = av_prompt_ids(tokenizer, cfg.prompts, marker.char)
    if sft.max_length <= len(prompt_ids) + 4:
        raise NLAError(
            f"av_sft.max_length={sft.max_length} leaves no room after the {len(prompt_ids)}-token AV prompt; raise it"
        )
    dataset = Dataset.from_dict(encode_examples(tokenizer, cfg.prompts, prompt_ids, rows))
    checkpoints = resume_key is not None and sft.save_steps > 0
    device = next(model.parameters()).device
    bf16 = next(model.parameters()).dtype == torch.bfloat16
    args = SFTConfig(
        output_dir=str(work_dir),
        per_device_train_batch_size=sft.batch_size,
        gradient_accumulation_steps=sft.grad_accum,
        learning_rate=sft.learning_rate,
        num_train_epochs=sft.epochs,
        max_steps=max_steps if max_steps is not None else sft.max_steps,
        warmup_steps=sft.warmup_ratio,
        lr_scheduler_type="linear",
        logging_steps=1,
        save_strategy="steps" if checkpoints else "no",
        save_steps=max(sft.save_steps, 1),
        report_to="none",
        seed=sft.seed,
        max_length=sft.max_length,
        completion_only_loss=True,
        remove_unused_columns=False,
        gradient_checkpointing=sft.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        use_cpu=device.type == "cpu",
        bf16=bf16,
        dataloader_num_workers=0,
    )
    trainer = av_trainer_class()(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        data_collator=VectorCollator(tokenizer.pad_token_id),
        injector=injector,
        resume_key=resume_key or "",
    )
    resume = resume_checkpoint(Path(work_dir), resume_key) if checkpoints else None
    first = json.loads((resume / RESUME_FILE).read_text())["step"] if resume else 0
    if resume:
        tqdm.write(f"av_sft: resumed at step {first} from {resume}")
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    seconds = time.perf_counter() - start
    injector.bind(None)
    model.eval()
    log = [e for e in trainer.state.log_history if "loss" in e]  # restored from the checkpoint on resume
    new = [e for e in log if e["step"] > first]  # TRL counts the non-pad tokens trained on in this process only
    n_tokens = float(new[-1].get("num_tokens", 0.0)) if new else 0.0
    stats = {
        "seconds": seconds,
        "steps": trainer.state.global_step,
        "epochs": float(trainer.state.epoch or 0.0),
        "train_loss": float(np.mean([e["loss"] for e in log])) if log else float("nan"),  # all steps, resumed or not
        "tokens_per_s": n_tokens / max(seconds, 1e-9),
        "rows": len(rows),
        "fingerprint": source.fingerprint,
    }
    meta = {"d_model": d_model(model), "layer": cfg.model.layer, "base_model": cfg.model.name}
    av = AV(model, tokenizer, injector, marker, meta, cfg.prompts)
    return av, log, stats


def loss_summary(log: list[dict]) -> dict[str, float]:
    """First/last loss and the means of the first and last tenth of the steps (noise-robust endpoints)."""
    losses = [float(e["loss"]) for e in log]
    if not losses:
        return {}
    k = max(1, len(losses) // 10)
    return {
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "loss_first_10pct": float(np.mean(losses[:k])),
        "loss_last_10pct": float(np.mean(losses[-k:])),
    }


def run_av_sft(
    cfg: NLAConfig,
    activations_dir: str | Path,
    splits_dir: str | Path,
    labels_dir: str | Path,
    out_dir: str | Path,
    *,
    metrics_path: str | Path | None = None,
    plots_path: str | Path | None = None,
    sweep_path: str | Path | None = None,
    work_dir: str | Path = "data/work/av_sft",
) -> dict:
    """Train the AV on the av_sft rows and save checkpoint + sidecar; returns the training metrics.

    A killed run resumes from its last trainer checkpoint in `work_dir` (every
    `av_sft.save_steps` steps; removed once the AV is saved) when the inputs and params match.
    Metrics (JSON, for `dvc metrics`) go to `metrics_path` and the per-step loss (CSV, for
    `dvc plots`) to `plots_path`; both default to files inside `out_dir`.
    """
    out_dir = Path(out_dir)
    rows, act_meta, labels_meta = load_labeled_rows(
        activations_dir, splits_dir, labels_dir, "av_sft", layer=cfg.model.layer
    )
    scale, scale_source = injection_scale(cfg.injection, act_meta, sweep_path)
    fingerprint = resolve_source(cfg.model.name, cfg.model.gguf_file, cfg.model.revision).fingerprint
    if act_meta.get("base_model_fingerprint") not in (None, fingerprint):
        raise NLAError(
            f"{activations_dir} was extracted from {act_meta['base_model_fingerprint']} but the AV base is "
            f"{fingerprint}; use the same model.name for extract and av_sft"
        )
    resume_key = av_resume_key(cfg, fingerprint, scale, rows)
    av, log, stats = fit_av(cfg, rows, scale, work_dir, resume_key=resume_key)
    metrics = {
        "rows": len(rows),
        "steps": stats["steps"],
        "epochs": stats["epochs"],
        "train_loss": stats["train_loss"],
        "train_seconds": round(stats["seconds"], 1),
        "train_tokens_per_s": round(stats["tokens_per_s"], 1),
        "injection_scale": scale,
        **loss_summary(log),
    }
    lora = cfg.av_sft.lora.enabled
    meta = make_meta(
        "nla_model",
        "av_sft",
        role="av",
        base_model=cfg.model.name,
        base_model_gguf_file=cfg.model.gguf_file,
        base_model_revision=cfg.model.revision,
        base_model_fingerprint=stats["fingerprint"],
        dtype=cfg.model.dtype,
        d_model=av.meta["d_model"],
        layer=cfg.model.layer,
        n_layers=int(av.model.config.num_hidden_layers),
        marker=av.marker.to_dict(),
        injection={
            "mode": cfg.injection.mode,
            "scale": scale,
            "scale_source": scale_source,
            "karvonen_block": cfg.injection.karvonen_block,
            "site": "input of block 0 (embedding output)"
            if cfg.injection.mode == "replace"
            else f"output of block {cfg.injection.karvonen_block}",
        },
        mse_normalisation=MSE_NORMALISATION,
        prompts=cfg.prompts.model_dump(),
        labeler=labels_meta.get("labeler", labels_meta.get("label")),
        weights="adapter" if lora else "full",
        merged=bool(cfg.av_sft.merge and lora),
        training={**cfg.av_sft.model_dump(), **metrics},
        parents=[str(activations_dir), str(splits_dir), str(labels_dir)] + ([str(sweep_path)] if sweep_path else []),
    )
    with atomic_dir(out_dir) as tmp:
        av.model.save_pretrained(tmp)
        av.tokenizer.save_pretrained(tmp)
        if lora and cfg.av_sft.merge:
            merged = av.model.merge_and_unload()
            merged.save_pretrained(tmp / MERGED_DIR)
            av.tokenizer.save_pretrained(tmp / MERGED_DIR)
        write_sidecar(tmp, meta)
    write_json(metrics_path or out_dir.with_name(out_dir.name + "_metrics.json"), metrics)
    write_loss_csv(plots_path or out_dir.with_name(out_dir.name + "_loss.csv"), log)
    clear_checkpoints(Path(work_dir))  # the AV is saved: a rerun starts over, as `dvc repro` expects
    shutil.rmtree(work_dir, ignore_errors=True)  # and TRL's model card, written beside the checkpoints
    return metrics


def write_loss_csv(path: str | Path, log: list[dict]) -> None:
    from nla.io import atomic_path

    frame = pd.DataFrame(
        [
            {
                "step": e["step"],
                "loss": e["loss"],
                "learning_rate": e.get("learning_rate"),
                "mean_token_accuracy": e.get("mean_token_accuracy"),
            }
            for e in log
        ]
    )
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


# ----------------------------------------------------------------------------- α sweep


def default_alpha_grid(activations_meta: dict) -> list[float]:
    """Four decades-spaced α around the 75th-percentile norm (the embedding scale sits far below it)."""
    q75 = float(activations_meta["norm_quantiles"]["0.75"])
    return [round(q75 * f, 3) for f in (1 / 64, 1 / 8, 1 / 2, 1.0)]


def heldout_split(rows: pd.DataFrame, n_eval: int, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Hold out whole documents (about `n_eval` rows) so the gap is measured on unseen text."""
    docs = np.random.default_rng(seed).permutation(sorted(rows.doc_id.unique()))
    held, count = [], 0
    for doc in docs:
        if count >= n_eval:
            break
        held.append(doc)
        count += int((rows.doc_id == doc).sum())
    mask = rows.doc_id.isin(held)
    return rows[~mask].reset_index(drop=True), rows[mask].reset_index(drop=True)


def run_sweep_alpha(
    cfg: NLAConfig,
    activations_dir: str | Path,
    splits_dir: str | Path,
    labels_dir: str | Path,
    out_path: str | Path,
    *,
    work_dir: str | Path = "data/work/sweep_alpha",
) -> dict:
    """Short SFT per α; pick the α whose held-out loss gap (shuffled − correct pairing) is largest."""
    if cfg.injection.mode != "replace":
        raise NLAError("the α sweep applies to injection.mode 'replace' only; 'karvonen' has no scale")
    rows, act_meta, _ = load_labeled_rows(activations_dir, splits_dir, labels_dir, "av_sft", layer=cfg.model.layer)
    alphas = list(cfg.av_sft.alpha_sweep) or default_alpha_grid(act_meta)
    train, held = heldout_split(rows, cfg.av_sft.sweep_eval_rows, cfg.av_sft.seed)
    if len(held) < 2 or train.empty:
        raise NLAError(f"too few av_sft rows ({len(rows)}) for an α sweep; label more rows or skip the sweep")
    vectors = torch.tensor(np.stack(held.vector.to_numpy()), dtype=torch.float32)
    shuffled = vectors[torch.roll(torch.arange(len(held)), 1)]  # every row gets another row's vector
    explanations = held.explanation.tolist()
    table = []
    for alpha in tqdm(alphas, desc="sweep α", unit="α"):
        sweep_cfg = cfg.model_copy(deep=True)
        sweep_cfg.injection.scale = float(alpha)
        av, log, _ = fit_av(
            sweep_cfg, train, float(alpha), Path(work_dir) / f"alpha-{alpha:g}", max_steps=cfg.av_sft.sweep_steps
        )
        correct, wrong = av.completion_loss(vectors, explanations), av.completion_loss(shuffled, explanations)
        table.append(
            {
                "alpha": float(alpha),
                "loss_correct": correct,
                "loss_shuffled": wrong,
                "gap": wrong - correct,
                "train_loss_last": float(log[-1]["loss"]) if log else float("nan"),
            }
        )
        del av
    best = max(table, key=lambda r: r["gap"])
    result = {
        "alpha": best["alpha"],
        "table": table,
        "steps_per_alpha": cfg.av_sft.sweep_steps,
        "train_rows": len(train),
        "heldout_rows": len(held),
        "norm_quantiles": act_meta.get("norm_quantiles"),
        "criterion": "max(loss_shuffled - loss_correct)",
    }
    write_json(out_path, result)
    return result
