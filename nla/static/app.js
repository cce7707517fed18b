// The explorer page: three views over the JSON API (docs/serve.md). Plain DOM, no dependencies.
"use strict";

const $ = (selector) => document.querySelector(selector);
let info = null; // /api/info
let current = null; // the last explain result shown
let selected = null; // selected position

function el(tag, props = {}, ...children) {
  const node = Object.assign(document.createElement(tag), props);
  for (const child of children) node.append(child);
  return node;
}

async function api(path, options) {
  const response = await fetch(path, options);
  const body = await response.json();
  if (!response.ok) throw new Error(body.error || response.statusText);
  return { status: response.status, body };
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

function showError(node, message) {
  node.textContent = message || "";
  node.hidden = !message;
}

// FVE in [0, 1] from red to green; below 0 stays red; no AR (null) is grey.
function fveColor(fve) {
  if (fve === null || fve === undefined) return "#e4e4e4";
  const x = Math.max(0, Math.min(1, fve));
  return `hsl(${Math.round(120 * x)}, 70%, ${85 - 10 * x}%)`;
}

const fmt = (x, digits = 3) => (x === null || x === undefined ? "–" : x.toFixed(digits));
const shown = (token) => token.replace(/\n/g, "↵");

function pairLabel(name) {
  const pair = info.checkpoints.find((p) => p.name === name);
  return `${name.toUpperCase()}: ${pair.stage || "checkpoint"} (${pair.av})`;
}

// ---------------------------------------------------------------- text view

function recordsOf(result, name) {
  const records = name === "a" ? result.records : result.compare;
  return new Map(records.map((r) => [r.position, r]));
}

function renderResult(result) {
  current = result;
  const columns = $("#results");
  columns.replaceChildren();
  for (const { name } of info.checkpoints) {
    const byPosition = recordsOf(result, name);
    const chips = el("div", { className: "chips" });
    for (const token of result.tokens) {
      const record = byPosition.get(token.position);
      const chip = el("span", { className: "chip", textContent: shown(token.token) });
      chip.dataset.position = token.position;
      if (token.special) chip.classList.add("special");
      else if (!record) chip.classList.add("pending");
      else {
        chip.style.background = fveColor(record.fve);
        chip.title = `${record.explanation}\nFVE ${fmt(record.fve)}`;
        chip.addEventListener("click", () => select(token.position));
        chip.addEventListener("mouseenter", () => selected === null && showDetail(token.position));
      }
      if (token.position === selected) chip.classList.add("selected");
      chips.append(chip);
    }
    const column = el("div", { className: "pair" }, el("h3", { textContent: pairLabel(name) }), chips);
    column.dataset.pair = name;
    columns.append(column);
  }
  if (selected !== null) showDetail(selected);
}

function select(position) {
  selected = position;
  for (const chip of document.querySelectorAll(".chip")) {
    chip.classList.toggle("selected", Number(chip.dataset.position) === position);
  }
  showDetail(position);
}

function showDetail(position) {
  const k = current.positions.indexOf(position);
  const detail = current.details[k];
  if (!detail) return;
  $("#detail").hidden = false;
  $("#detail-token").textContent = JSON.stringify(current.tokens[position].token);
  $("#detail-position").textContent = position;
  const pairs = $("#detail-pairs");
  pairs.replaceChildren();
  for (const { name } of info.checkpoints) {
    const record = recordsOf(current, name).get(position);
    const explanation = el("p", { className: "explanation", id: `explanation-${name}`, textContent: record.explanation });
    const closed = record.closed ? "" : " · hit the token cap";
    const scores = el("p", {
      className: "scores",
      id: `scores-${name}`,
      textContent: `round-trip FVE ${fmt(record.fve)} · cos ${fmt(record.cos)}${closed}`,
    });
    pairs.append(el("div", { className: "pair" }, el("h3", { textContent: pairLabel(name) }), explanation, scores));
  }
  $("#top").replaceChildren(
    ...detail.top.map((t) => el("li", {}, el("code", { textContent: JSON.stringify(t.token) }), ` ${(100 * t.p).toFixed(1)}%`)),
  );
  const note = $("#neighbours-note");
  if (detail.neighbours === null) {
    note.textContent = info.notes.index || "no training index";
    note.hidden = false;
    $("#neighbours").replaceChildren();
  } else {
    note.hidden = true;
    $("#neighbours").replaceChildren(
      ...detail.neighbours.map((n) =>
        el(
          "li",
          {},
          el("span", { className: "context", textContent: n.context }),
          ` → `,
          el("code", { textContent: JSON.stringify(n.token) }),
          el("span", { className: "muted", textContent: ` cos ${fmt(n.cos)} · ${n.row_id}` }),
          n.label ? el("div", { className: "muted", textContent: n.label }) : "",
        ),
      ),
    );
  }
}

async function explainText(event) {
  event.preventDefault();
  const button = $("#explain");
  const progress = $("#progress");
  showError($("#error"), "");
  button.disabled = true;
  selected = null;
  $("#detail").hidden = true;
  delete $("#results").dataset.job;
  try {
    const text = $("#text").value;
    const { body: job } = await api("/api/jobs", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ text, positions: "all" }),
    });
    $("#results").dataset.job = job.id; // the API's record of what this page shows
    progress.hidden = false;
    for (;;) {
      const { body: state } = await api(`/api/jobs/${job.id}`);
      progress.max = state.total || 1;
      progress.value = state.done;
      $("#progress-label").textContent = state.total ? `explained ${state.done} of ${state.total} positions` : "queued";
      if (state.result) renderResult(state.result);
      if (state.status === "done") break;
      if (state.status === "error" || state.status === "timeout") throw new Error(state.error);
      await sleep(300);
    }
  } catch (err) {
    showError($("#error"), err.message);
  } finally {
    button.disabled = false;
    progress.hidden = true;
  }
}

