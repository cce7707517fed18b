"""RL: GRPO-style joint training of the AV and AR on round-trip reconstruction.

One step (docs/design.md, "RL objective"):

1. sample ``prompts_per_step`` activations ``v`` from the rl split;
2. the AV samples ``G = group_size`` explanations per activation (temperature ``T``), the
   vector injected at the marker in generation and in every log-prob pass below;
3. reward ``r = −mse_nrm(AR(text), v)`` (or ``−log mse_nrm``); malformed output (no closing
   tag, or empty) gets ``malformed_reward``; hitting the length cap costs ``length_cap_penalty``
   more; optionally ``per_token_penalty · n_tokens``;
4. group-normalised advantages ``A = (r − mean_g r) / (std_g r + eps)``;
5. per token, with ``ρ = π/π_old`` and the k3 estimator of KL(π ‖ π_ref)::

       loss = −min(ρ·A, clip(ρ, 1−ε, 1+ε)·A) + β · (exp(ℓ_ref − ℓ) − (ℓ_ref − ℓ) − 1)

   averaged over all completion tokens of the batch (token-level mean, as in DAPO, so long
   and short explanations weigh each token alike). ``π_old`` is the sampling policy; with
   one update per batch ``ρ = 1`` in value but its gradient is the policy gradient, and the
   clip math stays general. ``π_ref`` is the **frozen SFT AV**: with LoRA a second, frozen
   copy of the SFT adapter loaded into the same model (``disable_adapter`` would give the
   bare base model, which is the wrong reference); with full fine-tuning a second frozen model;
6. one AR regression step on this step's explanations (texts only: no gradient reaches the AV).

Why an own loop and not TRL's GRPOTrainer: the AV needs one activation vector bound per row
in generation and in every log-prob pass (policy and reference). GRPOTrainer (trl 1.16)
forwards extra per-row model inputs only for vision-language models (``pixel_values`` and
friends in ``forward_kwargs``); for text models it builds ``{"input_ids", "attention_mask"}``
itself, shuffles and re-chunks the generation batch (``shuffle_sequence_dict``,
``steps_per_generation``, ``_get_per_token_logps_and_entropies`` batches) and computes the
reference pass internally, so a vector bound from outside cannot be kept aligned with its
rows without overriding private methods. Its rewards also cannot train a second model (the
AR) in the same step. The loop here is short and keeps every term of the objective visible.

Resume: every ``checkpoint_every`` steps the trainable weights of AV and AR, both optimizer
states, all RNG states, the step and the logs go atomically to ``work_dir``; a rerun with
the same inputs and params continues from there, bit for bit (see `train_rl`).

With ``temperature`` T ≠ 1 every log-prob (policy, old, reference) is that of the tempered
distribution softmax(logits/T) the samples were drawn from, so ratio and KL stay consistent.
"""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

import nla.distributed as distributed
from nla.ar import AR, load_ar
from nla.av import AV, load_av
from nla.config import PATHS, NLAConfig, RLConfig
from nla.data import load_rows, vectors_of
from nla.errors import NLAError
from nla.grpo import clipped_objective, duplicate_share, group_advantages, shaped_rewards
from nla.io import atomic_dir, atomic_path, write_json
from nla.metrics import fve_nrm, mse_nrm, unit
from nla.models import autocast, decoder_blocks, model_autocast
from nla.provenance import beside, write_provenance
from nla.sidecar import make_meta

CHECKPOINT = "checkpoint"
STATE_FILE = "state.pt"
REF_ADAPTER = "ref"
LOG_FILE = "rl_log.csv"
EVAL_LOG_FILE = "rl_eval.csv"
METRICS_FILE = "rl_metrics.json"
LOG_FIELDS = ["step", "reward_mean", "reward_std", "mse_mean", "fve_batch", "kl", "clip_frac", "len_mean"]
LOG_FIELDS += ["capped_frac", "malformed_frac", "marker_echo_frac", "distinct_frac", "zero_adv_groups", "entropy"]
LOG_FIELDS += ["skipped_updates", "ar_loss", "loss"]  # the log's timings go to nla.provenance
EVAL_FIELDS = ["step", "fve_heldout", "mse_heldout", "len_mean", "malformed_frac"]


