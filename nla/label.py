"""The label stage: warm-start explanations for activation rows.

The paper's warm start: a labeler LLM reads the text up to and including the position and
writes the 2-3 features a language model would use to predict what comes next (the last one
about the final token) inside `<analysis>…</analysis>`. Every backend returns a raw response
per row and one parser judges them all: a row either becomes a cleaned, plain-text
explanation (one feature per line) or is recorded as failed with its reason. Nothing is lost.

Backends (`label.backend`):
- local: a chat model through transformers (the embedded SmolLM2 by default). The system
  prompt and few-shot turns are the same for every row, so their KV cache is computed once
  and shared; each batch only prefills its rows' own text, then decodes greedily, dropping
  rows from the batch as soon as they close `</analysis>`.
- openai: any /v1/chat/completions server, with bounded concurrency, timeouts, retries
  (exponential backoff, `Retry-After` honoured) and an on-disk cache, so a rerun sends no
  request twice.
- baseline: deterministic labels from the text itself (topic words, the last few words, the
  final token), in the same format; a floor to beat and a fast stand-in for tests.

Responses of the local and openai backends are cached one file per request (atomic writes),
keyed by a hash of everything that determines the answer, so a crashed run resumes.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import random
import re
import threading
import time
from collections import Counter
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm.auto import tqdm

from nla.config import ModelConfig, NLAConfig, NLAError
from nla.extract import SPLIT_NAMES, load_rows
from nla.io import atomic_dir, atomic_write_text, write_json, write_table
from nla.sidecar import make_meta, read_sidecar, write_sidecar

log = logging.getLogger(__name__)

EXPLANATIONS_FILE = "explanations.parquet"
FAILED_FILE = "failed.parquet"
STATS_FILE = "label_stats.json"
ANALYSIS_OPEN, ANALYSIS_CLOSE = "<analysis>", "</analysis>"
FEATURE_SEP = "\n"  # an explanation is its features, one per line
RAW_KEEP = 1000  # characters of a failed row's raw response kept in failed.parquet
WORDS_PER_TOKEN = 0.75  # context truncation counts words, so every backend sees the same text
MAX_RETRY_DELAY_S = 120.0

# Two worked examples shown to the local and openai labelers before each row (few-shot turns).
FEW_SHOT = (
    (
        "…the coast guard said the fishing boat ignored warning shots and was spotted near the island by",
        " by",
        'A news report about a coast guard chasing a boat.\nWhere the boat was seen.\nThe final token "by" asks who '
        "spotted it.",
    ),
    (
        "Preheat the oven to 180 degrees. Mix the flour, sugar and two",
        " two",
        'A cooking recipe listing ingredients.\nThe final token "two" is a number; a food like "eggs" comes next.',
    ),
)

# ----------------------------------------------------------------------------- prompt


def context_of(prefix: str, context_tokens: int) -> str:
    """The end of `prefix` (≈ context_tokens tokens, counted as words), with '…' when cut."""
    words = re.findall(r"\s*\S+", prefix)
    keep = max(1, math.ceil(context_tokens * WORDS_PER_TOKEN))
    if len(words) <= keep:
        return prefix.strip()
    return "…" + "".join(words[-keep:]).lstrip()


def fill(template: str, context: str, token: str) -> str:
    """The user turn: slots filled in one pass, so braces inside the text are left alone."""
    values = {"context": context, "token": json.dumps(token, ensure_ascii=False)}  # quotes show the token's spaces
    return re.sub(r"\{(context|token)\}", lambda m: values[m.group(1)], template)


def chat_messages(cfg: NLAConfig, context: str, token: str) -> list[dict[str, str]]:
    """System instruction, the few-shot turns, then this row's text and final token."""
    lab = cfg.label
    messages = [{"role": "system", "content": lab.instruction}]
    for ex_context, ex_token, ex_answer in FEW_SHOT:
        messages.append({"role": "user", "content": fill(lab.user_template, ex_context, ex_token)})
        messages.append({"role": "assistant", "content": f"{ANALYSIS_OPEN}\n{ex_answer}\n{ANALYSIS_CLOSE}"})
    messages.append({"role": "user", "content": fill(lab.user_template, context, token)})
    return messages


# ----------------------------------------------------------------------------- parsing and cleaning

