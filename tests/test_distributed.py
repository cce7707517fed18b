"""The stages on two real torch.distributed processes (torchrun, gloo on the CPU) against one process.

One tiny project runs the pipeline in one process (the reference); a copy runs the heavy stages
under `torchrun --nproc_per_node=2`, after a first two-process extract whose rank 1 is killed
midway. Each launch runs several stages (`tests/distributed_worker.py`), so the imports are paid
once per launch. The checks:

* extract and evaluate (and the local labeler) give the one-process files byte for byte;
* `accelerate launch -m nla extract` (two ranks, every setting a flag) gives the same table;
* ar-sft (ddp and fsdp) and av-sft (ddp) give the one-process losses at the same global batch;
* an RL step on fixed rollouts gives the one-process advantages, loss and gradients, a group
  split across the two ranks included (ddp and fsdp);
* only rank 0 writes: the same files as one process, no temporary or duplicate ones;
* a killed rank fails the launch, leaves no output, and the rerun resumes from the shards;
* the workspace lock is taken once per launch: a held lock refuses every rank.

FSDP runs here on the CPU (torch 2.13's `fully_shard` works with gloo) for the own loops;
TRL's FSDP (accelerate) shards CUDA launches only, so av-sft under fsdp is refused on the CPU.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from test_reliability import TINY, make_project, save_tiny

from nla.io import read_table
from nla.lock import workspace_lock

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
TORCHRUN = [str(Path(PY).with_name("torchrun")), "--nproc_per_node=2"]
# Every setting a flag, so no accelerate config file is needed. `--multi_gpu` is accelerate's torchrun launcher,
# the one it picks itself on a machine with several GPUs; without CUDA its ranks join over gloo. (`--cpu` would
# start one process: accelerate launches several CPU processes through MPI only.)
ACCELERATE = [
    str(Path(PY).with_name("accelerate")),
    "launch",
    "--multi_gpu",
    "--num_processes=2",
    "--num_machines=1",
    "--mixed_precision=no",
    "--dynamo_backend=no",
    "--main_process_port=0",  # a free port: another launch on this machine may hold the default one
]
WORKER = str(REPO / "tests" / "distributed_worker.py")
ENV = dict(
    os.environ,
    PYTHONPATH=str(REPO),
    TQDM_DISABLE="1",
    PYTHONWARNINGS="ignore",
    OMP_NUM_THREADS="1",  # both runs alike (torchrun sets 1 per process), so CPU kernels reduce in the same order
    OMP_WAIT_POLICY="PASSIVE",
)
PARAMS = {
    "corpus": {"max_docs": 40},
    "extract": {"max_tokens": 48, "shard_docs": 2, "positions_per_doc": 2, "batch_size": 4},
    "label": {"backend": "baseline", "batch_size": 8, "max_new_tokens": 12},
    "injection": {"scale": 1.0},
    "av_sft": {"batch_size": 4, "max_steps": 3, "save_steps": 0, "lora": {"r": 4, "alpha": 8}},
    "ar_sft": {"batch_size": 4, "max_steps": 3, "lora": {"r": 4, "alpha": 8}, "av_explanations": 0},  # gold labels only
    "evaluate": {"max_rows": 12, "max_new_tokens": 8, "batch_size": 4, "n_samples": 4},
}


def nla(*argv: str) -> dict:
    return {"argv": ["--params", "params.yaml", *argv]}


def launch(tasks: list[dict], out: Path, processes: int = 2) -> tuple[list[int], str]:
    """Run the worker on `tasks` in one launch; returns each task's exit code and the launch's output."""
    spec = out.with_suffix(".tasks.json")
    spec.write_text(json.dumps({"tasks": tasks, "out": str(out)}))
    command = [*TORCHRUN, WORKER, str(spec)] if processes == 2 else [PY, WORKER, str(spec)]
    result = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return json.loads(out.read_text())["codes"], result.stdout + result.stderr


def rank_pid(launcher: int, rank: int, timeout: float = 120) -> int:
    """The pid of the given rank among a torchrun's children (from their environment)."""
    import psutil

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in psutil.Process(launcher).children(recursive=True):
            try:
                if child.environ().get("RANK") == str(rank) and "nla" in " ".join(child.cmdline()):
                    return child.pid
            except psutil.Error:
                continue
        time.sleep(0.05)
    raise AssertionError(f"rank {rank} did not start")


