"""Running a stage on N processes: `torchrun --nproc_per_node=N -m nla <stage>` (or `accelerate launch -m nla`).

The launcher starts N copies of the same command and tells each its place through the
environment (RANK, WORLD_SIZE, LOCAL_RANK); this module is everything the stages need on top:

* **the process group**: `process_group()` joins it for the length of a command (gloo on
  CPU, nccl on CUDA with one GPU per LOCAL_RANK) and leaves it in `finally`. Outside a
  launcher nothing is started and every function below is the one-process identity, so a
  plain `nla <stage>` behaves exactly as before.
* **one launch, one owner**: `main_first(cm)` enters a context (the workspace lock) on rank 0
  only and tells the others whether it succeeded, so a busy workspace refuses every rank with
  the same message; `main_computes(fn)` runs `fn` on rank 0 and hands its result to all.
* **exact data parallelism**: work is split into pieces that do not depend on the number of
  processes (whole extract shards, whole decoding batches, whole RL groups), `deal` hands
  them out round-robin, `merge` / `all_gather` put the results back in the one-process
  order. Training keeps the global batch: each rank takes its slice of it (`shard`), scales
  its mean loss by `share(n_local)` so that the averaged gradient is the gradient of the
  global-batch mean, whatever the slice sizes.
* **two training strategies** (params: `distributed.strategy`):
  - `ddp`: every rank holds the whole model; after `backward()` the gradients are averaged
    by all-reduce (`sync_gradients`), the scheme of `DistributedDataParallel`. It is done
    once after the backward, not by wrapping the forward, because the AV's training
    forward runs inside adapter switching (the RL reference) and the injector, and in an RL
    step a rank may have no AR rows at all; LoRA gradients are megabytes, so the overlap
    DDP buys by bucketing during the backward is small next to a forward.
  - `fsdp`: FSDP2 `fully_shard` on every decoder block and on the root (`shard_model`):
    parameters, gradients and optimizer state are split N ways and gathered per block for
    the forward and backward. Sampling and reconstruction run inside `unsharded(model)`
    (the parameters gathered once, kept for every decode step, so ranks may decode for
    different lengths without a collective), and saving inside `full_weights(...)`.
* **checkpoints under FSDP**: `full_tensors` / `load_full_` and `full_optimizer_state` /
  `shard_optimizer_state` convert between sharded (DTensor) state and the plain full tensors
  a checkpoint file holds, so a checkpoint written by N ranks loads into any other N.

A rank that fails exits non-zero; the launcher then stops the others (a peer's broken
connection surfaces here as `torch.distributed.DistError`, which the CLI reports in one line)
and nothing under a final name is half-written, so rerunning the same command resumes.
"""

from __future__ import annotations

import datetime as dt
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar
from weakref import WeakKeyDictionary

import torch
import torch.distributed as dist
from torch import nn

from nla.errors import NLAError

T = TypeVar("T")
S = TypeVar("S", bound=Sequence)
_BUCKET_ELEMENTS = 1 << 24  # gradients are all-reduced in flat buckets of ≤ 16M elements (64 MB fp32)
_RESHARD: WeakKeyDictionary[nn.Module, bool] = WeakKeyDictionary()  # FSDP module -> reshard after forward


# ----------------------------------------------------------------------------- where this process is


@dataclass(frozen=True)
class Launch:
    """This process's place in the launch, as the launcher's environment says."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> Launch:
        def number(name: str, default: int) -> int:
            value = os.environ.get(name, "")
            try:
                return int(value) if value else default
            except ValueError:
                raise NLAError(f"{name}={value!r} is not an integer; launch through torchrun or accelerate") from None

        launch = cls(number("RANK", 0), number("WORLD_SIZE", 1), number("LOCAL_RANK", 0))
        if not 0 <= launch.rank < launch.world:
            raise NLAError(f"RANK={launch.rank} is outside WORLD_SIZE={launch.world}; launch through torchrun")
        return launch


def active() -> bool:
    """True inside a process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