_ANALYSIS = re.compile(r"<analysis>((?:(?!<analysis>).)*?)</analysis>", re.S | re.I)  # innermost when repeated
# Tags never belong in a plain-text explanation: special tokens (<|im_end|>), html/xml tags (</explanation> would end
# the AV's target early), and fragments of the prompts' own tags, even unclosed.
_TAG = re.compile(r"<\|[^<>|]*\|>|</?\s*[A-Za-z_][\w:-]*\s*/?>|</?\s*(?:analysis|explanation|concept)\b", re.I)
# One leading bullet: dashes, stars, dots and box/shape glyphs, "1." "(2)" "b)" "Feature 3:" "> ".
_BULLET = re.compile(
    r"^(?:[-*+•‣∙·–—>\u25a0-\u25ff]+|\(?\d{1,2}[.):]|\(?[a-zA-Z][.)]|feature\s*\d+\s*[:.)\-]?)\s+", re.I
)
_HEADING = re.compile(r"^\s*#{1,6}\s")  # a markdown heading names a section, it is not a feature
_INLINE_NUMBER = re.compile(r"(?:^|\s)\(?\d{1,2}[.)]\s+")  # "1. foo 2. bar" written on one line
_MARKDOWN = re.compile(r"\*\*|__|`+|~~|(?<!\w)[*_](?=\w)|(?<=\w)[*_](?!\w)")


@dataclass(frozen=True)
class Parsed:
    explanation: str | None  # the features, one per line; None when malformed
    n_features: int
    reason: str | None  # why the row was dropped; None when it is well-formed


def clean_features(body: str) -> list[str]:
    """Plain-text features of an analysis body: tags, bullets, numbering, markdown and blank lines removed."""
    lines = [line for line in body.replace("\r", "\n").split("\n") if line.strip() and not _HEADING.match(line)]
    if len(lines) == 1 and len(_INLINE_NUMBER.findall(lines[0])) >= 2:
        lines = [part for part in _INLINE_NUMBER.split(lines[0]) if part.strip()]
    features = []
    for line in lines:
        text = line
        while (untagged := _TAG.sub("", text)) != text:  # repeated: removing one tag may join another
            text = untagged
        text = text.strip()
        while (stripped := _BULLET.sub("", text, count=1)) != text:
            text = stripped.strip()
        text = " ".join(_MARKDOWN.sub("", text).split())
        if re.search(r"\w", text):  # separator lines ("---", "***") carry no feature
            features.append(text)
    return features


def has_marker_char(text: str, ranges: list[tuple[int, int]], marker_char: str | None = None) -> bool:
    return any(any(a <= ord(c) <= b for a, b in ranges) or c == marker_char for c in text)


def parse_response(
    raw: object, min_features: int, marker_ranges: list[tuple[int, int]], marker_char: str | None = None
) -> Parsed:
    """Explanation of one labeler response, or the reason it is malformed. Never raises.

    Reasons: no_analysis, unclosed_analysis, empty, marker_leak (a marker-range character would add
    injection sites in the AV prompt), too_few_features (fewer than `min_features`).
    """
    if not isinstance(raw, str):
        return Parsed(None, 0, "no_analysis")
    blocks = _ANALYSIS.findall(raw)
    if not blocks:
        reason = "unclosed_analysis" if ANALYSIS_OPEN in raw.lower() else "no_analysis"
        return Parsed(None, 0, reason)
    features = clean_features(blocks[-1])  # the last block: a labeler that quotes the example answers after it
    if not features:
        return Parsed(None, 0, "empty")
    explanation = FEATURE_SEP.join(features)
    if has_marker_char(explanation, marker_ranges, marker_char):
        return Parsed(None, len(features), "marker_leak")
    if len(features) < min_features:
        return Parsed(None, len(features), "too_few_features")
    return Parsed(explanation, len(features), None)


# ----------------------------------------------------------------------------- on-disk cache


class ResponseCache:
    """One JSON file per request, named by the hash of what determines the answer."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    @staticmethod
    def key(request: dict[str, Any]) -> str:
        return hashlib.sha256(json.dumps(request, sort_keys=True, ensure_ascii=False).encode()).hexdigest()

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> str | None:
        try:
            response = json.loads(self._path(key).read_text(encoding="utf-8"))["response"]
        except (OSError, ValueError, KeyError, TypeError):  # missing or unreadable: ask again
            return None
        return response if isinstance(response, str) else None

    def put(self, key: str, response: str) -> None:
        atomic_write_text(self._path(key), json.dumps({"response": response}, ensure_ascii=False))


# ----------------------------------------------------------------------------- backends


@dataclass
class Result:
    """A backend's answer for one row: the raw response, or why no response came."""

    raw: str | None = None
    error: str | None = None


