"""Bad input through the real `nla` CLI: one clear line, a non-zero exit, nothing half-written.

Each case runs `nla --params params.yaml <stage>` as a subprocess in a fresh project folder
and checks (1) exit code 2, (2) exactly one `nla <stage>: error: ...` line naming the
problem, no traceback, (3) the stage's outputs are absent, or byte-identical to what was
there before. docs/bad_inputs.md lists the same cases with their messages.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from nla.config import NLAConfig, deep_merge

NLA = str(Path(sys.executable).with_name("nla"))
SMALL = {
    "corpus": {"max_docs": 4, "foreign": {}},
    "extract": {"max_tokens": 32, "shard_docs": 2, "positions_per_doc": 2, "batch_size": 4},
}


def make_project(folder: Path, overrides: dict | None = None, text: str | None = None) -> Path:
    """A project folder with a params.yaml: the defaults, SMALL sizes, then `overrides` (or raw `text`)."""
    folder.mkdir(parents=True, exist_ok=True)
    if text is None:
        params = deep_merge(deep_merge(NLAConfig().model_dump(mode="json"), SMALL), overrides or {})
        text = yaml.safe_dump(params, sort_keys=False, allow_unicode=True)
    (folder / "params.yaml").write_text(text, encoding="utf-8")
    return folder


def nla(project: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, TQDM_DISABLE="1", PYTHONWARNINGS="ignore")
    return subprocess.run(
        [NLA, "--params", "params.yaml", *args], cwd=project, env=env, capture_output=True, text=True, timeout=timeout
    )


def refused(result: subprocess.CompletedProcess, stage: str, pattern: str) -> str:
    """Assert a clean refusal and return its one error line."""
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    lines = [line for line in result.stderr.splitlines() if line.startswith(f"nla {stage.replace('_', '-')}: error: ")]
    assert len(lines) == 1, result.stderr[-2000:]
    assert re.search(pattern, lines[0]), lines[0]
    return lines[0]


def snapshot(project: Path) -> dict[str, str]:
    """sha256 of every file the stages wrote (params and the lock file excluded), to prove a failure changed nothing."""
    return {
        str(p.relative_to(project)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(project.rglob("*"))
        if p.is_file() and p.name not in ("params.yaml", ".nla.lock")
    }


def no_temp_files(project: Path) -> None:
    leftovers = [p for p in project.rglob("*") if p.name.endswith(".tmp") or ".tmp" in p.name]
    assert not leftovers, leftovers


def write_corpus(project: Path, name: str, content: bytes) -> str:
    path = project / name
    path.write_bytes(content)
    return str(path)


# ----------------------------------------------------------------------------- stage processes

STAGE_ENV = dict(os.environ, TQDM_DISABLE="1", PYTHONWARNINGS="ignore")


def sigint_as_in_a_terminal() -> None:
    """A child's Ctrl-C as a terminal delivers it, also when the suite runs as a background job.

    A non-interactive shell starts background jobs with SIGINT ignored, children inherit that, and
    `nla` keeps an inherited SIG_IGN on purpose (nla.interrupt), so the interrupt tests reset it.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_stage(project: Path, stage: str, env: dict | None = None) -> subprocess.Popen:
    """`nla <stage>` as a child process (stage names may use '_' for the CLI's '-')."""
    return subprocess.Popen(
        [NLA, "--params", "params.yaml", stage.replace("_", "-")],
        cwd=project,
        env=env or STAGE_ENV,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=sigint_as_in_a_terminal,
    )


