// fedrec demo page: talks only to the JSON API under /api (its schema is at /openapi.json).
"use strict";

const $ = (id) => document.getElementById(id);
const state = { mode: "history", history: [], softPromptAvailable: false };

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  return node;
}

async function api(path, options = {}) {
  const response = await fetch(path, { headers: { "Content-Type": "application/json" }, ...options });
  const body = await response.json().catch(() => ({ detail: response.statusText }));
  if (!response.ok) throw new Error(body.detail || `HTTP ${response.status}`);
  return body;
}

function showError(message) {
  $("error").hidden = !message;
  $("error").textContent = message || "";
}

async function loadStatus() {
  try {
    const s = await api("/api/status");
    const soft = s.soft_prompt.loaded ? `soft prompt from round ${s.soft_prompt.round}` : "no trained soft prompt";
    $("status").textContent = `${s.dataset}: ${s.users.toLocaleString()} users, ${s.index_size.toLocaleString()} items · retrieval: ${s.retrieval} · ${s.backend} · ${soft}`;
    state.softPromptAvailable = s.soft_prompt.loaded;
    $("soft-prompt").disabled = !s.soft_prompt.loaded;
    $("soft-prompt-note").textContent = s.soft_prompt.loaded
      ? `Trained in ${s.soft_prompt.run} (round ${s.soft_prompt.round}).`
      : `Zero-shot only: ${s.soft_prompt.reason}`;
  } catch (error) {
    $("status").textContent = `status unavailable: ${error.message}`;
  }
}

async function loadUsers() {
  const users = await api("/api/users?limit=200");
  $("user").replaceChildren(...users.map((u) => el("option", { value: u.user_id }, `user ${u.user_id} (${u.history_length} items)`)));
}

function renderHistory() {
  $("history").replaceChildren(...state.history.map((item, i) =>
    el("li", {}, item.title, " ", el("button", { type: "button", title: "remove", "aria-label": `remove ${item.title}`,
      onclick: () => { state.history.splice(i, 1); renderHistory(); } }, "×"))));
  $("history-hint").textContent = state.history.length ? `${state.history.length} item(s), oldest first.` : "Add a few items; the order is oldest first.";
}

let searchTimer = null;
function onSearch() {
  clearTimeout(searchTimer);
  const q = $("search").value.trim();
  if (!q) { $("search-results").replaceChildren(); return; }
  searchTimer = setTimeout(async () => {
    try {
      const items = await api(`/api/items?q=${encodeURIComponent(q)}&limit=12`);
      $("search-results").replaceChildren(...items.map((item) => el("li", { "data-item": item.item_id, onclick: () => {
        if (!state.history.some((h) => h.item_id === item.item_id)) state.history.push(item);
        renderHistory();
        $("search").value = "";
        $("search-results").replaceChildren();
        $("search").focus();
      } }, item.title)));
      if (!items.length) $("search-results").replaceChildren(el("li", { class: "hint" }, "no title matches"));
    } catch (error) { showError(error.message); }
  }, 150);
}

function setMode(mode) {
  state.mode = mode;
  $("history-mode").hidden = mode !== "history";
  $("user-mode").hidden = mode !== "user";
  $("tab-history").classList.toggle("active", mode === "history");
  $("tab-user").classList.toggle("active", mode === "user");
}

function movedBadge(moved) {
  if (moved > 0) return el("span", { class: "moved up", title: `up ${moved} from retrieval` }, `▲${moved}`);
  if (moved < 0) return el("span", { class: "moved down", title: `down ${-moved} from retrieval` }, `▼${-moved}`);
  return el("span", { class: "moved same", title: "same place as retrieval" }, "=");
}

const SPACES = { tower: "trained tower space", text: "text-embedding space" };

function nearFact(n, space) {
  const genres = n.shared_genres.length ? `shares ${n.shared_genres.join(", ")}` : "no genre in common";
  return el("li", { class: "near", "data-item": n.item_id }, "close to ", el("b", {}, n.title),
    el("span", { class: "meta" }, ` (cosine ${n.similarity.toFixed(2)} in the ${SPACES[space]}; ${genres})`));
}

function renderExplanations(explanations, on) {
  if (!on) { $("explanation").replaceChildren(el("p", { class: "hint" }, "(explanation off)")); return; }
  $("explanation").replaceChildren(...explanations.map((e) => {
    const facts = e.nearest.length ? e.nearest.map((n) => nearFact(n, e.space))
      : [el("li", { class: "near" }, "no other history item to compare it with")];
    if (e.movement) facts.push(el("li", { class: "movement" }, `ranking: ${e.movement}`));
    const source = e.source === "llm" ? "phrased by the LLM" : "template";
    return el("article", { class: "why", "data-item": e.item_id },
      el("h3", {}, el("span", { class: "pick" }, `#${e.rank} ${e.title}`), el("span", { class: `source ${e.source}` }, source)),
      el("ul", { class: "facts" }, ...facts),
      el("p", { class: "sentence" }, e.sentence),
      ...(e.fallback ? [el("p", { class: "hint fallback" }, `LLM fallback: ${e.fallback}`)] : []));
  }));
}

