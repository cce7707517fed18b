"""Seconds per text: `nla serve` over HTTP vs the Python API in-process and the one-shot `nla explain`.

A researcher who wants every token of a text explained has three ways to get it: the explorer
(`nla serve`, models resident, `POST /api/explain`), the Python API in a process they keep
(`nla.explain.explain(text, "all", nla=NLA.load(...))`, what `nla explain` calls), or the CLI
run once per text (`nla explain --all --json`, which loads the models every time). This
benchmark starts the real server (a subprocess on loopback, a free port) in the project folder,
so it finds the training index and the eval rows as a user's would, and times on one fixed
text of `--tokens` subject tokens:

- the server's start-up (process start to its "ready" line) and the in-process load
  (`NLA.load` + the subject model);
- the first request to each (cold) and then `--requests` warm ones, interleaved
  (server, API, server, API ...), reported as median, min and max;
- `--cli-runs` whole `nla explain` processes (start-up and model loading included).

The server runs with its defaults (`--batch-size 32`, 48 new tokens, greedy); the API with
the same batch size (`--api-batch-size`; its own default, 16, cuts 40 positions into three AV
batches where the server makes two) and the CLI with the only one it has (16). The check: the
server's records and the CLI's equal the API's (text, position, token, explanation, closed,
token ids and raw completion exactly; FVE and cosine within 1e-4); any difference stops the
benchmark. Ratio = server seconds / baseline seconds: lower is better, below 1 the server is
faster. Wall seconds depend on what else the machine runs: the load average is recorded.

    python benchmarks/bench_serve.py                         # the project's RL pair, else its SFT pair
    python benchmarks/bench_serve.py --av data/checkpoints/av_sft --ar data/checkpoints/ar_sft
    python benchmarks/bench_serve.py --project ../run --results-dir benchmarks   # + section of results-cpu.md
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from common import ROOT, Result, device_label, emit, environment, parser, setup, table

from nla.errors import NLAError
from nla.explain import default_checkpoints, explain, load_nla
from nla.io import atomic_write_text
from nla.models import resolve_device

# Real prose, public domain: the close of Lincoln's annual message to Congress, 1 December 1862.
PASSAGE = (
    "Fellow-citizens, we cannot escape history. We of this Congress and this administration will be "
    "remembered in spite of ourselves. No personal significance or insignificance can spare one or another "
    "of us. The fiery trial through which we pass will light us down, in honor or dishonor, to the latest "
    "generation. We say we are for the Union. The world will not forget that we say this."
)
EXACT = ("text", "position", "token", "explanation", "closed", "token_ids", "raw")  # fve, cos: within TOLERANCE
TOLERANCE = 1e-4
SECTION = "## `nla serve`"  # heading of this benchmark's section in results-<device>.md


def options(p) -> None:
    """This benchmark's options (also offered by run_all.py)."""
    p.add_argument(
        "--project",
        default=str(ROOT),
        help="folder `nla serve` and `nla explain` run in: its data/ gives the default checkpoints and the "
        "training index (default: this checkout)",
    )
    p.add_argument("--av", help="AV checkpoint (default: the project's RL AV if trained, else its SFT AV)")
    p.add_argument("--ar", help="AR checkpoint (default: the one beside the default AV)")
    p.add_argument("--tokens", type=int, default=40, help="subject tokens of the text, every one explained")
    p.add_argument("--requests", type=int, default=5, help="warm requests to the server and calls of the API")
    p.add_argument("--cli-runs", type=int, default=3, help="whole `nla explain` processes")
    p.add_argument("--api-batch-size", type=int, default=32, help="the API's batch (default: the server's)")


def fixed_text(tokenizer, n: int) -> str:
    """The longest word prefix of PASSAGE with exactly `n` tokens, none of them special (so `n` positions)."""
    words = PASSAGE.split()
    for k in range(1, len(words) + 1):
        text = " ".join(words[:k])
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        if len(ids) == n and not set(ids) & set(tokenizer.all_special_ids):
            return text
        if len(ids) > n:
            break
    raise NLAError(f"no word prefix of the passage has exactly {n} tokens for this tokenizer; pick another --tokens")


def differences(got: list[dict], want: list[dict]) -> list[str]:
    """Where two lists of `nla explain --json` records differ (empty: equal)."""
    if len(got) != len(want):
        return [f"{len(got)} records instead of {len(want)}"]
    out = []
    for g, w in zip(got, want, strict=True):
        for key in EXACT:
            if g[key] != w[key]:
                out.append(f"position {w['position']}: {key} {g[key]!r} != {w[key]!r}")
        for key in ("fve", "cos"):
            if (g[key] is None) != (w[key] is None) or (w[key] is not None and abs(g[key] - w[key]) > TOLERANCE):
                out.append(f"position {w['position']}: {key} {g[key]} != {w[key]}")
    return out


def require_equal(side: str, got: list[dict], want: list[dict]) -> None:
    if diff := differences(got, want):
        raise AssertionError(f"{side} records differ from the API's in {len(diff)} fields; first: {diff[0]}")