@dataclass
class BackendStats:
    cache_hits: int = 0
    requests: int = 0
    retries: int = 0
    status_codes: Counter = field(default_factory=Counter)
    peak_inflight: int = 0
    generated_tokens: int = 0
    model: str = ""


# -- baseline

_STOPWORDS_TEXT = (
    "a about above after again against all also am an and any are as at be because been before being below between "
    "both but by can could did do does doing down during each few for from further had has have having he her here "
    "hers him his how i if in into is it its itself just me more most my no nor not now of off on once only or other "
    "our ours out over own said same says she should so some such than that the their theirs them then there these "
    "they this those through to too under until up very was we were what when where which while who whom why will "
    "with would you your new one two three last first year years told mr mrs ms"
)
STOPWORDS = frozenset(_STOPWORDS_TEXT.split())


def token_kind(token: str) -> str:
    body = token.strip()
    if not body:
        return "whitespace"
    if body.isdigit():
        return "a number"
    if not any(c.isalnum() for c in body):
        return "punctuation"
    if token[0].isspace():
        return "the start of a word"
    return "the middle of a word"


def baseline_response(context: str, token: str) -> str:
    """A deterministic analysis from the text: topic words, the last few words, the final token."""
    words = re.findall(r"[A-Za-z][A-Za-z'-]+", context)
    content = [w.lower() for w in words if len(w) > 2 and w.lower() not in STOPWORDS]
    topics = [w for w, _ in Counter(content).most_common(3)]  # ties keep first-seen order
    recent = " ".join(context.split()[-5:-1]) or "(none)"
    # Compact on purpose: short labels are easier for the AR to read back (measured: the AR's FVE on
    # terse "Final token ... Context ..." labels was far higher than on sentence-style ones).
    features = [
        f"Topic: {', '.join(topics)}." if topics else "Topic: none yet.",
        f'Before: "{recent}".',
        f"Final token: {json.dumps(token.strip() or token, ensure_ascii=False)} ({token_kind(token)}).",
    ]
    return f"{ANALYSIS_OPEN}\n" + "\n".join(f"- {f}" for f in features) + f"\n{ANALYSIS_CLOSE}"


def label_baseline(cfg: NLAConfig, contexts: list[str], tokens: list[str], stats: BackendStats) -> list[Result]:
    stats.model = "baseline"
    return [
        Result(raw=baseline_response(c, t))
        for c, t in tqdm(zip(contexts, tokens, strict=True), total=len(contexts), desc="label (baseline)", unit="row")
    ]


# -- openai-compatible server

RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
FATAL_STATUS = {
    401: "the server refused the API key; set {env} to a valid key",
    403: "the server refused the API key; set {env} to a valid key",
    404: "not found; check label.openai.base_url (it usually ends in /v1) and label.openai.model",
}


def retry_delay(attempt: int, backoff_s: float, headers: dict[str, str] | None = None) -> float:
    """`Retry-After` (seconds or an HTTP date) when the server sent one, else backoff·2^attempt with jitter."""
    value = (headers or {}).get("retry-after")
    if value:
        try:
            delay = float(value)
        except ValueError:
            try:
                delay = parsedate_to_datetime(value).timestamp() - time.time()
            except (TypeError, ValueError, IndexError, OverflowError):
                delay = None
        if delay is not None and math.isfinite(delay):
            return min(max(delay, 0.0), MAX_RETRY_DELAY_S)
    return min(backoff_s * 2**attempt * (1 + 0.25 * random.random()), MAX_RETRY_DELAY_S)


def redact_url(url: str) -> str:
    """A URL without user:password@, for sidecars and logs."""
    return re.sub(r"^(\w+://)[^/@]*@", r"\1", url)


