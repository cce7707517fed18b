"""`nla serve` end to end: the real CLI process and HTTP server on the embedded model's tiny AV/AR
(one pair loaded twice, as a and b), and Debian's chromium driven headless through Selenium.

The eval view reads the project's tables: a copy of the split table moves one held-out document
to the `foreign` split (the tiny run has no foreign corpus), and an `--rows` file adds a third set."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from embedded_pipeline import shared_run

from nla.cli import NUMBER_FLAGS, build_parser, main
from nla.data import FOREIGN, SPLITS_FILE, load_rows
from nla.explain import explain
from nla.explorer import ExplorerConfig
from nla.io import read_table, write_table
from nla.serve import is_loopback
from nla.sidecar import sidecar_path

ROOT = Path(__file__).resolve().parents[1]
MAX_NEW = 8  # explanation tokens: enough to tell explanations apart, cheap on the CPU
BATCH = 4  # positions per AV batch: small, so that a five-token text takes two chunks
LIMITS = {"--max-chars": 400, "--max-tokens": 64, "--batch-size": BATCH, "--max-queue": 16}
LIMITS |= {"--corpus-tokens": 6, "--eval-max-rows": 4}
CORPUS = "The Eiffel Tower is in Paris. It was built in 1889.\n\nCats sleep for most of the day, and dogs bark.\n"
TEXT = "The Eiffel Tower is in"


@pytest.fixture(scope="module")
def embedded_run(tmp_path_factory):
    return shared_run(tmp_path_factory)


@pytest.fixture(scope="module")
def server(embedded_run, tmp_path_factory):
    """`nla serve --port 0` as a subprocess; yields its URL once it printed 'ready'."""
    run = embedded_run
    tmp = tmp_path_factory.mktemp("serve")
    (tmp / "corpus.txt").write_text(CORPUS)
    # One held-out document (two rows) becomes the foreign set, as the split stage writes it.
    splits = read_table(Path(run["split"]) / SPLITS_FILE)
    moved = splits[splits.split == "eval"].doc_id.iloc[0]
    splits.loc[splits.doc_id == moved, "split"] = FOREIGN
    write_table(tmp / "split" / SPLITS_FILE, splits)
    shutil.copy(sidecar_path(run["split"]), sidecar_path(tmp / "split"))
    # Any rows with vector, token and prefix make a set; without a split column it is named by the file.
    extra = load_rows(run["act"], run["split"], ["av_sft"]).head(2).drop(columns=["split"])
    write_table(tmp / "extra.parquet", extra.assign(row_id="extra:" + extra.row_id))
    cmd = [sys.executable, "-m", "nla.cli", "serve", "--port", "0", "--device", "cpu"]
    cmd += ["--av", run["av"], "--ar", run["ar"], "--av2", run["av"], "--ar2", run["ar"]]
    cmd += ["--activations", run["act"], "--splits", tmp / "split", "--labels", run["labels"]]
    cmd += ["--rows", tmp / "extra.parquet", "--corpus", tmp / "corpus.txt", "--cache-dir", tmp / "cache"]
    cmd += ["--max-new-tokens", str(MAX_NEW), *(str(x) for kv in LIMITS.items() for x in kv)]
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_WAIT_POLICY": "PASSIVE"}
    proc = subprocess.Popen(
        list(map(str, cmd)), cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines: list[str] = []
    ready = threading.Event()

    def drain():  # keep reading, so the server never blocks on a full pipe
        for line in proc.stdout:
            lines.append(line)
            if "ready in" in line:
                ready.set()
        ready.set()

    threading.Thread(target=drain, daemon=True).start()
    ready.wait(timeout=300)
    match = re.search(r"ready in [\d.]+ s at (http://\S+)/", "".join(lines))
    if match is None:
        proc.kill()
        pytest.fail("nla serve did not start:\n" + "".join(lines)[-3000:])
    yield SimpleNamespace(url=match.group(1), tmp=tmp, run=run, log=lines)
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("nla serve did not stop on Ctrl-C")


def post(server, path: str, body, **kw) -> httpx.Response:
    data = body if isinstance(body, bytes | str) else json.dumps(body)
    return httpx.post(server.url + path, content=data, timeout=300, **kw)


def get(server, path: str, **params) -> httpx.Response:
    return httpx.get(server.url + path, params=params, timeout=60)


def poll(server, path: str, done, timeout: float = 180, **params) -> httpx.Response:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = get(server, path, **params)
        if done(response):
            return response
        time.sleep(0.2)
    pytest.fail(f"{path} did not finish in {timeout} s: {response.text[:300]}")


# ----------------------------------------------------------------------------- CLI


def test_cli_defaults_are_the_explorer_defaults():
    args = vars(build_parser().parse_args(["serve"]))
    defaults = ExplorerConfig()
    for name in NUMBER_FLAGS:
        assert args[name] == getattr(defaults, name), name
    assert args["host"] == "127.0.0.1" and not args["allow_remote"]


def test_refusals_before_any_model_loads(capsys, tmp_path):
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5") and not is_loopback("example.org")
    assert main(["serve", "--host", "0.0.0.0", "--av", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "--allow-remote" in err and len(err.splitlines()) == 1
    assert main(["serve", "--batch-size", "0"]) == 2
    assert "--batch-size must be positive" in capsys.readouterr().err
    assert main(["serve", "--port", "0", "--rows", str(tmp_path / "foreign.parquet")]) == 2
    assert "rows file" in capsys.readouterr().err
    assert main(["serve", "--port", "0", "--corpus", str(tmp_path / "corpus.txt")]) == 2
    assert "corpus" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the JSON API


@pytest.mark.slow
def test_explain_gives_the_records_of_nla_explain(server):
    response = post(server, "/api/explain", {"text": TEXT, "positions": "last"})
    assert response.status_code == 200, response.text
    [got] = response.json()["records"]
    [want] = [
        r.to_dict()
        for r in explain(TEXT, None, server.run["av"], server.run["ar"], max_new_tokens=MAX_NEW, device="cpu")
    ]
    assert set(got) == set(want) and want["token_ids"] and want["raw"]
    exact = [k for k in want if k not in ("fve", "cos")]  # text, position, token, explanation, closed, token_ids, raw
    assert {k: got[k] for k in exact} == {k: want[k] for k in exact}
    assert got["fve"] == pytest.approx(want["fve"], abs=1e-4) and got["cos"] == pytest.approx(want["cos"], abs=1e-4)


@pytest.mark.slow
def test_every_token_with_predictions_and_neighbours(server):
    body = post(server, "/api/explain", {"text": TEXT}).json()
    assert body["complete"] and body["positions"] == [r["position"] for r in body["records"]] == list(range(6))
    assert "".join(t["token"] for t in body["tokens"]) == TEXT and not any(t["special"] for t in body["tokens"])
    assert body["compare"] == body["records"]  # pair b is the same checkpoint, batched the same way
    assert all(r["text"] == TEXT and r["explanation"] and r["fve"] is not None for r in body["records"])
    for detail in body["details"]:
        probs = [t["p"] for t in detail["top"]]
        assert len(probs) == 5 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
        cos = [n["cos"] for n in detail["neighbours"]]
        assert len(cos) == 3 and cos == sorted(cos, reverse=True)
        assert all(n["split"] in ("av_sft", "ar_sft", "rl") and n["label"] for n in detail["neighbours"])
    # what the subject model predicts after "The Eiffel Tower is" is a real distribution, not noise
    assert body["details"][4]["top"][0]["p"] > 0.05


@pytest.mark.slow
def test_positions_and_refusals(server):
    some = post(server, "/api/explain", {"text": TEXT, "positions": [0, -1]}).json()
    assert [r["position"] for r in some["records"]] == [0, 5]

    refusals = {
        422: [
            {"text": "   "},
            {"txt": TEXT},
            {"text": TEXT, "positions": [99]},
            {"text": TEXT, "positions": "every"},
            {"text": TEXT, "extra": 1},
            {"text": TEXT, "time_limit": 10_000},
            "not json",
        ],
        413: [{"text": "x" * 401}, {"text": "cat " * 90}, {"text": TEXT, "positions": [0] * 65}, b" " * 10_000],
    }
    for status, bodies in refusals.items():
        for body in bodies:
            response = post(server, "/api/explain", body)
            assert response.status_code == status, (body if isinstance(body, dict) else body[:20], response.text)
            message = response.json()["error"]
            assert message and "\n" not in message
    assert "the limit is 64" in post(server, "/api/explain", {"text": "cat " * 90}).json()["error"]
    assert get(server, "/api/jobs/explain-999999").status_code == 404
    assert httpx.get(server.url + "/api/info", headers={"Host": "attacker.example"}).status_code == 400


@pytest.mark.slow
def test_ten_parallel_requests_are_queued_and_batched(server):
    texts = [f"Request number {i}" for i in range(10)]
    with ThreadPoolExecutor(10) as pool:
        responses = list(pool.map(lambda t: post(server, "/api/explain", {"text": t, "positions": "last"}), texts))
    assert [r.status_code for r in responses] == [200] * 10
    for i, (text, response) in enumerate(zip(texts, responses, strict=True)):
        [record] = response.json()["records"]
        assert record["text"] == text and record["token"].strip() == str(i) and record["explanation"]
    stats = get(server, "/api/info").json()["stats"]
    assert stats["max_jobs_per_chunk"] >= 2  # requests shared AV batches

    # More explain requests than --max-queue at once: the extra one is refused, nothing crashes.
    body = {"text": "Queue", "positions": "last", "time_limit": 2}
    with ThreadPoolExecutor(17) as pool:
        responses = list(pool.map(lambda _: post(server, "/api/jobs", body), range(17)))
    assert sorted(r.status_code for r in responses) == [202] * 16 + [503]
    assert "16 requests are already waiting" in next(r for r in responses if r.status_code == 503).json()["error"]
    for job in (r.json() for r in responses if r.status_code == 202):
        poll(server, f"/api/jobs/{job['id']}", lambda r: r.json()["status"] in ("done", "timeout"))


@pytest.mark.slow
def test_progress_and_the_time_cap(server):
    text = "One two three four five"  # five tokens: chunks of 3 and 2
    job = post(server, "/api/jobs", {"text": text})
    assert job.status_code == 202
    seen = []
    final = poll(
        server, f"/api/jobs/{job.json()['id']}", lambda r: seen.append(r.json()) or r.json()["status"] == "done"
    )
    done = [s["done"] for s in seen]
    total = final.json()["total"]
    assert done == sorted(done) and done[-1] == total == 5
    assert 3 in done  # chunk by chunk: 3, then 2
    partial = next(s for s in seen if s["done"] == 3)
    assert [r["position"] for r in partial["result"]["records"]] == [0, 1, 2]  # the explained prefix, while running
    assert len(final.json()["result"]["records"]) == total

    # A request past its time limit gets no further chunk and answers 504 with what it managed.
    capped = post(server, "/api/explain", {"text": text, "time_limit": 0.001})
    assert capped.status_code == 504
    assert re.search(r"0 of 5 positions explained", capped.json()["error"])
    job = post(server, "/api/jobs", {"text": text, "time_limit": 0.001}).json()
    state = poll(server, f"/api/jobs/{job['id']}", lambda r: r.json()["status"] not in ("queued", "running")).json()
    assert state["status"] == "timeout" and state["code"] == 504 and state["result"]["records"] == []


@pytest.mark.slow
def test_eval_rows(server):
    table = poll(server, "/api/rows", lambda r: r.status_code != 202).json()
    # held-out rows capped at --eval-max-rows, the foreign document's two rows, the --rows file's two
    assert table["splits"] == {"eval": 4, FOREIGN: 2, "extra": 2}
    assert {"gold", "a_explanation", "a_fve", "a_fve_gold", "b_explanation", "b_fve"} <= set(table["columns"])
    assert set(table["mean_fve_by_split"]) == {"eval", FOREIGN, "extra"}
    rows = get(server, "/api/rows", sort="a_fve", order="desc").json()["rows"]
    fve = [r["a_fve"] for r in rows]
    assert len(rows) == 8 and fve == sorted(fve, reverse=True)
    assert all((r["gold"] is None) == (r["split"] == "extra") for r in rows)  # table sets carry their labels
    assert all((r["a_fve_gold"] is None) == (r["split"] == "extra") for r in rows)
    foreign = [r for r in rows if r["split"] == FOREIGN]
    mean = sum(r["a_fve"] for r in foreign) / len(foreign)
    assert table["mean_fve_by_split"][FOREIGN]["a"] == pytest.approx(mean)
    word = foreign[0]["token"].strip() or foreign[0]["gold"].split()[0]
    filtered = get(server, "/api/rows", q=word).json()
    assert filtered["total"] >= 1
    assert all(
        any(word.lower() in str(r[c] or "").lower() for c in r if isinstance(r[c], str)) for r in filtered["rows"]
    )
    only = get(server, "/api/rows", split=FOREIGN).json()
    assert only["total"] == 2 and {r["split"] for r in only["rows"]} == {FOREIGN}
    bad = get(server, "/api/rows", sort="nope")
    assert bad.status_code == 422 and "cannot sort by 'nope'" in bad.json()["error"]
    assert list((server.tmp / "cache").glob("rows-*.json"))  # cached for the next start


@pytest.mark.slow
def test_search_explains_the_corpus_on_demand(server):
    state = poll(server, "/api/search", lambda r: r.json()["status"] == "ready", q="").json()
    assert state["docs_total"] == state["docs_done"] == 2
    assert len(list((server.tmp / "cache").glob("corpus-*/doc-*.json"))) == 2
    cached = json.loads(sorted((server.tmp / "cache").glob("corpus-*/doc-*.json"))[0].read_text())
    word = re.findall(r"\w+", cached["records"][-1]["explanation"])[-1]
    found = get(server, "/api/search", q=word, limit=500).json()
    assert (cached["doc"], cached["records"][-1]["position"]) in {
        (m["doc"], m["record"]["position"]) for m in found["matches"]
    }
    for match in found["matches"]:
        record = match["record"]
        assert re.search(rf"(?<!\w){re.escape(word)}(?!\w)", record["explanation"], re.IGNORECASE)
        assert record["text"] in CORPUS and record["token"] in record["text"]
        assert (match["before"] + record["token"]).strip() in record["text"]
    assert get(server, "/api/search", q="zzzqqq-not-a-word").json()["total"] == 0
    assert get(server, "/api/search", q="x" * 201).status_code == 413


# ----------------------------------------------------------------------------- the page, in a real browser


def _chromium():
    """Selenium driving Debian's chromium (apt: chromium, chromium-driver) headless."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is missing: pip install -e '.[test]'")
    from selenium.webdriver.chrome.service import Service

    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (browser and driver):
        pytest.skip("no chromium/chromedriver on PATH: apt-get install chromium chromium-driver (.ci/run does)")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1300,900",
    ):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(driver), options=options)