// ---------------------------------------------------------------- eval view

const evalState = { sort: null, order: "asc", loaded: false };
const NUMERIC = /_(fve|cos|fve_gold)$|^position$/;

async function loadRows() {
  const params = new URLSearchParams({ limit: "500" });
  if (evalState.sort) {
    params.set("sort", evalState.sort);
    params.set("order", evalState.order);
  }
  const q = $("#eval-filter").value.trim();
  if (q) params.set("q", q);
  const split = $("#eval-split").value;
  if (split) params.set("split", split);
  showError($("#eval-error"), "");
  try {
    for (;;) {
      const { status, body } = await api(`/api/rows?${params}`);
      if (status === 202) {
        const job = body.job;
        $("#eval-status").textContent = job.total ? `explaining eval rows: ${job.done} of ${job.total}` : "loading eval rows";
        await sleep(500);
        continue;
      }
      renderRows(body);
      return;
    }
  } catch (err) {
    showError($("#eval-error"), err.message);
    $("#eval-status").textContent = "";
  }
}

// Mean round-trip FVE of each pair, per set: the held-out and the foreign rows side by side.
function setMeans(body) {
  return Object.entries(body.mean_fve_by_split).map(
    ([set, means]) => `${set}: ` + Object.entries(means).map(([k, v]) => `${k.toUpperCase()} ${fmt(v)}`).join(", "),
  );
}

