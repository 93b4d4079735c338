// The live notes page: no build step, no framework. Everything the server sends is model
// output or transcript text, so it only ever reaches the page through textContent.
"use strict";

const streamId = decodeURIComponent(location.pathname.split("/").filter(Boolean).pop());
const base = "/v1/streams/" + encodeURIComponent(streamId);
const $ = (id) => document.getElementById(id);
const state = { last: null, source: null, pending: new Map(), finalShown: false };

function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
}

function clockOf(seconds) {
  const s = Math.max(0, Math.floor(seconds));
  const h = Math.floor(s / 3600), m = Math.floor(s / 60) % 60, r = s % 60;
  const mm = h ? String(m).padStart(2, "0") : String(m);
  return (h ? h + ":" : "") + mm + ":" + String(r).padStart(2, "0");
}

function wallTime(unixSeconds) {
  return new Date(unixSeconds * 1000).toLocaleTimeString([], { hour12: false });
}

function citeTime(c) {
  return c.ts !== null && c.ts !== undefined ? clockOf(c.ts) : wallTime(c.time);
}

async function api(path, options) {
  const response = await fetch(path, Object.assign({ credentials: "same-origin" }, options));
  if (response.status === 401) { showSignin(""); throw new Error("unauthorized"); }
  const body = response.status === 204 ? {} : await response.json().catch(() => ({}));
  if (!response.ok) {
    const error = new Error(body.detail || response.statusText);
    error.status = response.status;
    throw error;
  }
  return body;
}

// ----- rendering -------------------------------------------------------------------------
function renderCitations(item, citations, parent) {
  if (!item.citations || !item.citations.length) return;
  const chips = el("span", "cites");
  const quotes = [];
  for (const id of item.citations) {
    const c = citations[id] || { id: id, time: Number(id.split("-")[0]) / 1000 };
    const chip = el("span", "cite", citeTime(c));
    chip.title = "entry " + id + (c.quote ? ": " + c.quote : "");
    chips.appendChild(chip);
    if (c.quote && c.quote !== item.text) quotes.push(c);
  }
  parent.appendChild(chips);
  for (const c of quotes.slice(0, 3)) {
    const q = el("blockquote");
    if (c.speaker) { q.appendChild(el("span", "who", c.speaker + ": ")); }
    q.appendChild(document.createTextNode("“" + c.quote + "”"));
    parent.appendChild(q);
  }
}

function renderItem(item, citations, asList) {
  const node = el(asList ? "li" : "p", asList ? "" : "prose");
  if (item.speaker) node.appendChild(el("span", "speaker", item.speaker + ": "));
  node.appendChild(document.createTextNode(item.text));
  renderCitations(item, citations, node);
  return node;
}

function renderSections(view, target) {
  target.replaceChildren();
  const moments = $("moments");
  let hasMoments = false;
  for (const section of view.sections) {
    if (section.key === "key_moments") {
      hasMoments = true;
      moments.replaceChildren();
      for (const item of section.items) {
        const li = el("li");
        const c = view.citations[item.citations[0]];
        if (c) li.appendChild(el("span", "time", citeTime(c)));
        if (item.speaker) li.appendChild(el("span", "speaker", item.speaker + ": "));
        li.appendChild(document.createTextNode(item.text));
        moments.appendChild(li);
      }
      continue;
    }
    if (view.sections.length > 1 || section.key !== "summary") {
      target.appendChild(el("h3", "", section.title));
    }
    const list = el("ul", "items");
    for (const item of section.items) {
      if (item.prose) target.appendChild(renderItem(item, view.citations, false));
      else list.appendChild(renderItem(item, view.citations, true));
    }
    if (list.children.length) target.appendChild(list);
  }
  $("moments-card").hidden = !hasMoments;
}

function showNotes(view) {
  if (view.kind !== "final" && state.finalShown) return;
  state.finalShown = view.kind === "final";
  $("notes-title").textContent = view.kind === "final" ? "Meeting notes" : "Notes so far";
  $("notes-meta").textContent = (view.kind === "final" ? "final · " : "rolling · ") +
    wallTime(view.ts) + " · " + view.tokens_seen + " tokens · " + view.model;
  renderSections(view, $("notes"));
}

function addRolling(view, fresh) {
  const list = $("rolling");
  const empty = list.querySelector(".empty");
  if (empty) empty.remove();
  const li = el("li", fresh ? "new" : "");
  li.appendChild(el("span", "time", wallTime(view.ts) + " · " + view.kind));
  for (const section of view.sections) {
    for (const item of section.items) li.appendChild(renderItem(item, view.citations, false));
  }
  list.prepend(li);
  while (list.children.length > 50) list.lastChild.remove();
}