class OpenAIClient:
    """POSTs chat completions with retries; thread-safe; tracks what it did in `stats`."""

    def __init__(self, cfg: NLAConfig, stats: BackendStats):
        import httpx

        self.o = cfg.label.openai
        self.url = self.o.base_url.rstrip("/") + "/chat/completions"
        self.stats = stats
        self.lock = threading.Lock()
        self.inflight = 0
        self.any_success = False
        key = os.environ.get(self.o.api_key_env)
        if not key:
            log.warning("%s is not set; sending requests without an API key", self.o.api_key_env)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        limits = httpx.Limits(max_connections=self.o.concurrency, max_keepalive_connections=self.o.concurrency)
        self.http = httpx.Client(headers=headers, timeout=self.o.timeout_s, limits=limits)
        self.httpx = httpx

    def _post(self, body: dict[str, Any]):
        with self.lock:
            self.inflight += 1
            self.stats.requests += 1
            self.stats.peak_inflight = max(self.stats.peak_inflight, self.inflight)
        try:
            return self.http.post(self.url, json=body)
        finally:
            with self.lock:
                self.inflight -= 1

    def complete(self, body: dict[str, Any]) -> Result:
        """The answer text, or the reason of the last failure once retries are spent."""
        for attempt in range(self.o.max_retries + 1):
            headers = None
            try:
                response = self._post(body)
            except self.httpx.TimeoutException:
                reason = "timeout"
            except self.httpx.RequestError as err:  # refused, reset, protocol errors
                reason = "connection_error"
                if attempt == self.o.max_retries and not self.any_success:
                    raise NLAError(
                        f"cannot reach {redact_url(self.url)} ({type(err).__name__}); start the server or "
                        f"fix label.openai.base_url"
                    ) from None
            else:
                with self.lock:
                    self.stats.status_codes[str(response.status_code)] += 1
                if response.status_code == 200:
                    try:
                        content = response.json()["choices"][0]["message"]["content"]
                    except (ValueError, KeyError, IndexError, TypeError):
                        content = None
                    if isinstance(content, str):
                        self.any_success = True
                        return Result(raw=content)
                    reason = "bad_response"
                else:
                    reason = f"http_{response.status_code}"
                    if response.status_code in FATAL_STATUS:
                        hint = FATAL_STATUS[response.status_code].format(env=self.o.api_key_env)
                        raise NLAError(f"{redact_url(self.url)} answered HTTP {response.status_code}: {hint}")
                    if response.status_code not in RETRY_STATUS:
                        return Result(error=reason)  # e.g. 400: asking again gives the same answer
                    headers = {k.lower(): v for k, v in response.headers.items()}
            if attempt < self.o.max_retries:
                with self.lock:
                    self.stats.retries += 1
                time.sleep(retry_delay(attempt, self.o.backoff_s, headers))
        return Result(error=reason)


def label_openai(cfg: NLAConfig, contexts: list[str], tokens: list[str], stats: BackendStats) -> list[Result]:
    """Each row once through the server (or the cache), at most `concurrency` requests at a time."""
    o, lab = cfg.label.openai, cfg.label
    stats.model = o.model
    cache = ResponseCache(Path(lab.cache_dir) / "openai")
    bodies = [
        {
            "model": o.model,
            "messages": chat_messages(cfg, c, t),
            "temperature": lab.temperature,
            "max_tokens": o.max_tokens,
        }
        for c, t in zip(contexts, tokens, strict=True)
    ]
    keys = [cache.key(b) for b in bodies]  # the request body alone: the same request at another URL is reused
    results: list[Result | None] = [None] * len(bodies)
    todo = []
    for i, key in enumerate(keys):
        if (hit := cache.get(key)) is not None:
            results[i] = Result(raw=hit)
            stats.cache_hits += 1
        else:
            todo.append(i)
    if todo:
        client = OpenAIClient(cfg, stats)

        def one(i: int) -> None:
            result = client.complete(bodies[i])
            if result.raw is not None:
                cache.put(keys[i], result.raw)  # as soon as it arrives: a crash loses only in-flight requests
            results[i] = result

        bar = tqdm(total=len(bodies), initial=len(bodies) - len(todo), desc=f"label (openai {o.model})", unit="row")
        with bar, client.http, ThreadPoolExecutor(max_workers=o.concurrency) as pool:
            pending = {pool.submit(one, i) for i in todo}
            while pending:
                done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                for future in done:
                    if future.exception() is not None:  # NLAError: a misconfiguration that every row would hit
                        for other in pending:
                            other.cancel()
                        raise future.exception()
                bar.update(len(done))
                bar.set_postfix(retries=stats.retries, cached=stats.cache_hits)
    return [r if r is not None else Result(error="not_run") for r in results]