# ----------------------------------------------------------------------------- advantages over the launch


def batch_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """`group_advantages` of this rank's rows, each group normalised over all its members in the launch.

    The rows of a step are split evenly over the processes, so a group may straddle two of
    them; the rewards of every rank are gathered first and normalised as one batch, then each
    rank keeps its own rows. In one process this is `group_advantages`.

    In float64: the rewards of a group can lie close together (differences of 1e-3 at a
    magnitude of 2), where float32's rounding of r − mean moves an advantage by 1e-4, an amount
    that would then depend on how the rows were batched (the AR's padding shifts the rewards by
    1e-7), so one process and N would differ.
    """
    everyone = distributed.all_cat(rewards).double()  # (rows of the step,) in row order
    advantages = group_advantages(everyone, group_size)[distributed.local_slice(len(everyone))]
    return advantages.to(rewards.device, rewards.dtype)


# ----------------------------------------------------------------------------- the reference policy


def reference_log_probs(
    av: AV, av_dir: str | Path, temperature: float = 1.0, strategy: str = "ddp"
) -> Callable[[torch.Tensor, list[list[int]]], torch.Tensor]:
    """A function giving per-token log-probs under the frozen SFT AV (no grad).

    LoRA: the SFT adapter is loaded a second time as adapter ``ref`` (frozen) and switched in
    for the reference pass. Full fine-tuning: a second, frozen copy of the SFT AV (under
    `strategy` fsdp sharded like the policy, so it costs 1/N of a model per process).
    """
    from peft import PeftModel

    if isinstance(av.model, PeftModel):
        model = av.model
        policy_adapter = model.active_adapter
        model.load_adapter(str(av_dir), adapter_name=REF_ADAPTER, is_trainable=False)
        model.set_adapter(policy_adapter)  # loading must not change which adapter is active and trains

        def ref_fn(vectors, completion_ids):
            model.set_adapter(REF_ADAPTER, inference_mode=True)
            try:
                with torch.no_grad():
                    return av.completion_log_probs(vectors, completion_ids, temperature=temperature)[0]
            finally:
                model.set_adapter(policy_adapter)  # grads back on the policy adapter only

        return ref_fn

    ref = load_av(av_dir, device=str(av.device))
    ref.model.eval().requires_grad_(False)
    distributed.shard_model(ref.model, decoder_blocks(ref.model), strategy)

    def ref_copy_fn(vectors, completion_ids):
        with torch.no_grad():
            return ref.completion_log_probs(vectors, completion_ids, temperature=temperature)[0]

    return ref_copy_fn


# ----------------------------------------------------------------------------- one step


def params_of(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in opt.param_groups for p in group["params"]]


def _update(opt: torch.optim.Optimizer, loss: torch.Tensor, max_grad_norm: float, weight: float) -> int:
    """One clipped optimizer step on `loss`; skipped (returns 1) when the loss or a gradient is NaN/Inf.

    `loss` is this process's mean over `weight` rows or tokens of the step. Under a launcher the
    gradients are those of the mean over every process's rows (`distributed.share`, then
    `sync_gradients`), and a skip is decided for all processes together, so all step or none do.
    """
    opt.zero_grad(set_to_none=True)
    if distributed.all_sum(not torch.isfinite(loss)):
        return 1
    (loss * distributed.share(weight)).backward()
    distributed.sync_gradients(params_of(opt))
    norm = torch.nn.utils.clip_grad_norm_(params_of(opt), max_grad_norm)
    if not torch.isfinite(norm):  # a NaN/Inf anywhere in the gradients makes the total norm non-finite
        opt.zero_grad(set_to_none=True)
        return 1
    opt.step()
    return 0