@contextmanager
def process_group(timeout_minutes: float = 60.0) -> Iterator[Launch]:
    """Join the launcher's process group for the block; outside a launcher (WORLD_SIZE ≤ 1) do nothing.

    CUDA: nccl, one GPU per LOCAL_RANK (so `model.to("cuda")` lands on this rank's GPU);
    otherwise gloo. The timeout bounds how long a rank waits for the others at a collective,
    e.g. while rank 0 writes a large checkpoint.
    """
    launch = Launch.from_env()
    if launch.world <= 1 or dist.is_initialized():
        yield launch
        return
    if not dist.is_available():
        raise NLAError("this torch build has no torch.distributed; run without a launcher")
    if torch.cuda.is_available():
        torch.cuda.set_device(launch.local_rank % torch.cuda.device_count())
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend, timeout=dt.timedelta(minutes=timeout_minutes))
    try:
        yield launch
    finally:
        dist.destroy_process_group()


def barrier() -> None:
    if active():
        dist.barrier()


# ----------------------------------------------------------------------------- objects between ranks


def broadcast(obj: T) -> T:
    """Rank 0's `obj` on every rank."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather(obj: T) -> list[T]:
    """Every rank's `obj`, in rank order, on every rank ([obj] in one process)."""
    if not active():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def gather(obj: T) -> list[T] | None:
    """Every rank's `obj` in rank order on rank 0 (None elsewhere): large results travel once, not N times."""
    if not active():
        return [obj]
    out: list[Any] | None = [None] * world_size() if is_main() else None
    dist.gather_object(obj, out, dst=0)
    return out


def all_sum(value: float) -> float:
    """The sum of `value` over the ranks, in float64 (counts and loss sums for the global batch)."""
    if not active():
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return float(t.item())


def all_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's rows of `tensor` (CPU), concatenated in rank order: the whole batch's per-row values."""
    if not active():
        return tensor
    return torch.cat([t for t in all_gather(tensor.detach().cpu())])


def mean_over_ranks(value: float, weight: float) -> float:
    """The `weight`-weighted mean of each rank's `value` (a rank's mean over its `weight` rows or tokens)."""
    if not active():
        return float(value)
    total = all_sum(weight)
    return all_sum(float(value) * weight) / total if total else float("nan")


def per_rank(value: T) -> T | dict[str, list[T]]:
    """`value` in one process; under a launcher every rank's, for a checkpoint (RNG states)."""
    return value if not active() else {"ranks": all_gather(value)}


def own(saved: Any) -> Any:
    """This rank's entry of a `per_rank` value (or the one value of a one-process checkpoint).

    A launch larger than the one that saved reuses entry rank mod N: those ranks draw from a
    stream another rank already draws from, on other rows.
    """
    if isinstance(saved, dict) and "ranks" in saved:
        return saved["ranks"][rank() % len(saved["ranks"])]
    return saved


def main_computes(fn: Callable[[], T]) -> T:
    """`fn()` on rank 0 only, its result on every rank: for work that must not be repeated N times."""
    if not active():
        return fn()
    result, error = None, None
    if is_main():
        try:
            result = fn()
        except NLAError as err:
            error = str(err)
    result, error = broadcast((result, error))
    if error is not None:
        raise NLAError(error)
    return result


@contextmanager
def main_first(cm: AbstractContextManager) -> Iterator[None]:
    """Enter `cm` on rank 0 only (the workspace lock: once per launch, not per rank).

    Rank 0 tells the others whether it got in; on a refusal every rank raises the same
    NLAError. On success the block runs on every rank, and rank 0 leaves `cm` only once all
    ranks are through (a barrier), so the lock covers the whole launch.
    """
    if not active():
        with cm:
            yield
        return
    if not is_main():
        if (error := broadcast(None)) is not None:
            raise NLAError(error)
        yield
        barrier()
        return
    try:
        cm.__enter__()
    except NLAError as err:
        broadcast(str(err))
        raise
    broadcast(None)
    try:
        yield
        barrier()
    except BaseException as err:
        if not cm.__exit__(type(err), err, err.__traceback__):
            raise
    else:
        cm.__exit__(None, None, None)