class Server:
    """`nla serve --port 0` as a subprocess; `ready_s`: seconds from its start to its 'ready' line."""

    def __init__(self, cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 600):
        start = time.perf_counter()
        self.proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        ready = threading.Event()

        def drain() -> None:  # keep reading, so the server never blocks on a full pipe
            for line in self.proc.stdout:
                self.lines.append(line)
                if "ready in" in line:
                    ready.set()
            ready.set()

        threading.Thread(target=drain, daemon=True).start()
        ready.wait(timeout)
        self.ready_s = time.perf_counter() - start
        match = re.search(r"ready in ([\d.]+) s at (http://\S+)/", "".join(self.lines))
        if match is None:
            self.stop()
            raise NLAError("nla serve did not start: " + " | ".join(line.strip() for line in self.lines[-5:]))
        self.own_load_s, self.url = float(match.group(1)), match.group(2)

    def explain(self, text: str) -> tuple[float, dict]:
        """Wall seconds of one POST /api/explain (connect, queue, explain, JSON) and its answer."""
        body = json.dumps({"text": text}).encode()
        request = urllib.request.Request(self.url + "/api/explain", body, {"Content-Type": "application/json"})
        start = time.perf_counter()
        try:
            with urllib.request.urlopen(request, timeout=600) as response:
                answer = json.loads(response.read())
        except urllib.error.HTTPError as err:
            raise NLAError(f"/api/explain answered {err.code}: {err.read()[:300].decode(errors='replace')}") from None
        return time.perf_counter() - start, answer

    def info(self) -> dict:
        with urllib.request.urlopen(self.url + "/api/info", timeout=60) as response:
            return json.loads(response.read())

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)  # uvicorn shuts down cleanly on Ctrl-C
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def shown(path: Path, project: Path) -> Path:
    """`path` relative to the project folder when it lies inside it (as `nla serve` names its defaults)."""
    return path.relative_to(project) if path.is_relative_to(project) else path


def spread(xs: list[float]) -> str:
    return f"median of {len(xs)}, min {min(xs):.2f}, max {max(xs):.2f}"


@dataclass
class ServeRun:
    """Every figure of one benchmark run (seconds) and what it ran on."""

    text: str
    tokens: int
    av: Path
    ar: Path | None
    stage: str | None
    index_rows: int | None
    device: str
    server_ready_s: float
    server_own_load_s: float
    api_load_s: float
    server_cold_s: float
    api_cold_s: float
    server_s: list[float]
    api_s: list[float]
    cli_s: list[float]
    api_batch: int
    load_before: tuple[float, float, float]  # os.getloadavg(): 1, 5, 15 min
    load_during: list[float]  # the 1-min load after each round of warm runs
    load_after: tuple[float, float, float]

    def results(self) -> list[Result]:
        config = f"{self.tokens}-token text, every token, <=48 new tokens, {self.stage or 'AV'} pair"
        check = f"records equal the API's: {self.tokens}/{self.tokens}"
        load = f"1-min load {self.load_before[0]:.2f} before, max {max(self.load_during):.2f} during"
        median = statistics.median
        return [
            Result(
                "nla serve",
                config + ", warm",
                "s/text",
                median(self.server_s),
                median(self.api_s),
                f"POST /api/explain, {spread(self.server_s)}",
                f"Python API in-process, batch {self.api_batch}, {spread(self.api_s)}",
                check=f"{check}; {load}",
            ),
            Result(
                "nla serve",
                config + ", first request",
                "s/text",
                self.server_cold_s,
                self.api_cold_s,
                "first POST after ready",
                "first explain() after NLA.load",
                check=check,
            ),
            Result(
                "nla serve",
                config + ", vs one process per text",
                "s/text",
                median(self.server_s),
                median(self.cli_s),
                f"POST /api/explain, {spread(self.server_s)}",
                f"nla explain --all, whole process, {spread(self.cli_s)}",
                check=f"CLI {check}",
            ),
            Result(
                "nla serve",
                "start-up: models loaded and ready",
                "s",
                self.server_ready_s,
                self.api_load_s,
                f"process start to 'ready'; it counts {self.server_own_load_s:.1f}",
                "NLA.load + subject model, in-process",
            ),
        ]

    def section(self, command: str) -> str:
        """This run as a markdown section of results-<device>.md."""
        env = environment()
        ar = "none" if self.ar is None else f"`{self.ar}`"
        index = "no training index" if self.index_rows is None else f"training index of {self.index_rows} rows"
        return "\n".join(
            [
                f"{SECTION}: seconds per text",
                "",
                f"- command: `{command}`",
                f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {self.device}; python {env['python']}, "
                f"torch {env['torch']}, transformers {env['transformers']}",
                f"- load average (1, 5, 15 min) before: {' '.join(f'{x:.2f}' for x in self.load_before)}, "
                f"after: {' '.join(f'{x:.2f}' for x in self.load_after)}; 1 min after each round of warm runs: "
                f"{' '.join(f'{x:.2f}' for x in self.load_during)}",
                f"- checkpoints: AV `{self.av}` (stage {self.stage}), AR {ar}; server with its {index}",
                f'- text ({self.tokens} tokens, every one explained): "{self.text}"',
                "- Ratio = server seconds / baseline seconds, measured in the same run (lower is better: "
                "below 1 the server is faster). Server: its defaults (batch 32); API: batch "
                f"{self.api_batch}; CLI: batch 16 (it has no batch option).",
                "",
                table(self.results()),
                "",
            ]
        )


