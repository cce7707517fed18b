"""The label stage: response parsing, the three backends, faults, caching and resume.

The OpenAI-compatible backend is exercised against a real `llm-katan` server (echo backend)
started on a free loopback port: the echo answers with the row's own user turn, so a user
template that contains an `<analysis>` block makes every answer parse. Its fault injection
(HTTP 500s, 429 after N requests, 503 above a concurrency limit) drives the retry paths; its
/stats endpoint counts the requests the server really received.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nla.config import NLAConfig
from nla.data import EXPLANATIONS_FILE
from nla.errors import NLAError
from nla.io import read_table, write_table
from nla.label import run_label
from nla.label.backends import BackendStats
from nla.label.backends.baseline import baseline_response
from nla.label.backends.local import common_prefix_len, decode_batch
from nla.label.backends.openai import OpenAIClient, retry_delay
from nla.label.parse import parse_response
from nla.label.prompt import chat_messages, context_of, fill
from nla.label.stage import FAILED_FILE, STATS_FILE
from nla.provenance import beside
from nla.sidecar import make_meta, read_sidecar, write_sidecar

RANGES = NLAConfig().injection.marker_ranges
MARKER = "㈱"  # U+3231, inside the default marker range
SECRET = "sk-nla-test-0123456789abcdef"  # a fake API key that must never reach a file
KEY_ENV = "NLA_TEST_LABEL_KEY"
ECHO_TEMPLATE = "<analysis>\n1. The text reads: {context}\n2. The final token is {token}.\n</analysis>"

TEXTS = [
    "The central bank raised interest rates again on Tuesday, citing stubborn inflation in the services sector",
    "Heavy rain flooded the valley overnight and emergency crews evacuated hundreds of residents from their homes",
    "The striker scored twice in the second half as the home side beat the league leaders in front of",
    "Mix the flour with the softened butter, then add two eggs and a pinch of salt before you",
    "Scientists found that the new vaccine reduced infections among older adults by almost half in",
    f"The company {MARKER} said its quarterly profit rose sharply thanks to strong sales of electric",
    "Firefighters battled a bushfire west of the city as strong winds pushed the flames towards",
    "The minister told parliament that the budget would include new funding for rural hospitals and",
    "Voters in the northern district queued for hours outside polling stations as the election",
    "The court ruled that the company had breached its contract with the union and ordered it to",
    "Astronomers observed a distant galaxy whose light took more than ten billion years to reach",
    "The orchestra opened its season with a symphony that the composer wrote shortly before his",
]
SPLITS = ["av_sft", "av_sft", "av_sft", "ar_sft", "ar_sft", "av_sft", "eval", "eval", "rl", "rl", "av_sft", "ar_sft"]
N_LABELED = 20  # 12 docs × 2 rows, minus the 4 rl rows
MARKER_ROWS = {"doc-05:4", "doc-05:10"}  # contexts that contain MARKER


def activation_row(d: int, words: list[str], n: int, vector: np.ndarray) -> dict:
    """One row of the extract table: document `d` read after its first `n` words."""
    return {
        "row_id": f"doc-{d:02d}:{n - 1}",
        "doc_id": f"doc-{d:02d}",
        "position": n - 1,
        "n_tokens": len(words),
        "token_id": n,
        "token": " " + words[n - 1],
        "prefix": " ".join(words[:n]),
        "norm": float(np.linalg.norm(vector)),
        "vector": vector,
    }


def write_dataset(root: Path) -> tuple[Path, Path]:
    """An activations + splits pair in the extract/split formats: 2 rows per document."""
    rows, split_rows = [], []
    rng = np.random.default_rng(0)
    for d, (text, split) in enumerate(zip(TEXTS, SPLITS, strict=True)):
        words = text.split(" ")
        for n in (5 if d == 5 else 7, 11):  # doc-05:4 ends "...company ㈱ said its": the marker is a recent word
            rows.append(activation_row(d, words, n, rng.standard_normal(8).astype(np.float32)))
            split_rows.append({"row_id": rows[-1]["row_id"], "doc_id": f"doc-{d:02d}", "split": split})
    act, spl = root / "act", root / "split"
    write_table(act / "activations.parquet", pd.DataFrame(rows))
    write_sidecar(act, make_meta("nla_dataset", "extract", base_model="test-model", d_model=8, layer=0, rows=len(rows)))
    write_table(spl / "splits.parquet", pd.DataFrame(split_rows))
    return act, spl


@pytest.fixture
def dataset(tmp_path):
    return write_dataset(tmp_path)


def outputs(out: Path) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Explanations, failed rows, and the stats: the counts of the output plus the run's facts (provenance)."""
    stats = json.loads((out / STATS_FILE).read_text())
    return (
        read_table(out / EXPLANATIONS_FILE),
        read_table(out / FAILED_FILE),
        {**stats, **json.loads(beside(out).read_text())},
    )


