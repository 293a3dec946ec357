// The playground: submit to POST /v1/submit, then read GET /v1/response/<id>/stream (server-sent
// events: the text of each token as it is generated, then "done" with the job), resuming with
// Last-Event-ID if the connection drops; long-polls GET /v1/response/<id> if streaming fails.
// Plain JavaScript, no build step.
"use strict";

const $ = (id) => document.getElementById(id);
const NUMBER_PARAMS = [
  ["max_new_tokens", "int"], ["top_k", "int"], ["penalty_alpha", "float"],
  ["min_new_tokens", "int"], ["num_beams", "int"], ["length_penalty", "float"],
  ["temperature", "float"], ["top_p", "float"], ["seed", "int"],
  ["repetition_penalty", "float"], ["no_repeat_ngram_size", "int"],
];
const POLL_WAIT_S = 1;  // the server holds each poll up to this long, answering at once when done
const STREAM_TRIES = 3;  // reconnections of a dropped stream before falling back to polling

let current = null;  // {id, key, cancelled}

function collectParams() {
  const params = {};
  for (const [name, kind] of NUMBER_PARAMS) {
    const raw = $(name).value.trim();
    if (raw === "") continue;
    const value = Number(raw);
    if (!Number.isFinite(value) || (kind === "int" && !Number.isInteger(value))) {
      throw new Error(`${$(name).labels[0].textContent} must be ${kind === "int" ? "a whole number" : "a number"}`);
    }
    params[name] = value;
  }
  if ($("do_sample").checked) params.do_sample = true;
  return params;
}

function setBusy(busy) {
  $("submit").disabled = busy;
  $("cancel").hidden = !busy;
  $("form").setAttribute("aria-busy", String(busy));
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = false;
}

function clearOutput() {
  $("error").hidden = true;
  $("error").textContent = "";
  $("completion").textContent = "";
  $("usage").textContent = "";
}

async function api(method, path, key, body) {
  const headers = { "apiKey": key };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  let payload = null;
  try { payload = await response.json(); } catch (_) { /* not JSON: reported below */ }
  if (!response.ok || !payload || payload.success !== true) {
    const message = payload && payload.error ? payload.error.message : `HTTP ${response.status}`;
    const error = new Error(message);
    error.status = response.status;
    throw error;
  }
  return payload.data;
}

function describe(data) {
  if (data.status === "queued") {
    return data.queuePosition === "0" ? "Queued: next in line…" : `Queued: position ${data.queuePosition}…`;
  }
  if (data.status === "running") return "Running…";
  if (data.status === "cancelled") return "Cancelled.";
  return data.status;
}

async function run(event) {
  event.preventDefault();
  clearOutput();
  const key = $("api-key").value.trim();
  const prompt = $("prompt").value;
  if (!key) { showError("Enter your API key (create one with `engine keys create --name NAME`)."); $("api-key").focus(); return; }
  if (!prompt.trim()) { showError("Enter a prompt."); $("prompt").focus(); return; }
  let params;
  try { params = collectParams(); } catch (e) { showError(e.message); return; }
  sessionStorage.setItem("engine-api-key", key);

  setBusy(true);
  $("status").textContent = "Submitting…";
  const job = { id: null, key, cancelled: false };
  current = job;
  try {
    const submitted = await api("POST", "/v1/submit", key, { prompt, params });
    job.id = submitted.id;
    $("status").textContent = describe({ status: "queued", queuePosition: submitted.queuePosition });
    if (await streamJob(job)) return;
    for (;;) {
      const data = await api("GET", `/v1/response/${encodeURIComponent(job.id)}?wait=${POLL_WAIT_S}`, key);
      if (job.cancelled || data.status === "cancelled") { $("status").textContent = "Cancelled."; break; }
      if (data.completion !== null) { showDone(data); break; }
      $("status").textContent = describe(data);
    }
  } catch (e) {
    $("status").textContent = "Failed.";
    showError(e.message);
  } finally {
    if (current === job) { current = null; setBusy(false); }
  }
}

function showDone(data) {
  $("status").textContent = "Done.";
  $("completion").textContent = data.completion.join("\n\n");
  if (data.usage) {
    $("usage").textContent = `${data.usage.prompt_tokens} prompt tokens, ${data.usage.completion_tokens} generated.`;
  }
}

// Reads the job's event stream, adding each token's text to the output as it arrives. True once
// the job has ended (done, cancelled or failed: shown); false if streaming is not possible (the
// caller polls instead).
async function streamJob(job) {
  let lastId = 0;
  let tokens = 0;
  const texts = [];
  for (let attempt = 0; attempt < STREAM_TRIES && !job.cancelled; attempt++) {
    job.abort = new AbortController();
    const headers = { "apiKey": job.key };
    if (lastId > 0) headers["Last-Event-ID"] = String(lastId);
    let response;
    try {
      response = await fetch(`/v1/response/${encodeURIComponent(job.id)}/stream`, { headers, signal: job.abort.signal });
    } catch (_) { continue; }
    if (!response.ok || !response.body) return false;
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const event = parseEvent(buffer.slice(0, end));
          buffer = buffer.slice(end + 2);
          if (event.name === "done") {
            if (event.data.status === "completed") showDone(event.data);
            else if (event.data.status === "failed") { $("status").textContent = "Failed."; showError(event.data.error.message); }
            else $("status").textContent = describe(event.data);
            return true;
          }
          if (event.id !== null) lastId = event.id;
          const t = event.data;
          texts[t.prompt] = (texts[t.prompt] || "") + t.text;
          tokens += t.token_id >= 0 ? 1 : 0;
          $("completion").textContent = texts.filter((x) => x !== undefined).join("\n\n");
          $("status").textContent = `Generating… ${tokens} token${tokens === 1 ? "" : "s"}`;
        }
      }
    } catch (_) { /* dropped or aborted: resume below */ }
  }
  return job.cancelled;
}

function parseEvent(block) {
  const event = { name: "message", id: null, data: null };
  for (const line of block.split("\n")) {
    const colon = line.indexOf(":");
    const field = line.slice(0, colon);
    const value = line.slice(colon + 1).replace(/^ /, "");
    if (field === "event") event.name = value;
    else if (field === "id") event.id = Number(value);
    else if (field === "data") event.data = JSON.parse(value);
  }
  return event;
}

async function cancel() {
  const job = current;
  if (!job || !job.id) return;
  job.cancelled = true;
  if (job.abort) job.abort.abort();
  $("status").textContent = "Cancelled.";
  try { await api("DELETE", `/v1/response/${encodeURIComponent(job.id)}`, job.key); } catch (e) { showError(e.message); }
}

async function loadInfo() {
  try {
    const response = await fetch("/v1/info");
    const info = await response.json();
    $("model-line").textContent = `Model ${info.model} on ${info.device} (${info.computeType})` +
      (info.ready ? "" : " (not ready yet)");
    $("demo-banner").hidden = !info.randomWeights;
    $("max_new_tokens").max = String(info.maxNewTokensLimit);
  } catch (_) {
    $("model-line").textContent = "Model information unavailable.";
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("api-key").value = sessionStorage.getItem("engine-api-key") || "";
  $("form").addEventListener("submit", run);
  $("cancel").addEventListener("click", cancel);
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); $("form").requestSubmit(); }
  });
  loadInfo();
});
