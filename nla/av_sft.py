"""The av_sft stage: fine-tune the AV on (activation vector, explanation) pairs with TRL.

    nla av-sft                      # or: dvc repro av_sft

`run_av_sft` reads the labeled av_sft rows (`nla.data.labeled_rows`), picks the injection
scale (`nla.av.injection_scale`), trains (`fit_av`) and saves with `AV.save`. Each example is
the fixed AV prompt (no loss) followed by the explanation, closing tag and EOS (loss), with
the row's vector bound to the injector inside the trainer's `compute_loss`.

A killed run resumes from the last trainer checkpoint in its work folder when the inputs and
params match (`av_resume_key`); the checkpoints are removed once the AV is saved. TRL and
datasets are imported only inside the training functions.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

import nla.distributed as distributed
from nla.av import AV, attach_injector, av_marker, av_prompt_ids, completion_ids, injection_scale
from nla.config import NLAConfig, PromptConfig
from nla.data import labeled_rows, vectors_of
from nla.errors import NLAError
from nla.injection import ActivationInjector
from nla.io import atomic_path, write_json
from nla.metrics import MSE_NORMALISATION
from nla.models import check_layer, d_model, decoder_blocks, load_model, model_autocast, resolve_source
from nla.provenance import beside, write_provenance
from nla.sidecar import make_meta, read_sidecar, sidecar_path

RESUME_FILE = "nla_resume.json"  # written last into a trainer checkpoint: it is complete and whose run it is


# ----------------------------------------------------------------------------- SFT data


def encode_examples(tokenizer, prompts: PromptConfig, prompt_ids: list[int], rows: pd.DataFrame) -> dict[str, list]:
    """Pre-tokenized SFT columns: input_ids, completion_mask (1 on the target), nla_vector."""
    input_ids, masks = [], []
    for explanation in rows.explanation:
        target = completion_ids(tokenizer, prompts, explanation)
        input_ids.append(prompt_ids + target)
        masks.append([0] * len(prompt_ids) + [1] * len(target))
    return {"input_ids": input_ids, "completion_mask": masks, "nla_vector": list(vectors_of(rows))}


class VectorCollator:
    """TRL's language-modeling collator plus an `nla_vectors` (batch, d) tensor, one vector per row."""

    def __init__(self, pad_token_id: int):
        from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

        self.base = DataCollatorForLanguageModeling(pad_token_id=pad_token_id)

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        batch = self.base([{k: v for k, v in e.items() if k != "nla_vector"} for e in examples])
        batch["nla_vectors"] = torch.tensor(np.stack([e["nla_vector"] for e in examples]), dtype=torch.float32)
        return batch


# ----------------------------------------------------------------------------- the trainer and its checkpoints


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
            # bind, not `bound`: the backward (and gradient-checkpointing recomputes) run after this returns.
            self.injector.bind(inputs.pop("nla_vectors"))
            loss, correct, n_valid = completion_loss(model, inputs, num_items_in_batch)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes  # as TRL: DDP averages the gradients over ranks
            mode = "train" if model.training else "eval"
            gather = self.accelerator.gather_for_metrics
            accuracy = gather(correct).sum() / gather(n_valid).sum().clamp(min=1)
            self._metrics[mode]["mean_token_accuracy"].append(accuracy.item())
            if mode == "train":
                self._total_train_tokens += gather(inputs["attention_mask"].sum()).sum().item()
            self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
            return (loss, None) if return_outputs else loss

        def _save_checkpoint(self, model, trial) -> None:
            if self.state.global_step >= self.state.max_steps:
                return  # the stage saves the final AV; a resume from here would even train one step too many
            super()._save_checkpoint(model, trial)
            folder = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
            distributed.barrier()  # every rank's part (its RNG state, its shards) is in the folder
            if distributed.is_main():
                write_json(folder / RESUME_FILE, {"key": self.resume_key, "step": self.state.global_step})
                clear_checkpoints(Path(self.args.output_dir), keep=folder)
            distributed.barrier()

    return AVTrainer