def assert_partition(out: Path, expected_rows: int = N_LABELED) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Every requested row is in exactly one of explanations/failed, and the stats agree."""
    good, bad, stats = outputs(out)
    ids = list(good.row_id) + list(bad.row_id)
    assert len(ids) == len(set(ids)) == expected_rows
    assert stats["labeled"] == len(good) and stats["failed"] == len(bad) and stats["rows"] == expected_rows
    assert sum(stats["failed_by_reason"].values()) == len(bad)
    assert not set(good.split) & {"rl"}
    return good, bad, stats


# ----------------------------------------------------------------------------- parsing and cleaning

GOOD_CASES = [
    (
        '<analysis>\nA news report about rates.\nThe final token "in" starts a place.\n</analysis>',
        ["A news report about rates.", 'The final token "in" starts a place.'],
    ),
    (
        "Sure!\n<analysis>\n- **Topic:** a cricket match\n- *Final token*: `the`, a determiner\n</analysis>\nHope it helps.",
        ["Topic: a cricket match", "Final token: the, a determiner"],
    ),
    (
        "<analysis>1. A recipe. 2. Quantities are listed. 3. The final token is a number.</analysis>",
        ["A recipe.", "Quantities are listed.", "The final token is a number."],
    ),
    (
        '<ANALYSIS>\r\n\r\n  1) flood news  \r\n  2) evacuation\r\n  3) "from" wants a place\r\n</ANALYSIS>',
        ["flood news", "evacuation", '"from" wants a place'],
    ),
    (
        "<analysis>\n### Features\n* Feature 1: court ruling\n• Feature 2: breach of contract\n---\n"
        '▪ final token "to"\n</analysis>',
        ["court ruling", "breach of contract", 'final token "to"'],
    ),
    (
        "<analysis>an example answer\nand more</analysis> then <analysis>\n(a) the real answer\n(b) its last token\n"
        "</analysis>",
        ["the real answer", "its last token"],
    ),  # the last block wins (a labeler quoting the example)
    (
        "<analysis><analysis>\n<b>Topic</b>: a court case<|im_end|>\n- ends </explanation>with <analy<i>sis a verb\n"
        "</analysis>",
        ["Topic: a court case", "ends with a verb"],
    ),  # tags, tag fragments and special tokens never reach an explanation
]


@pytest.mark.parametrize("raw, features", GOOD_CASES)
def test_parse_cleans_formatting_to_plain_features(raw, features):
    parsed = parse_response(raw, 2, RANGES)
    assert parsed.reason is None
    assert parsed.explanation.split("\n") == features and parsed.n_features == len(features)


@pytest.mark.parametrize(
    "raw, reason",
    [
        ("The text is about rates; the next word is a place.", "no_analysis"),
        ("<analysis>\nA report about rates.\nThe final token", "unclosed_analysis"),
        ("<analysis>\n\n - \n***\n</analysis>", "empty"),
        ("<analysis>Just one feature here.</analysis>", "too_few_features"),
        (f'<analysis>\nA report about {MARKER} rates.\nThe final token is "in".\n</analysis>', "marker_leak"),
        (None, "no_analysis"),
        (b"<analysis>bytes</analysis>", "no_analysis"),
    ],
)
def test_parse_rejects_malformed_responses_with_a_reason(raw, reason):
    parsed = parse_response(raw, 2, RANGES)
    assert parsed.explanation is None and parsed.reason == reason


def test_marker_char_option_and_min_features_are_honoured():
    raw = "<analysis>\nfirst ☃ feature\nsecond feature\n</analysis>"
    assert parse_response(raw, 2, RANGES).reason is None
    assert parse_response(raw, 2, RANGES, marker_char="☃").reason == "marker_leak"
    assert parse_response(raw, 3, RANGES).reason == "too_few_features"


@settings(max_examples=300, deadline=None)
@given(
    st.text(alphabet=st.characters(codec="utf-8"), max_size=300)
    | st.builds(
        lambda a, b, c: f"{a}<analysis>{b}</analysis>{c}",
        st.text(max_size=40),
        st.text(max_size=200),
        st.text(max_size=40),
    )
)
def test_parser_never_raises_and_accepts_only_clean_text(raw):
    parsed = parse_response(raw, 2, RANGES)
    assert (parsed.explanation is None) != (parsed.reason is None)
    if parsed.explanation is not None:
        lines = parsed.explanation.split("\n")
        assert len(lines) == parsed.n_features >= 2 and all(line.strip() == line and line for line in lines)
        assert "<analysis>" not in parsed.explanation.lower() and "</analysis>" not in parsed.explanation.lower()
        assert not any(a <= ord(c) <= b for c in parsed.explanation for a, b in RANGES)


def test_context_is_the_end_of_the_prefix_and_the_token_is_shown_quoted():
    prefix = " ".join(f"w{i}" for i in range(100))
    ctx = context_of(prefix, 8)
    assert ctx.startswith("…") and ctx.endswith("w99") and len(ctx[1:].split()) == 6  # 8 tokens ≈ 6 words
    assert context_of("short text", 64) == "short text"
    user = fill('T: "{context}" F: {token}', "a {token} b", " in")
    assert user == 'T: "a {token} b" F: " in"'  # braces inside the text survive; spaces in the token are visible
    messages = chat_messages(NLAConfig(), "some text", " in")
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert messages[-1]["content"].endswith('Final token: " in"')


def test_retry_delay_honours_retry_after_then_backs_off_exponentially():
    assert retry_delay(0, 1.0, {"retry-after": "3"}) == 3.0
    date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 5))
    assert 3.5 < retry_delay(0, 1.0, {"retry-after": date}) <= 5.0
    assert retry_delay(0, 1.0, {"retry-after": "99999"}) == 120.0  # capped
    assert 4.0 <= retry_delay(2, 1.0, {"retry-after": "soon"}) <= 5.0  # unparseable: backoff 1·2², +≤25% jitter
    assert 0.5 <= retry_delay(0, 0.5, None) <= 0.625


# ----------------------------------------------------------------------------- baseline backend and the stage


def test_baseline_stage_is_deterministic_and_complete(dataset, tmp_path):
    act, spl = dataset
    cfg = NLAConfig()
    cfg.label.backend = "baseline"
    cfg.label.topic_words, cfg.label.before_words = 3, 4  # a context long enough to hold the leaked marker
    cfg.label.cache_dir = str(tmp_path / "cache")
    first = run_label(cfg, act, spl, tmp_path / "a")
    second = run_label(cfg, act, spl, tmp_path / "b")
    pd.testing.assert_frame_equal(first, second)
    good, bad, stats = assert_partition(tmp_path / "a")
    assert set(bad.row_id) == {"doc-05:4"} and set(bad.reason) == {"marker_leak"}
    assert MARKER in bad.raw.iloc[0]
    assert (good.n_features == 3).all() and (good.backend == "baseline").all()
    assert good.set_index("row_id").loc["doc-00:6"].explanation == (
        "Topic: central, bank, raised.\n"
        'Before: "bank raised interest rates".\n'
        'Final token: "again" (the start of a word).'
    )
    assert stats["labeled_by_split"] == {"av_sft": 9, "ar_sft": 6, "eval": 4}
    meta = read_sidecar(tmp_path / "a")
    assert meta["stage"] == "label" and meta["d_model"] == 8 and meta["base_model"] == "test-model"
    assert meta["labeler"]["backend"] == "baseline" and meta["rows"] == len(good)
    assert meta["labeler"]["user_template"] == cfg.label.user_template
    assert "(punctuation)" in baseline_response("Rates rose.", ".", 3, 4)


def test_bad_label_splits_are_refused(dataset, tmp_path):
    act, spl = dataset
    cfg = NLAConfig()
    cfg.label.backend = "baseline"
    cfg.label.splits = ["av_sft", "training"]
    with pytest.raises(NLAError, match=r"label\.splits=.*must be a non-empty subset"):
        run_label(cfg, act, spl, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- openai backend on a real server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Katan:
    """A real llm-katan server (echo backend) on a free loopback port, with its own stats file.

    Its dashboard middleware stays on: that is what counts every request (errors included) in /stats.
    """

    def __init__(self, tmp: Path, *flags: str):
        self.port = free_port()
        exe = Path(sys.executable).with_name("llm-katan")
        self.log = open(tmp / f"katan-{self.port}.log", "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [
                str(exe),
                "--model",
                "x",
                "--backend",
                "echo",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--stats-file",
                str(tmp / f"katan-{self.port}.json"),
                "--log-level",
                "warning",
                *flags,
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.time() + 45
        while time.time() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"llm-katan did not start: {(tmp / f'katan-{self.port}.log').read_text()[-500:]}")

    def requests(self) -> int:
        return httpx.get(self.url + "/stats", timeout=5).json()["total"]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)
        self.log.close()


def openai_cfg(base_url: str, cache: Path, concurrency: int, max_retries: int) -> NLAConfig:
    cfg = NLAConfig()
    cfg.label.backend = "openai"
    cfg.label.cache_dir = str(cache)
    cfg.label.user_template = ECHO_TEMPLATE
    o = cfg.label.openai
    o.base_url, o.model, o.api_key_env = base_url + "/v1", "x", KEY_ENV
    o.concurrency, o.max_retries, o.backoff_s, o.timeout_s = concurrency, max_retries, 0.005, 10.0
    return cfg


def assert_no_secret(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


@pytest.fixture(scope="module")
def faulty(tmp_path_factory):
    """40% of requests fail with HTTP 500; more than 2 requests in flight get HTTP 503."""
    server = Katan(
        tmp_path_factory.mktemp("faulty"), "--error-rate", "0.4", "--max-inflight", "2", "--latency-ms", "40"
    )
    yield server
    server.stop()


@pytest.mark.slow
def test_openai_backend_under_faults_bounded_retried_cached(dataset, tmp_path, monkeypatch, faulty):
    act, spl = dataset
    monkeypatch.setenv(KEY_ENV, SECRET)
    cfg = openai_cfg(faulty.url, tmp_path / "cache", concurrency=2, max_retries=12)
    start = faulty.requests()
    run_label(cfg, act, spl, tmp_path / "out")
    good, bad, stats = assert_partition(tmp_path / "out")
    assert set(bad.row_id) == MARKER_ROWS and set(bad.reason) == {"marker_leak"}
    assert (good.n_features == 2).all()
    row = good.set_index("row_id").loc["doc-00:6"]
    assert (
        row.explanation == 'The text reads: The central bank raised interest rates again\nThe final token is " again".'
    )
    assert stats["retries"] > 0 and stats["status_codes"].get("500", 0) == stats["retries"]
    assert "503" not in stats["status_codes"] and stats["peak_inflight"] == 2  # the bound held, and was used
    assert stats["requests"] == faulty.requests() - start == N_LABELED + stats["retries"]  # the server's own count

    # A rerun sends nothing: every answer comes from the cache.
    before = faulty.requests()
    run_label(cfg, act, spl, tmp_path / "again")
    assert faulty.requests() == before
    assert outputs(tmp_path / "again")[2]["cache_hits"] == N_LABELED
    pd.testing.assert_frame_equal(outputs(tmp_path / "out")[0], outputs(tmp_path / "again")[0])

    # Positive control: 4 concurrent clients exceed the server's limit of 2, get 503s and still finish.
    over = openai_cfg(faulty.url, tmp_path / "cache-over", concurrency=4, max_retries=12)
    over.label.openai.max_consecutive_failures, over.label.openai.max_failure_rate = 0, 1.0  # most requests fail here
    run_label(over, act, spl, tmp_path / "over")
    _, _, over_stats = assert_partition(tmp_path / "over")
    assert over_stats["status_codes"].get("503", 0) > 0 and over_stats["labeled"] == N_LABELED - 2

    meta = read_sidecar(tmp_path / "out")
    assert meta["labeler"]["api_key_env"] == KEY_ENV and meta["labeler"]["base_url"] == cfg.label.openai.base_url
    assert_no_secret(tmp_path)


@pytest.mark.slow
def test_openai_rows_failing_after_retries_are_recorded_then_resumed(dataset, tmp_path, monkeypatch, faulty):
    act, spl = dataset
    monkeypatch.setenv(KEY_ENV, SECRET)
    limited = Katan(tmp_path, "--rate-limit-after", "3")  # every request after the 3rd gets HTTP 429
    try:
        cfg = openai_cfg(limited.url, tmp_path / "cache", concurrency=3, max_retries=1)
        cfg.label.openai.max_consecutive_failures = 0  # breaker off: this test is about rows failing one by one
        cfg.label.openai.max_failure_rate = 1.0
        run_label(cfg, act, spl, tmp_path / "out")
        good, bad, stats = assert_partition(tmp_path / "out")
        answered = N_LABELED - int((bad.reason == "request_failed:http_429").sum())
        assert answered == 3 and stats["status_codes"]["429"] == 2 * (N_LABELED - 3)
        monkeypatch.delenv(KEY_ENV)
        with pytest.raises(NLAError, match=f"HTTP 401: the server refused the API key; set {KEY_ENV}"):
            run_label(cfg, act, spl, tmp_path / "nokey")
        monkeypatch.setenv(KEY_ENV, SECRET)
    finally:
        limited.stop()
    # Another server, same cache: only the rows that failed are requested (plus that server's own retries).
    cfg.label.openai.base_url, cfg.label.openai.max_retries = faulty.url + "/v1", 12
    start = faulty.requests()
    run_label(cfg, act, spl, tmp_path / "out")
    good, bad, stats = assert_partition(tmp_path / "out")
    assert (
        stats["cache_hits"] == 3 and faulty.requests() - start == stats["requests"] == N_LABELED - 3 + stats["retries"]
    )
    assert set(bad.row_id) == MARKER_ROWS
    assert_no_secret(tmp_path)


def test_openai_client_waits_as_retry_after_says(tmp_path):
    """A server that answers 429 + `Retry-After: 1` once: the client waits a second, not its tiny backoff."""
    seen: list[float] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            seen.append(time.monotonic())
            if len(seen) == 1:
                self.send_response(429)
                self.send_header("Retry-After", "1")
                body = b"{}"
            else:
                self.send_response(200)
                body = json.dumps({"choices": [{"message": {"content": "<analysis>a\nb</analysis>"}}]}).encode()
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        cfg = openai_cfg(f"http://127.0.0.1:{server.server_port}", tmp_path, concurrency=1, max_retries=3)
        stats = BackendStats()
        result = OpenAIClient(cfg, stats).complete({"model": "x", "messages": []})
    finally:
        server.shutdown()
    assert result.raw == "<analysis>a\nb</analysis>" and stats.retries == 1
    assert seen[1] - seen[0] >= 0.95


# ----------------------------------------------------------------------------- local backend on the embedded model


@pytest.mark.slow
def test_shared_prefix_decoding_matches_plain_generate(embedded):
    model, tokenizer, _ = embedded
    cfg = NLAConfig()
    prompts = [
        tokenizer.apply_chat_template(
            chat_messages(cfg, context_of(t, 48), " " + t.split()[-1]), tokenize=False, add_generation_prompt=True
        )
        + "<analysis>\n"
        for t in TEXTS[:2]
    ]
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    shared = common_prefix_len(ids) - 1
    assert shared > 100  # the system prompt and few-shot turns are shared
    from transformers import DynamicCache

    prefix = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=torch.tensor([ids[0][:shared]]), past_key_values=prefix, use_cache=True)
        outs = decode_batch(
            model,
            prefix,
            shared,
            [i[shared:] for i in ids],
            10,
            0.0,
            tokenizer.pad_token_id,
            {tokenizer.eos_token_id},
            tokenizer,
            None,
        )
        for row, out in zip(ids, outs, strict=True):
            ref = model.generate(
                torch.tensor([row]),
                attention_mask=torch.ones(1, len(row), dtype=torch.long),
                max_new_tokens=10,
                do_sample=False,
            )[0, len(row) :].tolist()
            assert out == ref[: len(out)] and len(out) >= 5


@pytest.mark.slow
def test_local_backend_labels_and_resumes_from_its_cache(dataset, tmp_path):
    act, spl = dataset
    cfg = NLAConfig()
    cfg.label.backend = "local"
    cfg.label.splits = ["eval"]  # 4 rows, in 2 batches
    cfg.label.batch_size = 2
    cfg.label.cache_dir = str(tmp_path / "cache")
    run_label(cfg, act, spl, tmp_path / "out")
    good, bad, stats = assert_partition(tmp_path / "out", expected_rows=4)
    assert stats["backend"] == "local" and stats["generated_tokens"] > 0 and stats["cache_hits"] == 0
    assert stats["model"].startswith("gguf:SmolLM2") and len(good) >= 2
    for text in good.explanation:
        assert "<" not in text and len(text.split("\n")) >= 2
    cached = sorted((tmp_path / "cache" / "local").rglob("*.json"))
    assert len(cached) == 4 and all(json.loads(p.read_text())["response"].startswith("<analysis>") for p in cached)

    run_label(cfg, act, spl, tmp_path / "again")  # everything cached: no model, no decoding
    again = outputs(tmp_path / "again")
    assert again[2]["cache_hits"] == 4 and again[2]["generated_tokens"] == 0
    pd.testing.assert_frame_equal(good, again[0])

    cached[0].unlink()  # as if a crash had lost one row: only its batch is decoded again, to the same answer
    run_label(cfg, act, spl, tmp_path / "resumed")
    resumed = outputs(tmp_path / "resumed")
    assert resumed[2]["cache_hits"] == 3 and resumed[2]["generated_tokens"] > 0
    pd.testing.assert_frame_equal(good, resumed[0])
    pd.testing.assert_frame_equal(bad, resumed[1])
    meta = read_sidecar(tmp_path / "out")
    assert meta["labeler"]["backend"] == "local" and meta["labeler"]["few_shot"]


def test_grounded_labels_name_the_subject_models_own_predictions(tmp_path):
    """The grounded labeler writes the paper's format: the context lines asked for, a line of the model's
    next tokens (which a copy of the context cannot contain), the final token last; the stage refuses to
    run without the predictions."""
    from nla.label.backends import BACKENDS, BackendStats
    from nla.label.backends.grounded import grounded_response

    text, predicted = "The central bank raised interest rates again", [" in", " on", "in", " this"]
    parsed = parse_response(grounded_response(text, " again", predicted, 0, 1), 2, RANGES)
    assert parsed.reason is None
    assert parsed.explanation.splitlines() == [
        'Before: "rates".',
        'Next likely: "in", "on", "this".',
        'Final token "again".',
    ]
    lines = parse_response(grounded_response(text, " again", predicted, 3, 2), 2, RANGES).explanation.splitlines()
    assert lines[:2] == ["Topic: central, bank, raised.", 'Before: "interest rates".']
    assert (
        len(parse_response(grounded_response(text, " again", predicted, 0, 0), 1, RANGES).explanation.splitlines()) == 2
    )
    results = BACKENDS["grounded"](NLAConfig(), ["a b c"], [" c"], BackendStats(), [[" d", " e"]])
    assert '"d", "e"' in results[0].raw
    with pytest.raises(NLAError, match="extract.top_next"):
        BACKENDS["grounded"](NLAConfig(), ["a b c"], [" c"], BackendStats(), None)