function renderResult(result) {
  $("profile").textContent = result.profile;
  const t = result.timings_ms;
  $("timings").textContent = Object.entries(t).map(([k, v]) => `${k} ${Math.round(v)} ms`).join(" · ");
  $("candidates").replaceChildren(...result.candidates.map((c) =>
    el("li", { "data-item": c.item_id }, c.title, " ", el("span", { class: "meta" }, `score ${c.retrieval_score.toFixed(3)}`))));
  $("ranked").replaceChildren(...result.ranked.map((r) =>
    el("li", { "data-item": r.item_id }, r.title, movedBadge(r.moved), el("br"),
      el("span", { class: "meta" }, el("span", { class: "bar", style: `width:${Math.max(2, Math.round(r.llm_probability * 80))}px` }),
        `p=${r.llm_probability.toFixed(3)} · was #${r.retrieval_rank}`))));
  $("ranking-mode").textContent = `(${result.soft_prompt ? "trained soft prompt" : "zero-shot prompt"}, LLM weight ${result.fusion_weight.toFixed(2)})`;
  renderExplanations(result.explanations, result.explanation !== null);
  if ($("fusion-auto").checked) {
    $("fusion").value = result.fusion_weight;
    $("fusion-value").textContent = result.fusion_weight.toFixed(2);
  }
}

async function recommend() {
  showError("");
  const body = { k: 10, soft_prompt: $("soft-prompt").checked, explain: $("explain").checked };
  if (!$("fusion-auto").checked) body.fusion_weight = Number($("fusion").value);
  if (state.mode === "user") body.user_id = $("user").value;
  else body.history = state.history.map((h) => ({ item_id: h.item_id }));
  $("recommend").disabled = true;
  $("recommend").textContent = "Recommending…";
  try {
    renderResult(await api("/api/recommend", { method: "POST", body: JSON.stringify(body) }));
  } catch (error) {
    showError(error.message);
  } finally {
    $("recommend").disabled = false;
    $("recommend").textContent = "Recommend";
  }
}

function lineChart(svg, values, label) {
  const w = 320, h = 150, pad = 28;
  const points = values.map((v, i) => [i, v]).filter(([, v]) => v !== null && v !== undefined);
  if (!points.length) { svg.replaceChildren(); return; }
  const max = Math.max(...points.map(([, v]) => v)) * 1.1 || 1;
  const x = (i) => pad + (values.length > 1 ? (i / (values.length - 1)) * (w - pad - 10) : (w - pad) / 2);
  const y = (v) => h - pad + 6 - (v / max) * (h - pad - 10);
  const ns = "http://www.w3.org/2000/svg";
  const make = (tag, attrs, text) => { const n = document.createElementNS(ns, tag); for (const [k, v] of Object.entries(attrs)) n.setAttribute(k, v); if (text) n.textContent = text; return n; };
  svg.replaceChildren(
    make("polyline", { points: points.map(([i, v]) => `${x(i)},${y(v)}`).join(" "), fill: "none", stroke: "#2f5fd0", "stroke-width": 2 }),
    ...points.map(([i, v]) => make("circle", { cx: x(i), cy: y(v), r: 3, fill: "#2f5fd0" }, null)),
    make("text", { x: 4, y: 12 }, `${label} (max ${Math.max(...points.map(([, v]) => v)).toFixed(4)})`),
    make("text", { x: pad, y: h - 4 }, "round 1"),
    make("text", { x: w - 50, y: h - 4 }, `round ${values.length}`));
}

function barChart(svg, values, label) {
  const w = 320, h = 120, pad = 20;
  if (!values.length) { svg.replaceChildren(); return; }
  const max = Math.max(...values) || 1;
  const bw = (w - 2 * pad) / values.length;
  const ns = "http://www.w3.org/2000/svg";
  const make = (tag, attrs, text) => { const n = document.createElementNS(ns, tag); for (const [k, v] of Object.entries(attrs)) n.setAttribute(k, v); if (text) n.textContent = text; return n; };
  svg.replaceChildren(
    ...values.map((v, i) => make("rect", { x: pad + i * bw + 2, y: h - pad - (v / max) * (h - 2 * pad - 6), width: Math.max(2, bw - 4), height: (v / max) * (h - 2 * pad - 6), fill: "#8aa4e8" })),
    make("text", { x: 4, y: 12 }, label),
    make("text", { x: pad, y: h - 6 }, `${values.length} rounds`));
}

async function loadRun() {
  try {
    const run = await api("/api/run");
    $("curve").hidden = $("bytes").hidden = !run.available;
    if (!run.available) { $("run-summary").textContent = run.reason; return; }
    const test = run.test ? `test R@10 ${run.test["R@10"].toFixed(4)}, N@10 ${run.test["N@10"].toFixed(4)}` : "";
    const rerank = run.test_rerank && run.test_rerank["N@10"] !== undefined ? ` · reranked N@10 ${run.test_rerank["N@10"].toFixed(4)}` : "";
    $("run-summary").textContent = `${run.clients} clients, ${run.rounds} rounds (${run.engine}); ${test}${rerank}`;
    lineChart($("curve"), run.valid_ndcg10, "validation NDCG@10");
    const mb = run.bytes_up.map((b) => (b || 0) / 1e6);
    barChart($("bytes"), mb, `MB uploaded per round (all clients; ${mb.length ? mb[mb.length - 1].toFixed(2) : 0} MB last)`);
  } catch (error) {
    $("run-summary").textContent = `run unavailable: ${error.message}`;
  }
}

$("search").addEventListener("input", onSearch);
$("tab-history").addEventListener("click", () => setMode("history"));
$("tab-user").addEventListener("click", () => setMode("user"));
$("recommend").addEventListener("click", recommend);
$("fusion-auto").addEventListener("change", () => { $("fusion").disabled = $("fusion-auto").checked; });
$("fusion").addEventListener("input", () => { $("fusion-value").textContent = Number($("fusion").value).toFixed(2); });
loadStatus();
loadUsers().catch((error) => showError(error.message));
loadRun();
