// The voting page: keys 1/2/3 (or the buttons) answer the current question; the server records each
// vote before the page moves on. State for tests and screen readers: body[data-state] is "loading",
// "login", "busy", "ready" (accepting a vote), "done" or "error".
"use strict";

const $ = (id) => document.getElementById(id);
const CHOICE_KEYS = { "1": "left", "2": "right", "3": "tie" };
const ANSWER_TEXT = { left: "left", right: "right", tie: "tie" };
let config = null;      // {questions: [{id, text}], total, annotator}
// a private link (/?t=TOKEN, `serve --annotators`): the token goes with every request and names the annotator
const token = new URLSearchParams(location.search).get("t");
let annotator = null;
let state = null;       // the server's last {annotator, total, done, item}
let asking = null;      // {key, question} re-asked with Backspace, else null
const answeredHere = []; // [{key, question}] voted on this page, for Backspace

function setState(s) { document.body.dataset.state = s; }

function showError(err) {
  $("error").textContent = String(err.message || err);
  $("error").hidden = false;
}

async function api(path, options = {}) {
  if (token) options.headers = { ...(options.headers || {}), Authorization: "Bearer " + token };
  const response = await fetch(path, options);
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    try {
      const detail = (await response.json()).detail;
      message = Array.isArray(detail) ? detail.map((d) => d.msg).join("; ") : detail || message;
    } catch (_) { /* not JSON */ }
    throw new Error(message);
  }
  return response.json();
}

function query() { return token ? "" : "annotator=" + encodeURIComponent(annotator || ""); }

async function load(key) {
  setState("busy");
  try {
    const path = key ? `/api/item?key=${encodeURIComponent(key)}&${query()}` : `/api/state?${query()}`;
    show(await api(path));
  } catch (err) {
    showError(err);
    if (!state) { annotator = null; showLogin(); } else { setState("ready"); }
  }
}

function showLogin() {
  $("login").hidden = false;
  $("vote").hidden = true;
  setState("login");
  $("name").focus();
}

function show(s) {
  state = s;
  annotator = s.annotator;  // as sanitised by the server
  if (!config.annotator) {
    const url = new URL(location.href);
    url.searchParams.set("annotator", annotator);
    history.replaceState(null, "", url);  // a reload resumes as the same annotator
  }
  $("error").hidden = true;
  $("login").hidden = true;
  $("who").textContent = annotator;
  $("progress").textContent = `${s.done} / ${s.total} items`;
  $("bar").max = Math.max(1, s.total);
  $("bar").value = s.done;
  if (!s.item) {
    $("vote").hidden = true;
    $("finished").hidden = false;
    setState("done");
    return;
  }
  const item = s.item;
  const current = asking ? asking.question : item.question;
  $("finished").hidden = true;
  $("vote").hidden = false;
  $("vote").dataset.item = item.key;
  $("vote").dataset.question = current;
  $("prompt").textContent = item.prompt;
  const list = $("questions");
  list.replaceChildren();
  for (const q of config.questions) {
    const li = document.createElement("li");
    li.textContent = q.id;
    if (q.id === current) {
      li.className = "current";
      $("question").textContent = (asking ? "Again: " : "") + q.text;
    }
    if (item.answered[q.id]) {
      const badge = document.createElement("span");
      badge.className = "answer";
      badge.textContent = ANSWER_TEXT[item.answered[q.id]];
      li.append(badge);
    }
    list.append(li);
  }
  const images = [[$("left"), item.left], [$("right"), item.right]];
  for (const [img, src] of images) {
    if (img.getAttribute("src") !== src) img.setAttribute("src", src);
  }
  Promise.all(images.map(([img]) => img.decode())).then(() => {
    for (const [img] of images) img.classList.toggle("small", img.naturalWidth < 256);
    if (state === s) setState("ready");
  }).catch(() => {
    if (state === s) { showError("an image failed to load; reload the page"); setState("error"); }
  });
}

async function vote(choice) {
  if (document.body.dataset.state !== "ready" || !state || !state.item) return;
  const key = state.item.key;
  const question = asking ? asking.question : state.item.question;
  setState("busy");
  try {
    const s = await api("/api/vote", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(token ? { key, question, choice } : { annotator, key, question, choice }),
    });
    answeredHere.push({ key, question });
    asking = null;
    show(s);
  } catch (err) {
    showError(err);
    setState("ready");
  }
}

async function back() {
  const state_ = document.body.dataset.state;
  if ((state_ !== "ready" && state_ !== "done") || !answeredHere.length) return;
  asking = answeredHere.pop();
  await load(asking.key);
}

document.addEventListener("keydown", (event) => {
  if (event.repeat || event.ctrlKey || event.metaKey || event.altKey) return;
  if (event.target instanceof HTMLInputElement) return;  // typing a name
  if (CHOICE_KEYS[event.key]) {
    event.preventDefault();
    vote(CHOICE_KEYS[event.key]);
  } else if (event.key === "Backspace") {
    event.preventDefault();
    back();
  }
});

for (const button of document.querySelectorAll("button[data-choice]")) {
  button.addEventListener("click", () => vote(button.dataset.choice));
}

$("login-form").addEventListener("submit", (event) => {
  event.preventDefault();
  annotator = $("name").value;
  load();
});

(async function start() {
  try {
    config = await api("/api/config");
  } catch (err) {
    showError(err);
    setState("error");
    return;
  }
  annotator = config.annotator || new URLSearchParams(location.search).get("annotator");
  if (annotator) load(); else showLogin();
})();