def completion_loss(
    model: torch.nn.Module, inputs: dict[str, torch.Tensor], num_items_in_batch: torch.Tensor | int | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy on the completion tokens only: (loss, top-1 hits, target count).

    The LM head runs only from the first completion position on (`logits_to_keep`): the shared AV prompt
    is most of each row, and the full-vocabulary logits (or TRL's chunked log-prob kernel over every
    position) cost more on a CPU than the rest of the step. The loss is the sum over the batch's
    targets divided by `num_items_in_batch` (the targets of the whole accumulated step), as TRL's.
    """
    labels = inputs["labels"]  # (batch, seq), -100 off the completion
    targets = labels != -100
    first = int(targets.int().argmax(-1)[targets.any(-1)].min()) if targets.any() else labels.shape[1] - 1
    logits = model(
        input_ids=inputs["input_ids"],
        attention_mask=inputs["attention_mask"],
        use_cache=False,
        logits_to_keep=labels.shape[1] - first + 1,  # positions first-1 .. seq-1 (right padding)
    ).logits  # (batch, seq - first + 1, vocab)
    predicted, wanted = logits[:, :-1].float(), labels[:, first:]  # position t predicts token t + 1
    loss_sum = torch.nn.functional.cross_entropy(predicted.flatten(0, 1), wanted.flatten(), reduction="sum")
    mask = wanted != -100
    n_valid = mask.sum()
    loss = loss_sum / torch.as_tensor(num_items_in_batch if num_items_in_batch is not None else n_valid).clamp(min=1)
    correct = ((predicted.argmax(-1) == wanted) & mask).sum()
    return loss, correct, n_valid


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
    digest.update(vectors_of(rows).tobytes())
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
    # bf16 weights, or fp32 weights with bf16 autocast (accelerate opens one autocast region per forward).
    bf16 = next(model.parameters()).dtype == torch.bfloat16 or model_autocast(model, cfg.model.autocast) is not None
    world = distributed.world_size()
    if sft.batch_size % world:  # the global batch is kept: each of the N processes takes batch_size / N rows
        raise NLAError(f"av_sft.batch_size={sft.batch_size} does not divide over {world} processes; make it a multiple")
    fsdp = world > 1 and cfg.distributed.strategy == "fsdp"  # TRL's trainer shards through accelerate's FSDP2
    if fsdp and device.type != "cuda":
        raise NLAError(
            "av_sft with distributed.strategy=fsdp needs GPUs (accelerate shards CUDA launches only); use ddp"
        )
    if fsdp and sft.merge:
        raise NLAError("av_sft.merge copies the whole model, which a sharded run never holds; set it false under fsdp")
    block = type(decoder_blocks(model)[0]).__name__
    args = SFTConfig(
        output_dir=str(work_dir),
        per_device_train_batch_size=sft.batch_size // world,
        fsdp=fsdp,
        ddp_find_unused_parameters=False,  # every trainable weight (the adapter) takes part in every step
        fsdp_config={"version": 2, "transformer_layer_cls_to_wrap": [block], "reshard_after_forward": True}
        if fsdp
        else None,
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
    # Rank 0 picks the checkpoint (and removes the others); every rank resumes from the same one.
    resume = distributed.main_computes(lambda: resume_checkpoint(Path(work_dir), resume_key) if checkpoints else None)
    first = json.loads((resume / RESUME_FILE).read_text())["step"] if resume else 0
    if resume:
        tqdm.write(f"av_sft: resumed at step {first} from {resume}")
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    seconds = time.perf_counter() - start
    injector.bind(None)  # the last batch's vectors, bound by compute_loss
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


def headline(metrics: dict) -> dict[str, float]:
    """What `dvc metrics show` lists for av_sft: the loss at the end (mean of the last tenth of the steps).

    One number per training stage keeps the whole `dvc metrics show` table within 160 columns; the start of
    the curve is in the plots and the sidecar. Metric names are unique across the pipeline's metrics files,
    so `dvc exp show` names them without a path.
    """
    return {"av_loss": metrics["loss_last_10pct"]}


def write_loss_csv(path: str | Path, log: list[dict]) -> None:
    """The per-step curve for `dvc plots`: step, loss, learning_rate, mean_token_accuracy."""
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


# ----------------------------------------------------------------------------- the stage


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
    provenance_path: str | Path | None = None,
) -> dict:
    """Train the AV on the av_sft rows and save checkpoint + sidecar; returns the training metrics.

    A killed run resumes from its last trainer checkpoint in `work_dir` (every
    `av_sft.save_steps` steps; removed once the AV is saved) when the inputs and params match.
    The headline metrics (JSON, for `dvc metrics`) go to `metrics_path`, the per-step loss (CSV,
    for `dvc plots`) to `plots_path` and the timings to `provenance_path`; they default to files
    beside `out_dir`. The sidecar's `training` holds every metric returned here.
    """
    out_dir = Path(out_dir)
    rows = labeled_rows(activations_dir, splits_dir, labels_dir, ["av_sft"], layer=cfg.model.layer)
    act_meta = read_sidecar(activations_dir)
    labels_meta = read_sidecar(labels_dir) if sidecar_path(labels_dir).is_file() else {}
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
        "injection_scale": scale,
        **loss_summary(log),
    }
    meta = make_meta(
        "nla_model",
        "av_sft",
        role="av",
        base_model=cfg.model.name,
        base_model_gguf_file=cfg.model.gguf_file,
        base_model_revision=cfg.model.revision,
        base_model_fingerprint=stats["fingerprint"],
        dtype=cfg.model.dtype,
        autocast=cfg.model.autocast,  # trained with bf16 matmuls where 'auto' resolved to them
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
        training={**cfg.av_sft.model_dump(), **metrics},
        parents=[str(activations_dir), str(splits_dir), str(labels_dir)] + ([str(sweep_path)] if sweep_path else []),
    )
    with distributed.full_weights(av.model, av.model):  # every rank gathers (when sharded), rank 0 writes
        if distributed.is_main():
            av.save(out_dir, meta, merged=cfg.av_sft.merge)
            write_json(metrics_path or out_dir.with_name(out_dir.name + "_metrics.json"), headline(metrics))
            write_loss_csv(plots_path or out_dir.with_name(out_dir.name + "_loss.csv"), log)
            write_provenance(
                provenance_path or beside(out_dir),
                "av_sft",
                train_seconds=round(stats["seconds"], 1),
                train_tokens_per_s=round(stats["tokens_per_s"], 1),
            )
            clear_checkpoints(Path(work_dir))  # the AV is saved: a rerun starts over, as `dvc repro` expects
            shutil.rmtree(work_dir, ignore_errors=True)  # and TRL's model card, written beside the checkpoints
    distributed.barrier()
    return metrics