def run_stage(project: Path, stage: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    proc = start_stage(project, stage, env)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0 or not check, err[-3000:]
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


# ----------------------------------------------------------------------------- params

GOOD_DOC = ("The quick brown fox jumps over the lazy dog near the river bank. " * 5).encode()

PARAM_CASES = [
    # (id, overrides or raw YAML text, expected message pattern)
    (
        "unknown key",
        {"extract": {"positons_per_doc": 3}},
        r"unknown key 'extract\.positons_per_doc'; check its spelling",
    ),
    ("unknown section", {"modle": {"layer": 3}}, r"unknown key 'modle'"),
    ("wrong type", {"model": {"layer": "twenty"}}, r"invalid value for 'model\.layer': .*integer"),
    ("negative layer", {"model": {"layer": -1}}, r"invalid value for 'model\.layer': .*greater than or equal to 0"),
    ("NaN value", "av_sft: {learning_rate: .nan}\n", r"invalid value for 'av_sft\.learning_rate'"),
    ("Inf value", "label: {openai: {timeout_s: .inf}}\n", r"invalid value for 'label\.openai\.timeout_s': .*finite"),
    ("bad fractions", {"split": {"fractions": {"av_sft": 0.5, "ar_sft": 0.5, "rl": 0.5, "eval": 0.5}}}, r"sum to 1"),
    (
        "AV prompt without marker",
        {"prompts": {"av_user": "Explain this vector."}},
        r"prompts\.av_user must contain '\{marker\}'",
    ),
    (
        "AR prompt without slot",
        {"prompts": {"ar_template": "no slot"}},
        r"prompts\.ar_template must contain '\{explanation\}'",
    ),
    ("not YAML", "model: [unclosed\n", r"not valid YAML"),
    ("impossible date", "model: {revision: 2024-02-30}\n", r"not valid YAML \(day is out of range"),
    ("not a mapping", "- model\n- layer\n", r"top level must be a mapping"),
]


@pytest.mark.parametrize("case", PARAM_CASES, ids=[c[0] for c in PARAM_CASES])
def test_bad_params_are_refused_before_anything_runs(tmp_path, case):
    _, bad, pattern = case
    project = make_project(tmp_path, *((bad, None) if isinstance(bad, dict) else (None, bad)))
    refused(nla(project, "corpus"), "corpus", pattern)
    assert snapshot(project) == {}


def test_missing_params_file_and_profile(tmp_path):
    refused(
        nla(tmp_path, "corpus"), "corpus", r"params\.yaml: file not found; run from the project root or pass --params"
    )
    project = make_project(tmp_path)
    refused(nla(project, "--profile", "gpu", "corpus"), "corpus", r"profile 'gpu' not found")


# ----------------------------------------------------------------------------- documents


@pytest.fixture(scope="module")
def corpus_project(tmp_path_factory) -> Path:
    """A project whose corpus stage already ran once (4 embedded documents)."""
    project = make_project(tmp_path_factory.mktemp("corpus"))
    result = nla(project, "corpus")
    assert result.returncode == 0, result.stderr
    return project


CORPUS_CASES = [
    ("empty file", "c.txt", b"", {}, r"no document of at least 200 characters in c\.txt; lower corpus\.min_chars"),
    ("only short documents", "c.txt", b"tiny\n\nsmall\n", {}, r"no document of at least 200 characters"),
    ("non-UTF-8", "c.txt", "caf\xe9 ".encode("latin1") * 100, {}, r"c\.txt is not UTF-8 \(byte 3\); convert it"),
    ("binary junk", "c.txt", bytes(range(256)) * 4, {}, r"is not UTF-8"),
    ("bad JSON line", "c.jsonl", b'{"text": "ok"}\n{oops\n', {}, r"c\.jsonl:2 is not valid JSON"),
    (
        "missing text field",
        "c.jsonl",
        b'{"body": "x"}\n',
        {},
        r"c\.jsonl:1 has no string field 'text'; set corpus\.text_field",
    ),
    ("missing file", None, b"", {}, r"corpus file .*nope\.txt not found; check corpus\.source"),
    ("unsupported type", "c.csv", b"text\nhello\n", {}, r"unsupported corpus file type '\.csv'"),
    ("bad parquet", "c.parquet", b"PAR1 not really", {}, r"not a readable table"),
]


@pytest.mark.parametrize("case", CORPUS_CASES, ids=[c[0] for c in CORPUS_CASES])
def test_bad_documents_leave_the_old_table_untouched(tmp_path, corpus_project, case):
    _, name, content, extra, pattern = case
    project = tmp_path / "p"
    subprocess.run(["cp", "-r", str(corpus_project), str(project)], check=True)
    source = write_corpus(project, name, content) if name else str(project / "nope.txt")
    make_project(project, deep_merge({"corpus": {"source": source}}, extra))
    before = snapshot(project)
    refused(nla(project, "corpus"), "corpus", pattern)
    assert snapshot(project) == before
    no_temp_files(project)


def test_stages_run_out_of_order_name_the_missing_input(tmp_path):
    project = make_project(tmp_path)
    refused(
        nla(project, "split"), "split", r"data/activations/activations\.parquet not found; run the stage that writes it"
    )
    refused(nla(project, "extract"), "extract", r"data/corpus/documents\.parquet not found")
    assert snapshot(project) == {}


# ----------------------------------------------------------------------------- models (slow: real models)


def tokenizer_dir() -> Path:
    """The embedded model's tokenizer folder (the safetensors cache of the GGUF)."""
    from nla.models import converted_gguf_dir, resolve_source

    return converted_gguf_dir(resolve_source("embedded"))


def save_tiny(folder: Path, config, poison_block: int | None = None) -> Path:
    """A randomly initialised model of `config` plus the embedded tokenizer, saved as a local model folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if poison_block is not None:  # broken weights: every activation after this block is Inf/NaN
        with torch.no_grad():
            model.model.layers[poison_block].mlp.down_proj.weight.fill_(float("inf"))
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer_dir()).save_pretrained(folder)
    return folder


TINY = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    vocab_size=49152,
    max_position_embeddings=256,
    tie_word_embeddings=True,
)


def extract_case(tmp_path: Path, corpus_project: Path, model: dict) -> Path:
    project = tmp_path / "p"
    subprocess.run(["cp", "-r", str(corpus_project), str(project)], check=True)
    return make_project(project, {"model": model})


@pytest.mark.slow
def test_layer_out_of_range(tmp_path, corpus_project):
    project = extract_case(tmp_path, corpus_project, {"layer": 30})
    refused(
        nla(project, "extract"),
        "extract",
        r"layer 30 is out of range for a model with 30 blocks; set model\.layer to 0\.\.29",
    )
    assert not (project / "data/activations").exists() and not (project / "data/work").exists()


@pytest.mark.slow
def test_model_folder_not_found(tmp_path, corpus_project):
    project = extract_case(tmp_path, corpus_project, {"name": "./models/nope"})
    refused(nla(project, "extract"), "extract", r"model directory \./models/nope not found; check model\.name")
    assert not (project / "data/activations").exists()


@pytest.mark.slow
def test_model_whose_blocks_cannot_be_located(tmp_path, corpus_project):
    from transformers import OPTConfig

    opt = OPTConfig(
        hidden_size=32,
        ffn_dim=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=49152,
        word_embed_proj_dim=32,
        max_position_embeddings=256,
    )
    model_dir = save_tiny(tmp_path / "opt", opt)
    project = extract_case(tmp_path, corpus_project, {"name": str(model_dir), "layer": 1})
    refused(
        nla(project, "extract"),
        "extract",
        r"cannot locate the decoder blocks of architecture 'opt' .*; add its block/embedding/norm paths to nla\.models\.ARCHITECTURES",
    )
    assert not (project / "data/activations").exists()


@pytest.mark.slow
def test_non_finite_activations_are_refused_and_never_cached(tmp_path, corpus_project):
    from transformers import LlamaConfig

    model_dir = save_tiny(tmp_path / "llama", LlamaConfig(**TINY, num_key_value_heads=2), poison_block=0)
    project = extract_case(tmp_path, corpus_project, {"name": str(model_dir), "layer": 1})
    refused(nla(project, "extract"), "extract", r"non-finite activations in rows \['doc-\d+:\d+'.*\]; use float32")
    assert not (project / "data/activations").exists()
    assert not list((project / "data/work").rglob("*.parquet"))  # no poisoned shard kept for a resumed run
    no_temp_files(project)


@pytest.mark.slow
def test_huge_and_empty_documents_are_cut_or_dropped(tmp_path):
    """Not an error: a 6 MB document is cut to corpus.max_chars and extract.max_tokens; empty ones are dropped."""
    project = make_project(tmp_path)
    records = [
        {"text": ""},
        {"text": "   "},
        {"text": "word " * 1_200_000},
        {"text": "x" * 2_000_000},
        {"text": GOOD_DOC.decode()},
    ]
    source = write_corpus(project, "c.jsonl", "\n".join(json.dumps(r) for r in records).encode())
    make_project(project, {"corpus": {"source": source, "max_chars": 5000, "foreign": {}}})
    assert nla(project, "corpus").returncode == 0
    from nla.io import read_table

    docs = read_table(project / "data/corpus/documents.parquet")
    assert len(docs) == 3 and docs.text.str.len().max() == 5000
    result = nla(project, "extract")
    assert result.returncode == 0, result.stderr[-2000:]
    rows = read_table(project / "data/activations/activations.parquet", columns=["doc_id", "n_tokens"])
    assert rows.doc_id.nunique() == 3 and rows.n_tokens.max() <= 32


# ----------------------------------------------------------------------------- concurrency

HOLD = """
import sys, time
from nla.lock import workspace_lock
from nla.errors import NLAError
try:
    with workspace_lock(sys.argv[1], "holder"):
        print("locked", flush=True)
        time.sleep(float(sys.argv[2]))
except NLAError as err:
    print(err, file=sys.stderr)
    sys.exit(2)
"""


def hold_lock(root: Path, seconds: float) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(root), str(seconds)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "locked", proc.stderr.read()
    return proc


def test_workspace_lock_is_exclusive_and_released_by_kill_9(tmp_path):
    from nla.errors import NLAError
    from nla.lock import lock_holder, workspace_lock

    holder = hold_lock(tmp_path, 60)
    assert lock_holder(tmp_path) == f"pid {holder.pid}: holder"
    second = subprocess.run([sys.executable, "-c", HOLD, str(tmp_path), "0"], capture_output=True, text=True)
    assert second.returncode == 2
    assert second.stderr.strip().splitlines() == [second.stderr.strip()]
    assert (
        f"another nla run holds the workspace lock {tmp_path / '.nla.lock'} (pid {holder.pid}: holder)" in second.stderr
    )
    holder.kill()  # SIGKILL: no cleanup code runs, the kernel drops the flock
    holder.wait()
    with workspace_lock(tmp_path, "after") as path:
        assert lock_holder(tmp_path) == f"pid {os.getpid()}: after"
        with workspace_lock(tmp_path):  # nested in the holder (and its children): no self-deadlock
            pass
        assert os.environ["NLA_WORKSPACE_LOCK"] == str(path)
    assert "NLA_WORKSPACE_LOCK" not in os.environ
    holder = hold_lock(tmp_path, 60)
    with pytest.raises(NLAError, match="another nla run holds the workspace lock"), workspace_lock(tmp_path):
        pass
    holder.kill()
    holder.wait()


@pytest.mark.slow
def test_two_runs_started_at_once_one_refuses_cleanly(tmp_path, corpus_project):
    """Two real `nla extract` processes in one workspace: one finishes, the other refuses at once."""
    project = tmp_path / "p"
    subprocess.run(["cp", "-r", str(corpus_project), str(project)], check=True)
    make_project(project)
    env = dict(os.environ, TQDM_DISABLE="1")
    procs = [
        subprocess.Popen(
            [NLA, "--params", "params.yaml", "extract"],
            cwd=project,
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for _ in range(2)
    ]
    results = [(p.wait(timeout=300), p.stdout.read(), p.stderr.read(), p.pid) for p in procs]
    codes = sorted(r[0] for r in results)
    assert codes == [0, 2], [(r[0], r[2][-1500:]) for r in results]
    winner = next(r for r in results if r[0] == 0)
    loser = next(r for r in results if r[0] == 2)
    lines = [line for line in loser[2].splitlines() if line.startswith("nla extract: error: ")]
    assert len(lines) == 1 and "another nla run holds the workspace lock" in lines[0] and f"pid {winner[3]}" in lines[0]
    from nla.data import load_rows
    from nla.io import read_table
    from nla.sidecar import read_sidecar

    table = read_table(project / "data/activations/activations.parquet")
    assert len(table) == 8 and read_sidecar(project / "data/activations")["rows"] == 8
    no_temp_files(project)
    assert nla(project, "split").returncode == 0
    assert len(load_rows(project / "data/activations", project / "data/split")) == 8


# ----------------------------------------------------------------------------- a tiny end-to-end project


def copy_project(src: Path, dst: Path) -> Path:
    subprocess.run(["cp", "-a", str(src), str(dst)], check=True)
    return dst


def retune(project: Path, overrides: dict) -> Path:
    """Merge `overrides` into the project's params.yaml."""
    params = project / "params.yaml"
    params.write_text(yaml.safe_dump(deep_merge(yaml.safe_load(params.read_text()), overrides), sort_keys=False))
    return project


def finished_files(folder: Path) -> list[Path]:
    """Files under `folder` that an atomic writer has published (temp names start with '.')."""
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


PIPELINE = {
    "corpus": {"max_docs": 24, "foreign": {}},
    "extract": {"max_tokens": 48, "shard_docs": 8, "positions_per_doc": 2},
    "label": {"backend": "baseline"},
    "injection": {"scale": 1.0},  # set: no α sweep needed before av-sft
    "av_sft": {"batch_size": 4, "max_steps": 4, "lora": {"r": 4, "alpha": 8}},
    "ar_sft": {"batch_size": 4, "epochs": 1.0, "lora": {"r": 4, "alpha": 8}},
    "rl": {
        "steps": 4,
        "prompts_per_step": 2,
        "group_size": 2,
        "max_new_tokens": 8,
        "eval_every": 2,
        "eval_rows": 4,
        "checkpoint_every": 2,
    },
}


def build_data_project(tmp_path_factory) -> Path:
    """corpus → extract → split through the CLI on a tiny random llama (d=32, 3 blocks, layer 1): 48 rows.

    The session fixture `data_project` (conftest.py) builds it once for every module that uses it.
    """
    from transformers import LlamaConfig

    root = tmp_path_factory.mktemp("pipeline")
    model_dir = save_tiny(root / "tiny", LlamaConfig(**TINY, num_key_value_heads=2))
    project = make_project(root / "data-project", {**PIPELINE, "model": {"name": str(model_dir), "layer": 1}})
    for stage in ("corpus", "extract", "split"):
        result = nla(project, stage)
        assert result.returncode == 0, result.stderr[-2000:]
    return project


def build_sft_project(data_project: Path, tmp_path_factory) -> Path:
    """`data_project` + label (baseline) → av_sft → ar_sft (the session fixture `sft_project`, conftest.py)."""
    project = copy_project(data_project, tmp_path_factory.mktemp("sft") / "project")
    for stage in ("label", "av_sft", "ar_sft"):
        run_stage(project, stage)
    return project


@pytest.mark.slow
def test_nan_activations_fail_the_quality_gate(tmp_path, data_project):
    import numpy as np

    from nla.io import read_table, write_table

    project = copy_project(data_project, tmp_path / "p")
    table_path = project / "data/activations/activations.parquet"
    table = read_table(table_path)
    table.at[3, "vector"] = np.full_like(table.vector[3], np.nan)
    table.at[5, "vector"] = np.full_like(table.vector[5], np.inf)
    write_table(table_path, table)
    line = refused(nla(project, "validate-activations"), "validate-activations", r"quality gate 'activations' failed")
    assert table.row_id[3] in line or "finite" in line, line


def stage_outputs(project: Path) -> dict[str, str]:
    return {k: v for k, v in snapshot(project).items() if k.startswith("data/checkpoints")}


SFT_MISMATCH_CASES = [
    (
        "marker not a single token",
        {"injection": {"marker_char": "\u3200"}},
        r"marker '\u3200' is not a single token for this tokenizer; set injection\.marker_char",
    ),
    ("layer differs from the activations", {"model": {"layer": 2}}, r"sidecar layer=1 but the live value is 2"),
    (
        "model changed after extract",
        {"model": {"name": "embedded"}},
        r"data/activations was extracted from dir:.*tiny but the AV base is gguf:.*; use the same model\.name",
    ),
]


@pytest.mark.slow
@pytest.mark.parametrize("case", SFT_MISMATCH_CASES, ids=[c[0] for c in SFT_MISMATCH_CASES])
def test_av_sft_refuses_mismatched_inputs_before_training(tmp_path, sft_project, case):
    _, overrides, pattern = case
    project = retune(copy_project(sft_project, tmp_path / "p"), overrides)
    before = stage_outputs(project)
    refused(run_stage(project, "av_sft", check=False), "av_sft", pattern)
    assert stage_outputs(project) == before  # the previous checkpoint is untouched
    no_temp_files(project / "data/checkpoints")


def edit_sidecar(folder: Path, **changes) -> None:
    path = folder / "nla_meta.yaml"
    meta = yaml.safe_load(path.read_text())
    for dotted, value in changes.items():
        node = meta
        *parents, leaf = dotted.split("__")
        for key in parents:
            node = node[key]
        node[leaf] = value
    path.write_text(yaml.safe_dump(meta, sort_keys=False, allow_unicode=True))


CHECKPOINT_CASES = [
    ("AV sidecar missing", "av_sft", "nla_meta.yaml", None, r"av_sft/nla_meta\.yaml is missing; rebuild"),
    ("AV weights missing", "av_sft", "adapter_model.safetensors", None, r"av_sft.*adapter_model\.safetensors"),
    ("AR sidecar missing", "ar_sft", "nla_meta.yaml", None, r"ar_sft/nla_meta\.yaml is missing; rebuild"),
    ("AR head missing", "ar_sft", "head.safetensors", None, r"ar_sft.*head\.safetensors"),
    (
        "AV marker id differs",
        "av_sft",
        None,
        {"marker__token_id": 5},
        r"sidecar marker token_id=5 but the tokenizer gives",
    ),
    ("AV d_model differs", "av_sft", None, {"d_model": 64}, r"sidecar d_model=64 but the live value is 32"),
    ("AR layer differs", "ar_sft", None, {"layer": 2}, r"layer"),
]


@pytest.mark.slow
@pytest.mark.parametrize("case", CHECKPOINT_CASES, ids=[c[0] for c in CHECKPOINT_CASES])
def test_rl_refuses_broken_checkpoints(tmp_path, sft_project, case):
    """rl loads both SFT checkpoints (load_av / load_ar): a missing file or a disagreeing sidecar is one line."""
    _, checkpoint, missing, changes, pattern = case
    project = copy_project(sft_project, tmp_path / "p")
    folder = project / "data/checkpoints" / checkpoint
    if missing:
        (folder / missing).unlink()
    else:
        edit_sidecar(folder, **changes)
    refused(run_stage(project, "rl", check=False), "rl", pattern)
    assert not (project / "data/checkpoints/rl").exists()