# -- local chat model


def local_model_config(cfg: NLAConfig) -> ModelConfig:
    """The subject model's config when the labeler is the same model, else a fresh one for `local_model`."""
    dtype = cfg.model.dtype if cfg.label.dtype == "auto" else cfg.label.dtype
    if cfg.label.local_model == cfg.model.name:
        return cfg.model.model_copy(update={"dtype": dtype})
    return ModelConfig(name=cfg.label.local_model, dtype=dtype, device=cfg.model.device)


def common_prefix_len(sequences: list[list[int]]) -> int:
    first = sequences[0]
    n = min(len(s) for s in sequences)
    for s in sequences[1:]:
        n = next((i for i in range(n) if s[i] != first[i]), n)
    return n


def label_local(cfg: NLAConfig, contexts: list[str], tokens: list[str], stats: BackendStats) -> list[Result]:
    """Batched greedy (or sampled) decoding with a shared-prefix KV cache; finished rows cached per batch."""
    from nla.models import load_tokenizer, resolve_source

    lab = cfg.label
    mcfg = local_model_config(cfg)
    source = resolve_source(mcfg.name, mcfg.gguf_file, mcfg.revision)
    stats.model = source.fingerprint
    tokenizer = load_tokenizer(source)
    if not getattr(tokenizer, "chat_template", None):
        raise NLAError(f"label.local_model '{lab.local_model}' has no chat template; use a chat/instruct model")
    prompts = [
        tokenizer.apply_chat_template(chat_messages(cfg, c, t), tokenize=False, add_generation_prompt=True)
        + f"{ANALYSIS_OPEN}\n"
        for c, t in zip(contexts, tokens, strict=True)
    ]  # prefilled: the model only writes features
    cache = ResponseCache(Path(lab.cache_dir) / "local")
    keys = [
        cache.key(
            {
                "model": source.fingerprint,
                "dtype": mcfg.dtype,
                "prompt": p,
                "max_new_tokens": lab.max_new_tokens,
                "temperature": lab.temperature,
                "seed": lab.seed,
            }
        )
        for p in prompts
    ]
    results: list[Result | None] = [Result(raw=hit) if (hit := cache.get(k)) is not None else None for k in keys]
    stats.cache_hits = sum(r is not None for r in results)
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    # Batches are fixed over all rows, shortest first (little padding), so a resumed run decodes each missing
    # row in the same batch, with the same shared prefix, as an uninterrupted run: identical outputs.
    order = sorted(range(len(ids)), key=lambda i: (len(ids[i]), i))
    batches = [order[s : s + lab.batch_size] for s in range(0, len(order), lab.batch_size)]
    todo = [(n, batch) for n, batch in enumerate(batches) if any(results[i] is None for i in batch)]
    if todo:
        generate_local(cfg, mcfg, tokenizer, ids, keys, todo, results, cache, stats)
    return results  # type: ignore[return-value]


def generate_local(
    cfg: NLAConfig,
    mcfg: ModelConfig,
    tokenizer,
    ids: list[list[int]],
    keys: list[str],
    todo: list[tuple[int, list[int]]],
    results: list[Result | None],
    cache: ResponseCache,
    stats: BackendStats,
) -> None:
    import torch
    from transformers import DynamicCache

    from nla.models import load_model

    lab = cfg.label
    model, _, _ = load_model(mcfg)
    device = next(model.parameters()).device
    # Everything before the rows' own text is identical: prefill it once, batch 1, and share its KV cache.
    shared = max(0, common_prefix_len(ids) - 1)  # every row keeps ≥ 1 token of its own
    prefix_cache = DynamicCache(config=model.config)
    with torch.no_grad():
        if shared:
            model(
                input_ids=torch.tensor([ids[0][:shared]], device=device),
                past_key_values=prefix_cache,
                use_cache=True,
                logits_to_keep=1,
            )
    eos = model.generation_config.eos_token_id
    stop_ids = {tokenizer.eos_token_id, *(eos if isinstance(eos, list) else [eos])} - {None}
    generator = torch.Generator(device=device)
    bar = tqdm(total=len(ids), initial=sum(r is not None for r in results), desc="label (local)", unit="row")
    for n, batch in todo:
        generator.manual_seed(lab.seed + n)  # per batch, so a resumed run samples the same tokens
        outputs = decode_batch(
            model,
            prefix_cache,
            shared,
            [ids[i][shared:] for i in batch],
            lab.max_new_tokens,
            lab.temperature,
            tokenizer.pad_token_id,
            stop_ids,
            tokenizer,
            generator,
        )
        for i, out in zip(batch, outputs, strict=True):
            if results[i] is None:  # rows cached by a crashed run keep their files untouched
                stats.generated_tokens += len(out)
                raw = ANALYSIS_OPEN + "\n" + tokenizer.decode(out, skip_special_tokens=True)
                cache.put(keys[i], raw)
                results[i] = Result(raw=raw)
                bar.update(1)
        bar.set_postfix(rows_per_s=f"{bar.n / max(bar.format_dict['elapsed'], 1e-9):.2f}")
    bar.close()


