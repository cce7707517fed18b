"""Run several `nla` commands, and RL steps on replayed rollouts, in one process: under torchrun, in one launch.

    python tests/distributed_worker.py tasks.json                           # one process
    torchrun --nproc_per_node=2 tests/distributed_worker.py tasks.json      # two, gloo on the CPU

Test helper for tests/test_distributed.py: each process pays the imports (torch, transformers,
TRL) once for all its tasks instead of once per command. `tasks.json` holds
{"tasks": [...], "out": "results.json"}; a task is
* {"copy": [SRC, DST, [PATHS...]]}: copy those paths of a project into another (rank 0), e.g.
  inputs for a project the next launch runs in;

* {"cwd": DIR, "argv": ["--params", "params.yaml", "ar-sft"]}: `nla.cli.main(argv)` in DIR,
  exactly what `torchrun -m nla ar-sft` runs (its exit code is recorded);
* {"cwd": DIR, "rl_step": OUT, "av": AV_DIR, "ar": AR_DIR, "strategy": "ddp" | "fsdp"}: one
  `nla.rl.rl_step` from those checkpoints on fixed rollouts (`ReplayAV`), saving the step's
  metrics, the gradients of the AV and AR weights and `batch_advantages` of a fixed reward vector.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import fields
from pathlib import Path

import torch

import nla.distributed as distributed
from nla.ar import load_ar
from nla.av import AV, Explanation, completion_ids, load_av
from nla.cli import main
from nla.config import PATHS, load_config
from nla.data import labeled_rows, vectors_of
from nla.models import decoder_blocks
from nla.rl import batch_advantages, params_of, reference_log_probs, rl_step


class ReplayAV(AV):
    """The AV with `generate` answering from fixed rollouts, so that a step's samples do not depend on the RNG.

    `rollouts` holds one explanation per row of the step, in row order; each process is asked
    for its contiguous part of the rows (as `rl_step` shards them) and gets those rollouts.
    Everything else (log-probs, the reference pass, the update) is the real AV's.
    """

    rollouts: list[Explanation]

    def generate(self, vectors, max_new_tokens, temperature=0.0, batch_size=16):
        mine = self.rollouts[distributed.local_slice(len(self.rollouts))]
        assert len(mine) == len(vectors), (len(mine), len(vectors))
        return mine


def replay_rl_step(task: dict) -> None:
    cfg = load_config("params.yaml")
    rl = cfg.rl.model_copy(update={"prompts_per_step": 3, "group_size": 2})
    torch.manual_seed(0)
    av = load_av(task["av"], "cpu", layer=cfg.model.layer, trainable=True)
    ar = load_ar(task["ar"], "cpu")
    ref = reference_log_probs(av, task["av"], rl.temperature, task["strategy"])
    distributed.shard_model(av.model, decoder_blocks(av.model), task["strategy"])
    distributed.shard_model(ar, decoder_blocks(ar.backbone), task["strategy"])
    # Three prompts of two rollouts each: six rows, three per rank, so the second group straddles the ranks.
    rows = labeled_rows(PATHS.activations, PATHS.splits, PATHS.labels, ["ar_sft"]).head(3 + 6)
    vectors = torch.from_numpy(vectors_of(rows.head(3)))
    texts = rows.explanation.tolist()[3:]
    replay = ReplayAV(**{f.name: getattr(av, f.name) for f in fields(AV) if f.init})
    replay.rollouts = [Explanation(t, tuple(completion_ids(av.tokenizer, av.prompts, t)), True) for t in texts]
    # SGD at lr 1: each weight moves by minus its gradient, so the saved weights compare the gradients themselves.
    av_opt = torch.optim.SGD([p for p in av.model.parameters() if p.requires_grad], lr=1.0)
    ar_opt = torch.optim.SGD(list(ar.parameters_to_train()), lr=1.0)
    before = {"av": distributed.full_tensors(params_of(av_opt)), "ar": distributed.full_tensors(params_of(ar_opt))}
    metrics = rl_step(replay, ref, ar, vectors, rl, av_opt, ar_opt, ar.mean_unit)
    rewards = torch.sin(torch.arange(6, dtype=torch.float32))  # six rows, groups of two
    advantages = distributed.all_cat(batch_advantages(distributed.shard(rewards), 2))
    result = {
        "metrics": {k: v for k, v in metrics.items() if not k.endswith("seconds")},
        "av_grads": [b - a for b, a in zip(before["av"], distributed.full_tensors(params_of(av_opt)), strict=True)],
        "ar_grads": [b - a for b, a in zip(before["ar"], distributed.full_tensors(params_of(ar_opt)), strict=True)],
        "advantages": advantages,
    }
    if distributed.is_main():
        torch.save(result, task["rl_step"])


def run(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    codes = []
    # One process group for every task (the CLI joins a group it finds): a group is never re-created in a process.
    with distributed.process_group():
        for task in spec["tasks"]:
            if "copy" in task:
                src, dst, parts = task["copy"]
                if distributed.is_main():
                    for part in parts:
                        shutil.copytree(Path(src) / part, Path(dst) / part, dirs_exist_ok=True)
                distributed.barrier()
                continue
            os.chdir(task["cwd"])
            if "argv" in task:
                codes.append(main(task["argv"]))
            else:
                replay_rl_step(task)
                codes.append(0)
    if int(os.environ.get("RANK", 0)) == 0:
        Path(spec["out"]).write_text(json.dumps({"codes": codes}))
    return 0


if __name__ == "__main__":
    sys.exit(run(sys.argv[1]))