def rl_step(
    av: AV,
    ref_log_probs,
    ar: AR,
    vectors: torch.Tensor,
    cfg: RLConfig,
    av_opt: torch.optim.Optimizer,
    ar_opt: torch.optim.Optimizer | None,
    mean_unit: torch.Tensor | None = None,
) -> dict[str, float]:
    """Sample, score, update the AV once (clipped objective + KL), then the AR once."""
    t0 = time.perf_counter()
    G = cfg.group_size
    # Each group is G consecutive rows; under a launcher each rank samples its contiguous part of them.
    rows = distributed.shard(vectors.repeat_interleave(G, dim=0))
    av.model.eval()  # dropout off in every pass, so π_old, π and π_ref are the same function at step 0
    with torch.no_grad(), distributed.unsharded(av.model):
        samples = av.generate(
            rows, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, batch_size=len(rows)
        )
    generate_seconds = time.perf_counter() - t0  # generate returns host lists: the GPU work is done
    texts = [s.text for s in samples]
    ids = [list(s.token_ids) for s in samples]
    n_tokens = torch.tensor([len(t) for t in ids])
    capped = torch.tensor([not s.closed and len(s.token_ids) >= cfg.max_new_tokens for s in samples])
    # A completion that writes the marker token would add an injection site to its own log-prob pass
    # (one vector, two sites): it is scored as malformed and left out of the policy loss, not fatal.
    echoed = torch.tensor([av.marker.token_id in s.token_ids for s in samples])
    malformed = torch.tensor([not s.closed or not s.text.strip() for s in samples]) | echoed

    with torch.no_grad(), distributed.unsharded(ar):
        pred = ar.reconstruct(texts)
    mse = mse_nrm(pred.cpu(), rows.cpu())
    # The duplicate penalty compares the texts of whole groups, which may straddle two processes.
    everyone = [text for part in distributed.all_gather(texts) for text in part]  # the step's texts, in row order
    duplicates = duplicate_share(everyone, G)[distributed.local_slice(len(everyone))]
    rewards = shaped_rewards(mse, malformed, capped, n_tokens, cfg) - cfg.duplicate_penalty * duplicates
    advantages = batch_advantages(rewards, G)

    live = (~echoed).nonzero().flatten().tolist()  # rows whose completions enter the policy loss
    loss_value, stats, av_skipped = 0.0, {"kl": 0.0, "clip_frac": 0.0, "entropy": 0.0}, 0
    if distributed.all_sum(len(live)):  # under a launcher every rank runs the passes its peers' collectives wait for
        # A rank whose rows all echoed the marker runs one placeholder row at weight 0.
        part, part_ids = (live, [ids[i] for i in live]) if live else ([0], [[av.tokenizer.eos_token_id]])
        ref_logp = ref_log_probs(rows[part], part_ids)
        logp, mask = av.completion_log_probs(rows[part], part_ids, temperature=cfg.temperature)
        old_logp = logp.detach()  # π_old = the sampling policy (one update per batch)
        adv = advantages[part].to(logp.device)
        loss, stats = clipped_objective(logp, old_logp, ref_logp.to(logp.device), adv, mask, cfg.epsilon, cfg.beta)
        stats["entropy"] = float(-(old_logp * mask).sum() / mask.sum().clamp_min(1))  # sampled-token estimate
        n_local = float(mask.sum()) if live else 0.0  # the objective is a mean over the tokens of every rank's rows
        av_skipped = _update(av_opt, loss, cfg.max_grad_norm, n_local)
        stats = {k: distributed.mean_over_ranks(v, n_local) for k, v in stats.items()}
        loss_value = distributed.mean_over_ranks(float(loss.detach()), n_local)

    ar_loss, ar_skipped = float("nan"), 0
    keep = [i for i in range(len(texts)) if not malformed[i]]
    if ar_opt is not None and distributed.all_sum(len(keep)):
        ar.train()
        part = keep or [0]  # a rank left without a row still runs the pass (weight 0) its peers' collectives wait for
        ar_loss_t = ar.loss([texts[i] for i in part], rows[part])
        ar_skipped = _update(ar_opt, ar_loss_t, cfg.max_grad_norm, len(keep))
        ar_loss = distributed.mean_over_ranks(float(ar_loss_t.detach()), len(keep))

    # The logged numbers are those of the whole step (every rank's rows), as one process computes them.
    pred, rows, mse, rewards = (distributed.all_cat(t.cpu()) for t in (pred, rows, mse, rewards))
    n_tokens, capped, malformed, echoed = (distributed.all_cat(t) for t in (n_tokens, capped, malformed, echoed))
    fve = float(fve_nrm(pred, rows, mean_unit.cpu())) if mean_unit is not None else float("nan")
    return {
        "reward_mean": float(rewards.mean()),
        "reward_std": float(rewards.std()),
        "mse_mean": float(mse.mean()),
        "fve_batch": fve,
        **stats,
        "len_mean": float(n_tokens.float().mean()),
        "capped_frac": float(capped.float().mean()),
        "malformed_frac": float(malformed.float().mean()),
        "marker_echo_frac": float(echoed.float().mean()),
        "distinct_frac": len(set(everyone)) / len(everyone),
        "zero_adv_groups": float((rewards.view(-1, G).std(dim=1) < 1e-6).float().mean()),
        "skipped_updates": av_skipped + ar_skipped,
        "ar_loss": ar_loss,
        "loss": loss_value,
        "generate_seconds": generate_seconds,
        "seconds": time.perf_counter() - t0,
    }