def params_like(src: Path, dst: Path, **sections) -> Path:
    """`src`'s params file with `sections` updated, written to `dst`."""
    params = yaml.safe_load(src.read_text())
    for section, values in sections.items():
        params[section] = {**params.get(section, {}), **values}
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text(yaml.safe_dump(params, sort_keys=False))
    return dst


def project_like(src: Path, dst: Path, **sections) -> Path:
    """A project folder with `src`'s params (`sections` updated) and nothing else yet."""
    return params_like(src / "params.yaml", dst / "params.yaml", **sections).parent


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """one: the pipeline in one process. two: the same through torchrun. ev: one's data and checkpoints,
    for evaluate and the labeler under torchrun. fsdp: one's data, distributed.strategy fsdp."""
    from transformers import LlamaConfig

    root = tmp_path_factory.mktemp("distributed")
    model = save_tiny(root / "tiny", LlamaConfig(**TINY, num_key_value_heads=2))
    # fp32 matmuls (no bf16 autocast): the losses of 1 and 2 processes are compared to float32's tolerance.
    model_params = {"name": str(model), "layer": 1, "device": "cpu", "autocast": "off"}
    one = make_project(root / "one", {**PARAMS, "model": model_params})
    two, ev = project_like(one, root / "two"), project_like(one, root / "ev")
    fsdp = project_like(one, root / "fsdp", distributed={"strategy": "fsdp"})
    for project in (one, ev):
        params_like(one / "params.yaml", project / "local.yaml", label={"backend": "local", "local_model": str(model)})
    label_local = {"argv": ["--params", "local.yaml", "label"]}
    ckpt = {"av": str(one / "data/checkpoints/av_sft"), "ar": str(one / "data/checkpoints/ar_sft")}
    inputs = ["data/corpus", "data/split", "data/labels"]
    timings = {}

    start = time.perf_counter()
    at_one = [nla("corpus"), nla("extract"), nla("split"), nla("label"), nla("ar-sft"), nla("av-sft")]
    codes, _ = launch(
        [{"cwd": str(one), **t} for t in at_one]
        + [{"copy": [str(one), str(p), inputs]} for p in (two, fsdp)]
        + [{"copy": [str(one), str(p), ["data/activations"]]} for p in (fsdp, ev)]
        + [{"copy": [str(one), str(ev), [*inputs, "data/checkpoints"]]}]
        + [{"cwd": str(one), "rl_step": str(root / "rl_one.pt"), **ckpt, "strategy": "ddp"}]
        + [{"cwd": str(one), **t} for t in (nla("evaluate"), label_local)],  # last: it replaces one's labels
        root / "one.json",
        processes=1,
    )
    assert codes == [0] * 9
    timings["one process, 9 tasks"] = time.perf_counter() - start

    # A two-process extract through NLA_LAUNCHER (`nla extract` becomes `torchrun … -m nla extract`);
    # rank 1 is killed with SIGKILL once it has finished a shard.
    start = time.perf_counter()
    shards = lambda: sorted((two / "data/work/extract").rglob("shard-*.parquet"))  # noqa: E731
    proc = subprocess.Popen(
        [str(Path(PY).with_name("nla")), "--params", "params.yaml", "extract"],
        cwd=two,
        env={**ENV, "NLA_LAUNCHER": " ".join(TORCHRUN)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    victim = rank_pid(proc.pid, 1)
    deadline = time.monotonic() + 300
    while not any(s.name == "shard-00001.parquet" for s in shards()):
        assert proc.poll() is None, "the launch ended before rank 1 finished a shard: " + proc.stderr.read()[-2000:]
        assert time.monotonic() < deadline, "rank 1 finished no shard in time"
        time.sleep(0.01)
    os.kill(victim, signal.SIGKILL)
    _, crash_err = proc.communicate(timeout=300)
    crash = {
        "returncode": proc.returncode,
        "stderr": crash_err,
        "activations_exist": (two / "data/activations").exists(),
        "kept": [s.name for s in shards()],
        "rows": [len(read_table(s)) for s in shards()],
    }
    timings["killed launch"] = time.perf_counter() - start

    start = time.perf_counter()
    codes, output = launch(
        [{"cwd": str(two), **t} for t in (nla("extract"), nla("ar-sft"), nla("av-sft"))]
        + [{"cwd": str(two), "rl_step": str(root / f"rl_two_{s}.pt"), **ckpt, "strategy": s} for s in ("ddp", "fsdp")]
        + [{"cwd": str(ev), **t} for t in (nla("evaluate"), label_local)]
        + [{"cwd": str(fsdp), **t} for t in (nla("ar-sft"), nla("av-sft"))],
        root / "two.json",
    )
    timings["two processes, 9 tasks"] = time.perf_counter() - start
    return {
        "one": one,
        "two": two,
        "ev": ev,
        "fsdp": fsdp,
        "root": root,
        "crash": crash,
        "codes": codes,
        "output": output,
        "timings": timings,
    }


def sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def files(project: Path, part: str) -> list[str]:
    return sorted(str(p.relative_to(project / part)) for p in (project / part).rglob("*") if p.is_file())


def without_time(meta_path: Path) -> dict:
    meta = yaml.safe_load(meta_path.read_text())
    meta.pop("created_at", None)
    return meta


def test_the_launches_ran(runs):
    assert runs["codes"][:8] == [0] * 8, runs["output"][-4000:]
    print("timings (s):", {k: round(v, 1) for k, v in runs["timings"].items()})


def test_two_process_extract_and_evaluate_equal_one_process_byte_for_byte(runs):
    one, two, ev = runs["one"], runs["two"], runs["ev"]
    assert sha(two / "data/activations/activations.parquet") == sha(one / "data/activations/activations.parquet")
    assert without_time(two / "data/activations/nla_meta.yaml") == without_time(one / "data/activations/nla_meta.yaml")
    for name in (
        "plots/fve_by_checkpoint.csv",
        "plots/fve_by_position.csv",
        "reports/samples.md",
        "reports/eval_rows.jsonl",
    ):
        assert sha(ev / name) == sha(one / name), name  # the same checkpoints, evaluated by two processes
    for name in ("metrics/eval.json", "reports/eval_details.json"):  # the timings are in reports/provenance
        assert sha(ev / name) == sha(one / name), name


def test_accelerate_launch_extract_equals_one_process_byte_for_byte(runs):
    one, acc = runs["one"], project_like(runs["one"], runs["root"] / "accelerate")
    shutil.copytree(one / "data/corpus", acc / "data/corpus")
    proc = subprocess.Popen(
        [*ACCELERATE, "-m", "nla", "--params", "params.yaml", "extract"],
        cwd=acc,
        env={**ENV, "HF_HOME": str(runs["root"] / "hf")},  # accelerate finds no config of the user's there
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        pids = {rank_pid(proc.pid, rank) for rank in (0, 1)}  # two nla processes, RANK 0 and 1, under accelerate
    finally:
        _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-4000:]
    assert len(pids) == 2
    assert sha(acc / "data/activations/activations.parquet") == sha(one / "data/activations/activations.parquet")
    assert without_time(acc / "data/activations/nla_meta.yaml") == without_time(one / "data/activations/nla_meta.yaml")


def test_local_labeler_on_two_processes_writes_the_one_process_labels(runs):
    one, ev = runs["one"], runs["ev"]
    for name in ("explanations.parquet", "failed.parquet"):
        assert sha(ev / "data/labels" / name) == sha(one / "data/labels" / name), name
    assert read_table(one / "data/labels/explanations.parquet").backend.eq("local").all()


def losses(project: Path, name: str) -> pd.DataFrame:
    return pd.read_csv(project / "plots" / name)


@pytest.mark.parametrize("stage", ["ar_sft", "av_sft"])
def test_two_process_sft_losses_equal_one_process_at_the_same_global_batch(runs, stage):
    one = losses(runs["one"], f"{stage}_loss.csv")
    two = losses(runs["two"], f"{stage}_loss.csv")
    assert len(one) == 3 and list(two.step) == list(one.step)
    assert two.loss.to_numpy() == pytest.approx(one.loss.to_numpy(), rel=1e-5)
    assert one.loss.nunique() == 3  # the steps differ: a loss that ignored the batch would not pass


def test_fsdp_ar_sft_step_runs_on_cpu_and_matches_one_process(runs):
    assert runs["codes"][7] == 0, runs["output"][-4000:]
    one = losses(runs["one"], "ar_sft_loss.csv")
    sharded = losses(runs["fsdp"], "ar_sft_loss.csv")
    assert sharded.loss.to_numpy() == pytest.approx(one.loss.to_numpy(), rel=1e-5)
    from safetensors.torch import load_file

    heads = [load_file(p / "data/checkpoints/ar_sft/head.safetensors")["weight"] for p in (runs["one"], runs["fsdp"])]
    assert torch.allclose(heads[0], heads[1], atol=1e-6)  # saved whole from the shards


def test_av_sft_under_fsdp_is_refused_on_the_cpu(runs):
    assert runs["codes"][8] == 2
    assert "av_sft with distributed.strategy=fsdp needs GPUs" in runs["output"]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_rl_step_on_two_processes_gives_the_one_process_advantages_and_update(runs, strategy):
    one = torch.load(runs["root"] / "rl_one.pt")
    two = torch.load(runs["root"] / f"rl_two_{strategy}.pt")
    # Rewards sin(0..5) in groups of two; rank 0 holds rows 0-2, rank 1 rows 3-5: group 1 is split.
    rewards = torch.sin(torch.arange(6, dtype=torch.float32)).view(3, 2)
    expected = ((rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-6)).view(-1)
    assert torch.allclose(two["advantages"], expected, atol=1e-6)
    assert torch.equal(two["advantages"], one["advantages"])
    for key in ("reward_mean", "reward_std", "mse_mean", "ar_loss", "len_mean", "loss", "kl"):
        assert two["metrics"][key] == pytest.approx(one["metrics"][key], rel=1e-3, abs=1e-5), key
    assert one["metrics"]["reward_std"] > 0  # the rollouts differ, so the advantages are not all zero
    for part in ("av_grads", "ar_grads"):
        for a, b in zip(one[part], two[part], strict=True):
            assert torch.allclose(a, b, rtol=1e-3, atol=1e-7), part
        assert any(g.abs().max() > 0 for g in one[part])


def test_only_rank_zero_writes_the_outputs(runs):
    one, two, ev = runs["one"], runs["two"], runs["ev"]
    for part in ("data/activations", "data/checkpoints/ar_sft", "data/checkpoints/av_sft"):
        assert files(two, part) == files(one, part), part
    for part in ("metrics", "plots", "reports"):  # two trained, ev labeled and evaluated: together what one wrote
        ran_corpus = ["corpus.json"] if part == "reports" else []  # the corpus stage ran in one only
        assert sorted(files(two, part) + files(ev, part) + ran_corpus) == files(one, part), part
    assert files(ev, "data/labels") == files(one, "data/labels")
    leftovers = [p for p in two.rglob("*") if ".tmp" in p.name or p.name.startswith(".") and p.name != ".nla.lock"]
    assert not leftovers, leftovers
    assert not list((two / "data/work").rglob("*.parquet"))  # the extract shards are removed once the table is written
    assert not (two / "data/work/ar_sft/checkpoint").exists()


def test_a_killed_rank_fails_the_launch_and_the_rerun_resumes(runs):
    crash = runs["crash"]
    assert crash["returncode"] != 0, crash["stderr"][-2000:]
    assert not crash["activations_exist"]  # nothing under a final name before every rank is done
    assert crash["kept"] and all(rows == 4 for rows in crash["rows"])  # finished shards are whole (2 docs x 2)
    assert len(crash["kept"]) < 20, "killed too late to test a resume"
    # The rerun picked the surviving shards up, and its table is the one-process table.
    assert f"extract: resuming, {len(crash['kept'])} of 20 shards already done" in runs["output"]
    assert sha(runs["two"] / "data/activations/activations.parquet") == sha(
        runs["one"] / "data/activations/activations.parquet"
    )


def test_workspace_lock_is_taken_once_per_launch(runs, tmp_path):
    two = runs["two"]
    table = two / "data/activations/activations.parquet"
    before = table.stat().st_mtime_ns
    with workspace_lock(two, "a test holding the lock"):
        result = subprocess.run(
            [*TORCHRUN, "-m", "nla", "--params", "params.yaml", "extract"],
            cwd=two,
            env=ENV,
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert result.returncode != 0
    refusals = [line for line in result.stderr.splitlines() if line.startswith("nla extract: error: another nla run")]
    # Every rank refuses with rank 0's answer. Once rank 0 has exited the launcher stops the others, so on a
    # loaded machine rank 1 may be stopped before it prints its line; what it must never do is run the stage.
    assert 1 <= len(refusals) <= 2 and len(set(refusals)) == 1 and "a test holding the lock" in refusals[0]
    assert table.stat().st_mtime_ns == before and not list((two / "data/work").rglob("shard-*.parquet"))


def test_a_stage_that_does_not_split_refuses_a_launcher(tmp_path):
    result = subprocess.run(
        [PY, "-m", "nla", "--params", str(make_project(tmp_path)) + "/params.yaml", "split"],
        env={**ENV, "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "nla split runs in one process; drop the launcher" in result.stderr