@pytest.mark.slow
def test_the_page_in_chromium(server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    browser = _chromium()
    try:
        wait = WebDriverWait(browser, 120)
        browser.get(server.url + "/")
        wait.until(lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1")
        browser.find_element(By.ID, "text").send_keys(TEXT)
        browser.find_element(By.ID, "explain").click()
        wait.until(lambda b: b.find_element(By.ID, "results").get_attribute("data-job"))
        wait.until(lambda b: b.find_element(By.ID, "explain").is_enabled())  # the page saw the job finish
        job = browser.find_element(By.ID, "results").get_attribute("data-job")
        api = get(server, f"/api/jobs/{job}").json()["result"]  # what the page was sent
        chips = '.pair[data-pair="a"] .chip:not(.pending):not(.special)'
        assert len(browser.find_elements(By.CSS_SELECTOR, chips)) == len(api["records"]) == 6
        assert len(browser.find_elements(By.CSS_SELECTOR, '.pair[data-pair="b"] .chip')) == len(api["tokens"])
        record = api["records"][3]
        browser.find_elements(By.CSS_SELECTOR, chips)[3].click()
        wait.until(lambda b: b.find_element(By.ID, "explanation-a").text == record["explanation"])
        assert browser.find_element(By.ID, "detail-position").text == str(record["position"])
        assert f"{record['fve']:.3f}" in browser.find_element(By.ID, "scores-a").text
        assert browser.find_element(By.ID, "explanation-b").text == api["compare"][3]["explanation"]
        assert len(browser.find_elements(By.CSS_SELECTOR, "#top li")) == 5
        assert len(browser.find_elements(By.CSS_SELECTOR, "#neighbours li")) == 3
        assert browser.find_element(By.ID, "error").get_attribute("hidden") is not None
        browser.save_screenshot(str(tmp_path / "serve.png"))

        browser.find_element(By.CSS_SELECTOR, '.tab[data-view="eval"]').click()
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#eval-table tbody tr")) == 8)
        Select(browser.find_element(By.ID, "eval-split")).select_by_value(FOREIGN)  # the set filter
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#eval-table tbody tr")) == 2)
        sets = {td.text for td in browser.find_elements(By.CSS_SELECTOR, "#eval-table tbody td.split")}
        assert sets == {FOREIGN}
        browser.save_screenshot(str(tmp_path / "serve_eval.png"))
    finally:
        browser.quit()
    print(f"screenshots: {tmp_path}")