def evaluate_heldout(av: AV, ar: AR, vectors: torch.Tensor, mean_unit: torch.Tensor, cfg: RLConfig) -> dict[str, float]:
    """Greedy round trip on held-out rows: FVE of AR(AV(v)) against v."""
    av.model.eval()
    mine = distributed.shard(vectors)  # under a launcher each rank explains its part of the rows
    with torch.no_grad(), distributed.unsharded(av.model, ar):
        samples = av.generate(mine, max_new_tokens=cfg.max_new_tokens, temperature=0.0, batch_size=max(1, len(mine)))
        pred = distributed.all_cat(ar.reconstruct([s.text for s in samples]).cpu())
    lengths = distributed.all_cat(torch.tensor([len(s.token_ids) for s in samples], dtype=torch.float64))
    malformed = distributed.all_cat(torch.tensor([not s.closed or not s.text.strip() for s in samples]))
    return {
        "fve_heldout": float(fve_nrm(pred, vectors.cpu(), mean_unit)),
        "mse_heldout": float(mse_nrm(pred, vectors.cpu()).mean()),
        "len_mean": float(lengths.mean()),
        "malformed_frac": float(malformed.float().mean()),
    }


# ----------------------------------------------------------------------------- training with checkpoints


@dataclass
class RLState:
    step: int = 0
    log: list[dict] = field(default_factory=list)
    eval_log: list[dict] = field(default_factory=list)


def save_checkpoint(
    work_dir: Path, state: RLState, av_params, ar_params, av_opt, ar_opt, rng: np.random.Generator, fingerprint: str
) -> None:
    """Everything needed to continue exactly: weights, optimizers, RNG states, step, logs (atomic)."""
    blob = {
        "fingerprint": fingerprint,
        "step": state.step,
        "log": state.log,
        "eval_log": state.eval_log,
        "av_params": distributed.full_tensors(av_params),  # full weights, also when sharded
        "ar_params": distributed.full_tensors(ar_params),
        "av_opt": distributed.full_optimizer_state(av_opt),
        "ar_opt": distributed.full_optimizer_state(ar_opt) if ar_opt is not None else None,
        "torch_rng": distributed.per_rank(torch.get_rng_state()),  # each rank samples its own stream
        "cuda_rng": distributed.per_rank(torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []),
        "numpy_rng": json.dumps(rng.bit_generator.state),
    }
    if distributed.is_main():
        with atomic_dir(work_dir / CHECKPOINT) as tmp:
            torch.save(blob, tmp / STATE_FILE)
    distributed.barrier()