def measure_serve(args) -> ServeRun:
    project = Path(args.project).resolve()
    if args.av is not None:
        av, ar = Path(args.av).resolve(), None if args.ar is None else Path(args.ar).resolve()
    else:
        av, default_ar = default_checkpoints(project)
        ar = Path(args.ar).resolve() if args.ar is not None else default_ar
    if not av.is_dir():
        raise NLAError(f"no AV checkpoint at {av}; train one (dvc repro) or pass --av and --ar")
    device = str(resolve_device(args.device))
    # The subprocesses run this checkout's nla: PYTHONPATH, and `python -P` so that a project folder
    # that is itself a checkout (cwd, first on sys.path under -m) does not shadow it.
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_WAIT_POLICY": "PASSIVE"}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)  # the subprocesses get the threads this process has
    checkpoints = ["--av", str(av), *(["--ar", str(ar)] if ar is not None else [])]
    load_before = os.getloadavg()

    api_load_s, nla = timed(lambda: load_nla(av, ar, device=device))
    api_load_s += timed(nla.subject)[0]  # the subject model loads on first use: part of loading
    text = fixed_text(nla.subject()[1], args.tokens)

    def api() -> list[dict]:
        return [r.to_dict() for r in explain(text, "all", nla=nla, batch_size=args.api_batch_size)]

    with tempfile.TemporaryDirectory() as cache:
        serve = [sys.executable, "-P", "-m", "nla", "serve", "--port", "0", "--device", device, *checkpoints]
        server = Server([*serve, "--cache-dir", cache], project, env)
        try:
            info = server.info()
            server_cold_s, served = server.explain(text)
            api_cold_s, want = timed(api)
            require_equal("the server's", served["records"], want)
            server_s, api_s, cli_s, load_during = [], [], [], []
            cli = [sys.executable, "-P", "-m", "nla", "explain", "--all", "--json", *checkpoints, text]
            for i in range(max(args.requests, args.cli_runs)):
                if i < args.requests:
                    seconds, served = server.explain(text)
                    server_s.append(seconds)
                    require_equal("the server's", served["records"], want)
                    seconds, got = timed(api)
                    api_s.append(seconds)
                    require_equal("a repeated API call's", got, want)
                if i < args.cli_runs:
                    seconds, done = timed(
                        lambda: subprocess.run(cli, cwd=project, env=env, capture_output=True, text=True)
                    )
                    if done.returncode != 0:
                        raise NLAError(f"nla explain failed ({done.returncode}): {done.stderr.strip()[-300:]}")
                    cli_s.append(seconds)
                    require_equal("nla explain's", [json.loads(line) for line in done.stdout.splitlines()], want)
                load_during.append(os.getloadavg()[0])
        finally:
            server.stop()
    pair = info["checkpoints"][0]
    return ServeRun(
        text=text,
        tokens=args.tokens,
        av=shown(av, project),
        ar=None if ar is None else shown(ar, project),
        stage=pair["stage"],
        index_rows=None if info["index"] is None else info["index"]["rows"],
        device=device_label(resolve_device(device)),
        server_ready_s=server.ready_s,
        server_own_load_s=server.own_load_s,
        api_load_s=api_load_s,
        server_cold_s=server_cold_s,
        api_cold_s=api_cold_s,
        server_s=server_s,
        api_s=api_s,
        cli_s=cli_s,
        api_batch=args.api_batch_size,
        load_before=load_before,
        load_during=load_during,
        load_after=os.getloadavg(),
    )


def run(args, size) -> list[Result]:
    return measure_serve(args).results()


def write_section(path: Path, section: str) -> None:
    """Put `section` into `path` in place of an earlier one of this benchmark (at the end if there is none)."""
    old = path.read_text() if path.is_file() else ""
    start = old.find(SECTION)
    if start < 0:
        atomic_write_text(path, (old.rstrip() + "\n\n" if old.strip() else "") + section)
        return
    end = old.find("\n## ", start + len(SECTION))
    atomic_write_text(path, old[:start] + section + (old[end + 1 :] if end >= 0 else ""))


if __name__ == "__main__":
    p = parser(__doc__.splitlines()[0])
    options(p)
    p.add_argument("--results-dir", help="also write the table into DIR/results-<device>.md (its `nla serve` section)")
    args = p.parse_args()
    setup(args)
    measured = measure_serve(args)
    emit(measured.results(), args.out)
    if args.results_dir:
        path = Path(args.results_dir) / f"results-{resolve_device(args.device).type}.md"
        write_section(path, measured.section(f"python {shlex.join(['benchmarks/bench_serve.py', *sys.argv[1:]])}"))
        print(f"wrote {path}")