function renderRows(body) {
  $("#eval-status").textContent = `${body.total} rows · mean round-trip FVE ${setMeans(body).join(" · ")}`;
  const splits = $("#eval-split");
  if (splits.options.length === 1) {
    for (const [name, n] of Object.entries(body.splits)) splits.append(el("option", { value: name, textContent: `${name} (${n})` }));
  }
  const columns = body.columns.filter((c) => c !== "doc_id" && !c.endsWith("_closed"));
  const head = el("tr");
  for (const column of columns) {
    const th = el("th", { textContent: column });
    if (column === evalState.sort) th.classList.add("sorted", evalState.order);
    th.addEventListener("click", () => {
      evalState.order = evalState.sort === column && evalState.order === "asc" ? "desc" : "asc";
      evalState.sort = column;
      loadRows();
    });
    head.append(th);
  }
  $("#eval-table thead").replaceChildren(head);
  $("#eval-table tbody").replaceChildren(
    ...body.rows.map((row) =>
      el(
        "tr",
        {},
        ...columns.map((c) => {
          const value = row[c];
          if (!NUMERIC.test(c)) return el("td", { className: ["context", "split"].includes(c) ? c : "", textContent: value ?? "–" });
          const td = el("td", { className: "num", textContent: Number.isInteger(value) ? value : fmt(value) });
          if (/_fve(_gold)?$/.test(c)) td.style.background = fveColor(value);
          return td;
        }),
      ),
    ),
  );
}

// ---------------------------------------------------------------- search view

let searchTimer = null;

async function search(event) {
  if (event) event.preventDefault();
  clearTimeout(searchTimer);
  const q = $("#query").value.trim();
  showError($("#search-error"), "");
  try {
    const { body } = await api(`/api/search?${new URLSearchParams({ q, limit: "100" })}`);
    const state = body.status === "ready" ? "" : " (explaining the corpus, results grow)";
    $("#search-status").textContent = `${body.total} matches in ${body.docs_done} of ${body.docs_total} explained documents${state}`;
    const pattern = q ? new RegExp(`(?<!\\w)(${q.split(/\s+/).map((w) => w.replace(/[.*+?^${}()|[\]\\]/g, "\\$&")).join("\\s+")})(?!\\w)`, "ig") : null;
    $("#matches").replaceChildren(
      ...body.matches.map((m) => {
        const r = m.record;
        const explanation = el("div");
        let last = 0;
        for (const hit of pattern ? r.explanation.matchAll(pattern) : []) {
          explanation.append(r.explanation.slice(last, hit.index), el("mark", { textContent: hit[0] }));
          last = hit.index + hit[0].length;
        }
        explanation.append(r.explanation.slice(last));
        return el(
          "li",
          {},
          el("span", { className: "context" }, m.before, el("mark", { textContent: r.token }), m.after),
          el("span", { className: "muted", textContent: `  ${m.doc_id} @${r.position} · FVE ${fmt(r.fve)}` }),
          explanation,
        );
      }),
    );
    if (body.status !== "ready" && !$("#view-search").hidden) searchTimer = setTimeout(search, 1500);
  } catch (err) {
    showError($("#search-error"), err.message);
  }
}

// ---------------------------------------------------------------- start

function showView(name) {
  for (const tab of document.querySelectorAll(".tab")) tab.classList.toggle("active", tab.dataset.view === name);
  for (const view of document.querySelectorAll(".view")) view.hidden = view.id !== `view-${name}`;
  if (name === "eval" && !evalState.loaded) {
    evalState.loaded = true;
    loadRows();
  }
  if (name === "search") search();
}

async function start() {
  ({ body: info } = await api("/api/info"));
  $("#checkpoints").textContent = info.checkpoints.map((p) => pairLabel(p.name)).join(" · ") + ` · layer ${info.subject.layer} of ${info.subject.base_model}`;
  $("#text").maxLength = info.limits.max_chars;
  $("#explain-form").addEventListener("submit", explainText);
  $("#search-form").addEventListener("submit", search);
  let filterTimer = null;
  $("#eval-filter").addEventListener("input", () => {
    clearTimeout(filterTimer);
    filterTimer = setTimeout(loadRows, 300);
  });
  $("#eval-split").addEventListener("change", loadRows);
  for (const tab of document.querySelectorAll(".tab")) tab.addEventListener("click", () => showView(tab.dataset.view));
  document.body.dataset.ready = "1";
}

start().catch((err) => showError($("#error"), `cannot reach the server: ${err.message}`));