def load_checkpoint(
    work_dir: Path, fingerprint: str, av_params, ar_params, av_opt, ar_opt, rng: np.random.Generator
) -> RLState | None:
    """Restore the last checkpoint into the given objects; None when there is none for these inputs."""
    path = work_dir / CHECKPOINT / STATE_FILE
    # Rank 0 reads the checkpoint and hands it to the others, so only its file system needs to hold it.
    blob = distributed.main_computes(
        lambda: torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else None
    )
    if blob is None:
        return None
    if blob["fingerprint"] != fingerprint:
        tqdm.write(f"rl: ignoring the checkpoint in {work_dir} (other inputs or params); starting over")
        return None
    for saved, params, what in ((blob["av_params"], av_params, "AV"), (blob["ar_params"], ar_params, "AR")):
        if len(saved) != len(params) or any(s.shape != p.shape for s, p in zip(saved, params, strict=True)):
            raise NLAError(f"rl checkpoint in {work_dir} does not match the {what}'s trainable weights; delete it")
        distributed.load_full_(params, saved)
    av_opt.load_state_dict(distributed.shard_optimizer_state(blob["av_opt"], av_params))
    if ar_opt is not None and blob["ar_opt"] is not None:
        ar_opt.load_state_dict(distributed.shard_optimizer_state(blob["ar_opt"], ar_params))
    torch.set_rng_state(distributed.own(blob["torch_rng"]))
    if (cuda_rng := distributed.own(blob["cuda_rng"])) and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_rng)
    rng.bit_generator.state = json.loads(blob["numpy_rng"])
    return RLState(step=blob["step"], log=blob["log"], eval_log=blob["eval_log"])


def train_rl(
    av: AV,
    ar: AR,
    ref_log_probs,
    train_vectors: torch.Tensor,
    cfg: RLConfig,
    work_dir: str | Path,
    *,
    eval_vectors: torch.Tensor | None = None,
    mean_unit: torch.Tensor | None = None,
    fingerprint: str = "",
    train_ar: bool = True,
    autocast_dtype: torch.dtype | None = None,
) -> RLState:
    """The RL loop with periodic held-out evaluation and checkpoints; resumes from `work_dir`.

    `autocast_dtype`: mixed precision for every step (bf16 matmuls on a bf16-capable CPU).
    """
    work_dir = Path(work_dir)
    torch.manual_seed(cfg.seed + distributed.rank())  # rank 0 samples the one-process stream, each other its own
    rng = np.random.default_rng(cfg.seed)
    av_params = [p for p in av.model.parameters() if p.requires_grad]
    ar_params = list(ar.parameters_to_train()) if train_ar else []
    if not av_params:
        raise NLAError("the AV has no trainable parameters; load it for training (LoRA adapter or full weights)")
    av_opt = torch.optim.AdamW(av_params, lr=cfg.actor_learning_rate, weight_decay=0.0)
    ar_opt = torch.optim.AdamW(ar_params, lr=cfg.ar_learning_rate, weight_decay=0.0) if ar_params else None
    state = load_checkpoint(work_dir, fingerprint, av_params, ar_params, av_opt, ar_opt, rng) or RLState()
    resumed = state.step > 0

    def run_eval(step: int) -> None:
        if eval_vectors is not None and mean_unit is not None and not any(e["step"] == step for e in state.eval_log):
            with autocast(av.device, autocast_dtype):
                state.eval_log.append({"step": step, **evaluate_heldout(av, ar, eval_vectors, mean_unit, cfg)})

    run_eval(0)
    bar = tqdm(total=cfg.steps, initial=state.step, desc="rl", unit="step")
    if resumed:
        bar.write(f"rl: resumed at step {state.step} from {work_dir / CHECKPOINT}")
    while state.step < cfg.steps:
        idx = rng.choice(len(train_vectors), size=min(cfg.prompts_per_step, len(train_vectors)), replace=False)
        with autocast(av.device, autocast_dtype):
            metrics = rl_step(
                av, ref_log_probs, ar, train_vectors[torch.as_tensor(idx)], cfg, av_opt, ar_opt, mean_unit
            )
        state.step += 1
        state.log.append({"step": state.step, **metrics})
        if state.step % cfg.eval_every == 0 or state.step == cfg.steps:
            run_eval(state.step)
        if state.step % cfg.checkpoint_every == 0 or state.step == cfg.steps:
            save_checkpoint(work_dir, state, av_params, ar_params, av_opt, ar_opt, rng, fingerprint)
        postfix = {"reward": f"{metrics['reward_mean']:.3f}", "kl": f"{metrics['kl']:.4f}"}
        if state.eval_log:
            postfix["fve"] = f"{state.eval_log[-1]['fve_heldout']:.3f}"
        bar.set_postfix(postfix)
        bar.update(1)
    bar.close()
    return state