def decode_batch(
    model,
    prefix_cache,
    shared: int,
    suffixes: list[list[int]],
    max_new_tokens: int,
    temperature: float,
    pad_id: int,
    stop_ids: set[int],
    tokenizer,
    generator,
) -> list[list[int]]:
    """New token ids per row, stopping a row at `</analysis>` or an end token.

    Layout of a batch: [shared prefix | left padding | the row's own tokens]. The attention mask
    hides the padding and positions continue from the prefix, so each row sees exactly its prompt.
    Finished rows leave the batch (their KV rows are dropped), so compute follows the live rows.
    """
    import torch

    device = next(model.parameters()).device
    b, width = len(suffixes), max(len(s) for s in suffixes)
    input_ids = torch.full((b, width), pad_id, dtype=torch.long)
    mask = torch.zeros((b, shared + width), dtype=torch.long)
    mask[:, :shared] = 1
    for r, s in enumerate(suffixes):
        input_ids[r, width - len(s) :] = torch.tensor(s)
        mask[r, shared + width - len(s) :] = 1
    positions = (shared + mask[:, shared:].cumsum(-1) - 1).clamp(min=shared)
    cache = copy.deepcopy(prefix_cache)
    if shared:
        cache.batch_repeat_interleave(b)
    input_ids, mask, positions = input_ids.to(device), mask.to(device), positions.to(device)
    out: list[list[int]] = [[] for _ in range(b)]
    alive = list(range(b))  # batch row -> original row
    with torch.no_grad():
        logits = model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        ).logits[:, -1]
        next_pos = positions[:, -1:] + 1
        for _ in range(max_new_tokens):
            if temperature > 0:
                probs = torch.softmax(logits.float() / temperature, dim=-1)
                nxt = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
            else:
                nxt = logits.argmax(-1)
            keep = []
            for k, r in enumerate(alive):
                token = int(nxt[k])
                if token in stop_ids:
                    continue
                out[r].append(token)
                if ANALYSIS_CLOSE not in tokenizer.decode(out[r][-8:]):
                    keep.append(k)
            if not keep:
                break
            if len(keep) < len(alive):
                sel = torch.tensor(keep, device=device)
                cache.batch_select_indices(sel)
                mask, next_pos, nxt = mask[sel], next_pos[sel], nxt[sel]
                alive = [alive[k] for k in keep]
            mask = torch.cat([mask, mask.new_ones((len(alive), 1))], dim=1)
            logits = model(
                input_ids=nxt[:, None],
                attention_mask=mask,
                position_ids=next_pos,
                past_key_values=cache,
                use_cache=True,
            ).logits[:, -1]
            next_pos = next_pos + 1
    return out


BACKENDS = {"baseline": label_baseline, "openai": label_openai, "local": label_local}


# ----------------------------------------------------------------------------- stage


def labeler_description(cfg: NLAConfig, model: str) -> dict[str, Any]:
    """What produced the labels, for the sidecar: backend, model, prompt verbatim. Never the API key."""
    lab = cfg.label
    desc: dict[str, Any] = {
        "backend": lab.backend,
        "model": model,
        "instruction": lab.instruction,
        "user_template": lab.user_template,
        "few_shot": [list(ex) for ex in FEW_SHOT] if lab.backend != "baseline" else [],
        "answer_tags": [ANALYSIS_OPEN, ANALYSIS_CLOSE],
        "feature_separator": FEATURE_SEP,
        "context_tokens": lab.context_tokens,
        "min_features": lab.min_features,
        "temperature": lab.temperature,
    }
    if lab.backend == "local":
        desc.update(max_new_tokens=lab.max_new_tokens, seed=lab.seed, dtype=lab.dtype)
    if lab.backend == "openai":
        desc.update(
            base_url=redact_url(lab.openai.base_url),
            api_key_env=lab.openai.api_key_env,
            max_tokens=lab.openai.max_tokens,
        )
    return desc