# ----------------------------------------------------------------------------- splitting work


def local_slice(n: int) -> slice:
    """This rank's contiguous part of n items: sizes differ by at most one, the parts in rank order make up all n."""
    w, r = world_size(), rank()
    return slice(r * n // w, (r + 1) * n // w)


def shard(items: S) -> S:
    """This rank's contiguous slice of `items` (a list, range, array or tensor; all of it in one process)."""
    return items[local_slice(len(items))]


def deal(items: S) -> S:
    """This rank's items dealt round-robin (items r, r + N, …): balanced when the pieces grow along the list."""
    return items[rank() :: world_size()]


def merge(values: list[T | None]) -> list[T | None]:
    """Per position, the one rank's value that is not None: each rank filled the positions it was dealt."""
    if not active():
        return values
    merged = list(values)
    for theirs in all_gather(values):
        for i, value in enumerate(theirs):
            if value is not None:
                merged[i] = value
    return merged


def share(n_local: float) -> float:
    """world · n_local / n_global: scale a rank's mean loss by it, and the gradient mean over ranks is the global mean.

    With slices of the global batch of different sizes (a batch that does not divide by N,
    RL groups of different token counts) plain averaging would weigh the small slices up.
    """
    if not active():
        return 1.0
    total = all_sum(n_local)
    return world_size() * float(n_local) / total if total else 0.0


def quiet_others() -> None:
    """Only rank 0 prints summaries and draws progress bars (the others would repeat them N times)."""
    if not is_main():
        os.environ["TQDM_DISABLE"] = "1"
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the rest of this process)


def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ----------------------------------------------------------------------------- training: ddp and fsdp


def _dtensor():
    from torch.distributed.tensor import DTensor

    return DTensor


def is_sharded(module: nn.Module) -> bool:
    """True when `module` (or a part of it) is sharded by FSDP2 (never outside a process group)."""
    if not active():
        return False
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in module.modules())


def shard_model(model: nn.Module, blocks: Sequence[nn.Module], strategy: str) -> nn.Module:
    """Prepare `model` for data-parallel training under `strategy`, in place; no-op in one process.

    ddp: every rank gets rank 0's trainable weights (replicas start equal whatever their
    RNG did). fsdp: `fully_shard` on each of `blocks` (resharded after forward: a block's
    weights live gathered only while it runs), then on `model` itself (the rest: embeddings,
    head; kept gathered between forward and backward, as FSDP2 does for a root).
    Load every adapter (the RL reference) before this: parameters added later are not sharded.
    """
    if strategy not in ("ddp", "fsdp"):
        raise ValueError(f"strategy must be 'ddp' or 'fsdp', got {strategy!r}")
    if not active():
        return model
    if strategy == "ddp":
        for p in model.parameters():
            if p.requires_grad:
                dist.broadcast(p.data, src=0)
        return model
    from torch.distributed.fsdp import fully_shard

    for block in blocks:
        fully_shard(block, reshard_after_forward=True)
        _RESHARD[block] = True
    fully_shard(model, reshard_after_forward=False)
    _RESHARD[model] = False
    return model


def sync_gradients(params: Sequence[torch.Tensor]) -> None:
    """Average the gradients of replicated parameters over the ranks (the ddp strategy), in flat buckets.

    Sharded (FSDP) parameters are skipped: FSDP reduce-scatters their gradients itself. A
    parameter without a gradient on some rank counts as zero there, so every rank issues the
    same all-reduces in the same order.
    """
    if not active():
        return
    DTensor = _dtensor()
    plain = [p for p in params if not isinstance(p, DTensor)]
    bucket: list[torch.Tensor] = []
    size = 0
    for p in plain + [None]:
        if p is not None:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            bucket.append(p.grad)
            size += p.grad.numel()
        if bucket and (p is None or size >= _BUCKET_ELEMENTS):
            flat = torch.cat([g.reshape(-1) for g in bucket])
            dist.all_reduce(flat)
            flat /= world_size()
            offset = 0
            for g in bucket:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()
            bucket, size = [], 0