function showAnswer(view) {
  let li = state.pending.get(view.request);
  if (!li) {
    li = el("li");
    li.appendChild(el("div", "q", "(asked elsewhere)"));
    $("answers").prepend(li);
  }
  state.pending.delete(view.request);
  li.querySelector(".pending")?.remove();
  const answer = el("div", "a");
  answer.appendChild(el("span", "label", "Answer "));
  answer.appendChild(document.createTextNode(view.text || "(no answer)"));
  li.appendChild(answer);
  for (const src of view.sources || []) {
    if (!src.quote) continue;
    const q = el("blockquote");
    const when = src.ts ? clockOf(src.ts[0]) + " " : "";
    q.appendChild(el("span", "time", when));
    q.appendChild(document.createTextNode("“" + src.quote + "”"));
    li.appendChild(q);
  }
}

function onOutput(view, fresh) {
  if (view.kind === "answer") showAnswer(view);
  else {
    if (view.kind !== "final") addRolling(view, fresh);
    showNotes(view);
  }
}

// ----- status, live connection, ask, sign-in -----------------------------------------------
async function refreshStatus() {
  try {
    const s = await api(base);
    const box = $("status");
    box.replaceChildren();
    box.appendChild(el("span", "pill " + s.status, s.status));
    box.appendChild(el("span", "pill", s.tokens_seen + " tokens"));
    box.appendChild(el("span", "pill", "lag " + s.lag_entries + (s.lag_capped ? "+" : "") +
      " entries"));
    if (s.last_summary_ts) box.appendChild(el("span", "pill", "last summary " +
      wallTime(s.last_summary_ts)));
    if (s.dead_letters) box.appendChild(el("span", "pill failed", s.dead_letters + " dead letters"));
    if (s.failure) box.appendChild(el("span", "pill failed", s.failure));
  } catch (e) {
    if (e.status === 404) $("status").replaceChildren(el("span", "pill", "not started yet"));
  }
}

function follow() {
  if (state.source) state.source.close();
  const after = state.last ? "?after=" + encodeURIComponent(state.last) : "";
  const source = new EventSource(base + "/events" + after);
  state.source = source;
  const live = $("live");
  source.onopen = () => { live.className = "live on"; live.textContent = "live"; };
  source.onerror = () => { live.className = "live off"; live.textContent = "reconnecting…"; };
  for (const kind of ["rolling", "final", "on_demand", "answer"]) {
    source.addEventListener(kind, (event) => {
      state.last = event.lastEventId;
      onOutput(JSON.parse(event.data), true);
      if (kind !== "answer") refreshStatus();
    });
  }
}

async function ask(event) {
  event.preventDefault();
  const question = $("question").value.trim();
  if (!question) return;
  $("ask-error").textContent = "";
  try {
    const sent = await api(base + "/ask", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ question: question, wait: false }),
    });
    const li = el("li");
    li.appendChild(el("div", "q", question));
    li.appendChild(el("div", "pending", "thinking…"));
    $("answers").prepend(li);
    state.pending.set(sent.request, li);
    $("question").value = "";
  } catch (e) { $("ask-error").textContent = e.message; }
}

function showSignin(message) {
  $("signin").hidden = false;
  $("main").hidden = true;
  $("signin-error").textContent = message;
}

async function signin(token) {
  const response = await fetch("/v1/session", {
    method: "POST", credentials: "same-origin", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ token: token }),
  });
  if (!response.ok) { showSignin("That token was not accepted."); return false; }
  return true;
}

async function start() {
  let notes;
  try {
    notes = await api(base + "/notes?limit=20");
  } catch (e) {
    if (e.status !== 404) throw e;
    // not started yet: follow it from its first output
    notes = { rolling: [], on_demand: [], answers: [], final: null, last_event_id: "0-0" };
  }
  $("signin").hidden = true;
  $("main").hidden = false;
  const views = [...notes.rolling, ...notes.on_demand].sort((a, b) => a.ts - b.ts);
  for (const view of views) onOutput(view, false);
  if (notes.final) onOutput(notes.final, false);
  for (const view of [...notes.answers].reverse()) showAnswer(view);
  state.last = notes.last_event_id;
  follow();
  refreshStatus();
  setInterval(refreshStatus, 10000);
}

document.addEventListener("DOMContentLoaded", async () => {
  $("stream-id").textContent = streamId;
  document.title = streamId + " · sinkstream";
  $("ask-form").addEventListener("submit", ask);
  $("signin-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    if (await signin($("token").value.trim())) start().catch(() => {});
  });
  // a token in the fragment (never sent to the server) signs in once, then leaves the URL
  const match = location.hash.match(/token=([^&]+)/);
  if (match) {
    history.replaceState(null, "", location.pathname);
    await signin(decodeURIComponent(match[1]));
  }
  start().catch(() => {});
});