def run_label(cfg: NLAConfig, activations_dir: str | Path, splits_dir: str | Path, out_dir: str | Path) -> pd.DataFrame:
    """Label the rows of `label.splits`; write explanations, failed rows, stats and the sidecar."""
    lab = cfg.label
    unknown = sorted(set(lab.splits) - set(SPLIT_NAMES))
    if unknown or not lab.splits:
        raise NLAError(f"label.splits={lab.splits} must be a non-empty subset of {list(SPLIT_NAMES)}; fix params.yaml")
    rows = load_rows(activations_dir, splits_dir, lab.splits)
    if rows.empty:
        raise NLAError(f"no activation rows in splits {lab.splits}; check split.fractions and label.splits")
    contexts = [context_of(p, lab.context_tokens) for p in rows.prefix]
    tokens = rows.token.tolist()

    started = time.perf_counter()
    stats = BackendStats()
    results = BACKENDS[lab.backend](cfg, contexts, tokens, stats)
    elapsed = time.perf_counter() - started

    good, bad = [], []
    for row, result in zip(rows.itertuples(index=False), results, strict=True):
        if result.raw is None:
            bad.append({"row_id": row.row_id, "reason": f"request_failed:{result.error}", "raw": ""})
            continue
        parsed = parse_response(result.raw, lab.min_features, cfg.injection.marker_ranges, cfg.injection.marker_char)
        if parsed.reason is None:
            good.append(
                {
                    "row_id": row.row_id,
                    "doc_id": row.doc_id,
                    "split": row.split,
                    "explanation": parsed.explanation,
                    "backend": lab.backend,
                    "n_features": parsed.n_features,
                }
            )
        else:
            bad.append({"row_id": row.row_id, "reason": parsed.reason, "raw": result.raw[:RAW_KEEP]})
    explanations = pd.DataFrame(good, columns=["row_id", "doc_id", "split", "explanation", "backend", "n_features"])
    explanations["n_features"] = explanations.n_features.astype("int64")
    failed = pd.DataFrame(bad, columns=["row_id", "reason", "raw"]).astype(str)

    reasons = Counter(failed.reason)
    label_stats = {
        "rows": len(rows),
        "labeled": len(explanations),
        "failed": len(failed),
        "failed_by_reason": dict(sorted(reasons.items())),
        "malformed_rate": sum(n for r, n in reasons.items() if not r.startswith("request_failed")) / len(rows),
        "labeled_by_split": {s: int((explanations.split == s).sum()) for s in lab.splits},
        "backend": lab.backend,
        "model": stats.model,
        "seconds": round(elapsed, 3),
        "rows_per_s": round(len(rows) / max(elapsed, 1e-9), 3),
        "cache_hits": stats.cache_hits,
        "requests": stats.requests,
        "retries": stats.retries,
        "status_codes": dict(sorted(stats.status_codes.items())),
        "peak_inflight": stats.peak_inflight,
        "generated_tokens": stats.generated_tokens,
    }
    meta = read_sidecar(activations_dir)
    meta.update(
        make_meta(
            "nla_dataset",
            "label",
            labeler=labeler_description(cfg, stats.model),
            rows=len(explanations),
            documents=int(explanations.doc_id.nunique()),
            failed_rows=len(failed),
            labeled_by_split=label_stats["labeled_by_split"],
            parents=[str(activations_dir), str(splits_dir)],
        )
    )
    with atomic_dir(out_dir) as tmp:  # the four files appear together or not at all
        write_table(tmp / EXPLANATIONS_FILE, explanations)
        write_table(tmp / FAILED_FILE, failed)
        write_json(tmp / STATS_FILE, label_stats)
        write_sidecar(tmp, meta)
    log.info("labeled %d/%d rows (%s), failed %s", len(explanations), len(rows), lab.backend, dict(reasons))
    return explanations