@contextmanager
def unsharded(*modules: nn.Module) -> Iterator[None]:
    """Inside, the FSDP-sharded parts of `modules` hold their full weights and keep them across forwards.

    For sampling and reconstruction: one all-gather per block for the whole block of work
    instead of one per decode step, and no collective inside the work, so ranks may run
    different numbers of forwards (rows that stop early). It costs one full copy of the
    weights per GPU while inside. No-op for modules that are not sharded.
    """
    if not active():
        yield
        return
    from torch.distributed.fsdp import FSDPModule

    parts = [m for module in modules for m in module.modules() if isinstance(m, FSDPModule)]
    for m in parts:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield
    finally:
        for m in parts:
            m.reshard()
            m.set_reshard_after_forward(_RESHARD.get(m, True), recurse=False)


@contextmanager
def full_weights(root: nn.Module, *savers: nn.Module) -> Iterator[None]:
    """For saving a sharded model from rank 0: every rank enters, rank 0 saves inside.

    Each of `savers` (the modules whose `state_dict()` the save function reads: a PEFT
    model, an AR backbone) answers `state_dict()` with full CPU tensors, gathered here by all
    ranks together; `root`'s own parameters are full while inside (`unsharded`), for code that
    reads a weight directly. No-op when `root` is not sharded.
    """
    if not is_sharded(root):
        yield
        return
    full = [full_tensors(saver.state_dict()) for saver in savers]
    with unsharded(root):
        for saver, state in zip(savers, full, strict=True):
            saver.state_dict = lambda *args, _state=state, **kwargs: dict(_state)  # type: ignore[method-assign]
        try:
            yield
        finally:
            for saver in savers:
                del saver.state_dict


def full_tensors(obj: Any) -> Any:
    """`obj` (a tensor, or dicts / lists / tuples of them) with every DTensor gathered to a full CPU tensor.

    A collective under FSDP: every rank calls it, in the same order. Plain tensors are detached
    copies on the CPU, so the result is what a checkpoint file holds in one process.
    """
    DTensor = _dtensor()
    if isinstance(obj, DTensor):
        return obj.full_tensor().detach().cpu().clone()
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        return type(obj)((k, full_tensors(v)) for k, v in obj.items())
    if isinstance(obj, list | tuple):
        return type(obj)(full_tensors(v) for v in obj)
    return obj


def _like(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """`full` laid out as `param` is: this rank's shard of it for a DTensor, else `full` on param's device."""
    if isinstance(param, _dtensor()):
        from torch.distributed.tensor import distribute_tensor

        # Every rank holds the full tensor, so each cuts its own shard: no communication.
        return distribute_tensor(
            full.to(param.device, param.dtype), param.device_mesh, param.placements, src_data_rank=None
        )
    return full.to(param.device)


@torch.no_grad()
def load_full_(params: Sequence[torch.Tensor], saved: Sequence[torch.Tensor]) -> None:
    """Copy full saved tensors into `params`, sharded or not (the inverse of `full_tensors`)."""
    for p, s in zip(params, saved, strict=True):
        p.copy_(_like(s, p))


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """`optimizer.state_dict()` with sharded state gathered: a collective under FSDP."""
    return full_tensors(optimizer.state_dict())


def shard_optimizer_state(state: dict, params: Sequence[torch.Tensor]) -> dict:
    """A full optimizer state (from `full_optimizer_state`) laid out for `params` (in param-group order)."""
    if not any(isinstance(p, _dtensor()) for p in params):
        return state
    per_param = {}
    for index, entry in state["state"].items():
        param = params[int(index)]
        per_param[index] = {
            k: _like(v, param) if isinstance(v, torch.Tensor) and v.shape == param.shape else v
            for k, v in entry.items()
        }
    return {**state, "state": per_param}