# ----------------------------------------------------------------------------- the rl stage


def write_csv(path: str | Path, rows: list[dict], fields: list[str]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def rl_fingerprint(cfg: RLConfig, *parts: object) -> str:
    """Identity of a run for resuming: params that change the trajectory + the inputs (not `steps`)."""
    params = cfg.model_dump(exclude={"steps", "eval_every", "checkpoint_every"})
    return hashlib.sha256(json.dumps([params, *parts], sort_keys=True, default=str).encode()).hexdigest()[:16]


def summarize(state: RLState) -> dict[str, float]:
    """Headline numbers: held-out FVE before/after, reward at the start and end (means of a tenth of the steps)."""
    log, evals = state.log, state.eval_log
    k = max(1, len(log) // 10)
    metrics: dict[str, float] = {"steps": state.step}
    if log:
        metrics |= {
            "reward_first": float(np.mean([e["reward_mean"] for e in log[:k]])),
            "reward_last": float(np.mean([e["reward_mean"] for e in log[-k:]])),
            "kl_last": log[-1]["kl"],
            "len_mean_last": log[-1]["len_mean"],
        }
    if evals:
        metrics |= {"fve_heldout_start": evals[0]["fve_heldout"], "fve_heldout_end": evals[-1]["fve_heldout"]}
    return metrics


def timings(state: RLState, seconds: float) -> dict[str, float]:
    """Where the time went (run facts for nla.provenance): per step, and the share spent generating."""
    log = state.log
    facts = {"seconds": round(seconds, 1)}
    if log:
        total = sum(e["seconds"] for e in log)
        facts |= {
            "seconds_per_step": total / len(log),
            "generate_share": sum(e["generate_seconds"] for e in log) / max(total, 1e-9),
        }
    return facts


def headline(metrics: dict[str, float]) -> dict[str, float]:
    """What `dvc metrics show` lists for rl: the reward at the end of training (the start is in the plots)."""
    return {"reward": metrics["reward_last"]} if "reward_last" in metrics else {}


def checkpoint_digest(folder: str | Path) -> str:
    """A hash of every file in a checkpoint folder (names and bytes): the run's identity, whatever its age."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode() + b"\0")
        with open(path, "rb") as fh:
            while block := fh.read(1 << 22):
                digest.update(block)
    return digest.hexdigest()


def run_rl(
    cfg: NLAConfig,
    activations_dir: str | Path,
    splits_dir: str | Path,
    av_dir: str | Path,
    ar_dir: str | Path,
    out_dir: str | Path,
    *,
    work_dir: str | Path = Path(PATHS.work) / "rl",
    log_path: str | Path | None = None,
    eval_log_path: str | Path | None = None,
    metrics_path: str | Path | None = None,
    provenance_path: str | Path | None = None,
) -> dict:
    """RL on the rl split from the SFT AV and AR; writes `out_dir/av`, `out_dir/ar` and the logs.

    Logs default to `out_dir/rl_log.csv` (per step), `out_dir/rl_eval.csv` (held-out FVE)
    and `out_dir/rl_metrics.json` (the headline; the sidecars' `training` holds every metric
    returned here), the timings to `<out_dir>_provenance.json`. A crashed run resumes from
    `work_dir` when rerun with the same inputs and params; a finished run removes its checkpoint.
    """
    rl, out_dir = cfg.rl, Path(out_dir)
    av = load_av(av_dir, cfg.model.device, layer=cfg.model.layer, trainable=True)
    ar = load_ar(ar_dir, cfg.model.device)
    if ar.meta["layer"] != av.meta["layer"] or ar.d != av.meta["d_model"]:
        raise NLAError(
            f"AV {av_dir} (layer {av.meta['layer']}) and AR {ar_dir} (layer {ar.meta['layer']}) "
            "were trained for different activations; pass a matching pair"
        )
    rows = load_rows(activations_dir, splits_dir, ["rl", "eval"], d_model=ar.d, layer=av.meta["layer"])
    train = rows[rows.split == "rl"].sort_values("row_id")
    held = rows[rows.split == "eval"].sort_values("row_id").head(rl.eval_rows)
    if len(train) < rl.prompts_per_step:
        raise NLAError(
            f"the rl split has {len(train)} rows, fewer than rl.prompts_per_step={rl.prompts_per_step}; "
            "lower it or give the rl split a larger fraction"
        )
    train_vectors = torch.from_numpy(vectors_of(train))
    eval_vectors = torch.from_numpy(vectors_of(held)) if len(held) else None
    mean_unit = ar.mean_unit if ar.mean_unit is not None else unit(train_vectors).mean(dim=0)

    if rl.prompts_per_step * rl.group_size < distributed.world_size():
        raise NLAError(
            f"rl.prompts_per_step × rl.group_size = {rl.prompts_per_step * rl.group_size} rows per step leaves "
            f"some of the {distributed.world_size()} processes without a row; raise them or launch fewer processes"
        )
    strategy = cfg.distributed.strategy
    ref = reference_log_probs(av, av_dir, rl.temperature, strategy)  # before sharding: the ref adapter is sharded too
    distributed.shard_model(av.model, decoder_blocks(av.model), strategy)  # in place; no-op in one process
    distributed.shard_model(ar, decoder_blocks(ar.backbone), strategy)
    inputs = [checkpoint_digest(av_dir), checkpoint_digest(ar_dir)]
    fingerprint = rl_fingerprint(rl, inputs, train.row_id.tolist(), held.row_id.tolist())
    start = time.perf_counter()
    state = train_rl(
        av,
        ar,
        ref,
        train_vectors,
        rl,
        work_dir,
        eval_vectors=eval_vectors,
        mean_unit=mean_unit,
        fingerprint=fingerprint,
        autocast_dtype=model_autocast(av.model, cfg.model.autocast),
    )
    metrics = summarize(state)
    seconds = time.perf_counter() - start

    parents = [str(av_dir), str(ar_dir), str(activations_dir), str(splits_dir)]
    training = {**rl.model_dump(), **metrics}
    av_meta = {**av.meta, **make_meta("nla_model", "rl"), "parents": parents, "training": training}
    with distributed.full_weights(av.model, av.model), distributed.full_weights(ar, ar.backbone):
        if distributed.is_main():  # every rank gathered the weights (when sharded); rank 0 writes
            av.save(out_dir / "av", av_meta)  # the policy adapter only (not the frozen reference) or full weights
            ar.save(out_dir / "ar", {"stage": "rl", "parents": parents, "training": training})
            write_csv(log_path or out_dir / LOG_FILE, state.log, LOG_FIELDS)
            write_csv(eval_log_path or out_dir / EVAL_LOG_FILE, state.eval_log, EVAL_FIELDS)
            write_json(metrics_path or out_dir / METRICS_FILE, headline(metrics))
            write_provenance(provenance_path or beside(out_dir), "rl", **timings(state, seconds))
            shutil.rmtree(Path(work_dir) / CHECKPOINT, ignore_errors=True)  # done: a rerun starts over
    distributed.barrier()
    return metrics
