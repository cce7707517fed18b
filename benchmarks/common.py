"""Shared pieces of the benchmarks: sizes, timing, peak memory, result rows and tables.

Every benchmark times this project's path and the plain transformers baseline in the same
process, on the same model, inputs and batch shapes, and reports their ratio. Only ratios
from one run are comparable; absolute numbers depend on the machine (and, on the shared
CPU machines, on its load).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))

from nla.config import ModelConfig, NLAConfig, NLAError  # noqa: E402


@dataclass(frozen=True)
class Size:
    """Workload of every benchmark at one size. Rollout shapes are (batch, new tokens)."""

    rollouts: tuple[tuple[int, int], ...]
    extract_docs: int
    extract_tokens: int
    extract_batch: int
    ar_rows: int
    ar_batch: int
    rl_prompts: int
    rl_group: int
    rl_new_tokens: int
    rl_steps: int
    lora_r: int
    repeats: int


SIZES = {
    # the 2-core CPU machines: seconds per benchmark
    "small": Size(
        rollouts=((8, 16),),
        extract_docs=16,
        extract_tokens=128,
        extract_batch=8,
        ar_rows=24,
        ar_batch=16,
        rl_prompts=2,
        rl_group=4,
        rl_new_tokens=16,
        rl_steps=2,
        lora_r=16,
        repeats=3,
    ),
    # one H100/H200: the shapes of profiles/gpu.yaml (RL: 16 prompts x 8 samples x 64 tokens)
    "gpu": Size(
        rollouts=((128, 64), (512, 128)),
        extract_docs=300,
        extract_tokens=512,
        extract_batch=128,
        ar_rows=4096,
        ar_batch=256,
        rl_prompts=16,
        rl_group=8,
        rl_new_tokens=64,
        rl_steps=3,
        lora_r=64,
        repeats=3,
    ),
}


@dataclass
class Result:
    """One line of the results table: ours vs the baseline at one configuration."""

    benchmark: str
    config: str
    unit: str
    ours: float
    baseline: float | None
    ours_label: str
    baseline_label: str
    ours_peak_mib: float | None = None
    baseline_peak_mib: float | None = None
    check: str = ""

    @property
    def ratio(self) -> float | None:
        return None if not self.baseline else self.ours / self.baseline

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ratio": self.ratio}


def parser(description: str, sizes: dict[str, Any] = SIZES, default_size: str = "small") -> argparse.ArgumentParser:
    """The options every benchmark shares; `sizes`: a benchmark with its own workloads names them here."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--size", choices=sorted(sizes), default=default_size)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--model", default="embedded", help="model.name: embedded, a .gguf path, a folder or a hub id")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on cuda, fp32 on cpu) | float32 | bfloat16")
    p.add_argument("--corpus", default=None, help="documents (.parquet/.jsonl/.txt); default: data/corpus or embedded")
    p.add_argument("--out", default=None, help="also write the result rows as JSON lines to this file")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (1 gives stable numbers on a shared, oversubscribed machine)",
    )
    return p


def setup(args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)


def model_config(args) -> ModelConfig:
    return ModelConfig(name=args.model, dtype=args.dtype, device=args.device)


def nla_config(args) -> NLAConfig:
    cfg = NLAConfig()
    cfg.model = model_config(args)
    return cfg


def documents(args, n: int) -> list[str]:
    """`n` real documents: --corpus, else data/corpus/documents.parquet, else the embedded corpus."""
    from nla.config import CorpusConfig
    from nla.corpus import load_documents
    from nla.io import read_table

    default = ROOT / "data" / "corpus" / "documents.parquet"
    path = args.corpus or (str(default) if default.exists() else None)
    if path and path.endswith(".parquet"):
        texts = read_table(path).text.tolist()
    else:
        texts = load_documents(CorpusConfig(source=path or "embedded", max_docs=max(n, 1))).text.tolist()
    if not texts:
        raise NLAError(f"no documents in {path or 'the embedded corpus'}; pass --corpus")
    return (texts * (n // len(texts) + 1))[:n]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timing(NamedTuple):
    """Median wall seconds of one side, its peak GPU MiB (None on cpu) and its last output."""

    seconds: float
    peak_mib: float | None
    output: Any


def _run(fn: Callable[[], Any], device: torch.device) -> tuple[float, float | None, Any]:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    seconds = time.perf_counter() - start
    return seconds, torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None, out


def measure(*sides: tuple[Callable[[], Any], int], device: torch.device, warmup: int = 1) -> list[Timing]:
    """Time several sides, each `(fn, repeats)`, with their runs interleaved (A B A B ...).

    Interleaving keeps a machine whose load drifts (shared CPUs, GPU clocks) from favouring
    whichever side runs first. Each side gets `warmup` untimed runs first.
    """
    for fn, _ in sides:
        for _ in range(warmup):
            fn()
    runs: list[list[tuple[float, float | None, Any]]] = [[] for _ in sides]
    for i in range(max(repeats for _, repeats in sides)):
        for k, (fn, repeats) in enumerate(sides):
            if i < repeats:
                runs[k].append(_run(fn, device))
    return [
        Timing(
            statistics.median(r[0] for r in side),
            None if side[0][1] is None else max(r[1] for r in side),
            side[-1][2],
        )
        for side in runs
    ]


def device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def environment() -> dict[str, str]:
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}


def table(results: list[Result]) -> str:
    """A markdown table of the results (ratio = ours / baseline; higher is better for every unit)."""

    def num(x: float | None, digits: int = 1) -> str:
        return "-" if x is None else f"{x:,.{digits}f}"

    lines = [
        "| benchmark | config | unit | ours | baseline | ratio | peak MiB ours / base | check |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        peak = "-" if r.ours_peak_mib is None else f"{num(r.ours_peak_mib, 0)} / {num(r.baseline_peak_mib, 0)}"
        ratio = "-" if r.ratio is None else f"**{r.ratio:.2f}x**"
        lines.append(
            f"| {r.benchmark} | {r.config} | {r.unit} | {num(r.ours)} ({r.ours_label}) | "
            f"{num(r.baseline)} ({r.baseline_label}) | {ratio} | {peak} | {r.check} |"
        )
    return "\n".join(lines)


def extra_sections(path: str | Path) -> str:
    """The `## ` sections of a results file: written by other scripts, kept when run_all rewrites its table."""
    path = Path(path)
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    start = text.find("\n## ")
    return "" if start < 0 else text[start:].strip("\n") + "\n"


def replace_section(path: str | Path, heading: str, body: str) -> None:
    """Write `## heading` + `body` into the markdown file `path` (atomically), replacing that section if present.

    A section runs from its heading to the next `## ` heading or the end of the file; the rest is kept.
    """
    from nla.io import atomic_write_text

    path = Path(path)
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    marker = f"## {heading}\n"
    section = f"{marker}\n{body.strip()}\n"
    if (start := text.find(marker)) >= 0:
        end = text.find("\n## ", start + len(marker))
        rest = "" if end < 0 else text[end:].lstrip("\n")
        text = text[:start] + section + ("\n" + rest if rest else "")
    else:
        text = text.rstrip("\n") + ("\n\n" if text.strip() else "") + section
    atomic_write_text(path, text)


def emit(results: list[Result], out: str | None) -> None:
    """Print the rows as JSON lines and a table; write the JSON lines to `out` (atomically) when given."""
    from nla.io import atomic_write_text

    lines = "".join(json.dumps(r.to_dict()) + "\n" for r in results)
    print(lines + table(results))
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, lines)
