// The page of `dalle serve`: fills the form's defaults and the run panel from GET /run,
// posts the form to POST /generate, polls GET /jobs/{id} for progress (POST
// /jobs/{id}/cancel stops it), then shows the ranked images with download links; the
// history below lists GET /jobs. Text from the server is set with textContent only.
"use strict";

const $ = (id) => document.getElementById(id);
const POLL_MS = 250;
const EXPLAINED = ["top_k", "top_p", "temperature", "guidance_scale"];
const history = new Map(); // job id -> the job as GET /jobs last listed it

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (cls) node.className = cls;
  return node;
}

function fmt(value) {
  if (typeof value !== "number") return String(value);
  if (Number.isInteger(value)) return String(value);
  return Number(value.toPrecision(4)).toString();
}

// {a: {b: 1}, c: "x"} -> [["a.b", 1]]: the numbers of a nested report, by dotted key.
function numbers(obj, prefix = "") {
  const rows = [];
  for (const [key, value] of Object.entries(obj || {})) {
    const name = prefix ? `${prefix}.${key}` : key;
    if (typeof value === "number") rows.push([name, value]);
    else if (value && typeof value === "object" && !Array.isArray(value)) rows.push(...numbers(value, name));
  }
  return rows;
}

function table(rows, header) {
  const t = el("table");
  if (header) {
    const tr = el("tr");
    header.forEach((h) => tr.appendChild(el("th", h)));
    t.appendChild(tr);
  }
  for (const row of rows) {
    const tr = el("tr");
    row.forEach((cell) => tr.appendChild(el("td", typeof cell === "number" ? fmt(cell) : cell, typeof cell === "number" ? "num" : "")));
    t.appendChild(tr);
  }
  return t;
}

function showRun(run) {
  $("run-name").textContent = `${run.run} (recipe ${run.recipe}, ${run.device})`;
  $("run-description").textContent = run.description || "";
  const comps = Object.entries(run.components).map(([kind, c]) => [kind, c.name, c.plugin || "", c.step ?? ""]);
  $("components").replaceChildren(table(comps, ["stage", "component", "plugin", "steps"]));

  // The evaluation report (dalle evaluate / dalle run) first, generation at its top;
  // each stage's last held-out evaluation during training below it, folded.
  const blocks = [];
  const sections = Object.entries(run.evaluation || {});
  sections.sort(([a], [b]) => (b === "generation") - (a === "generation"));
  for (const [section, value] of sections) {
    const rows = numbers(value);
    if (rows.length) blocks.push(el("h3", `${section} (eval/report.json)`), table(rows));
  }
  for (const [kind, c] of Object.entries(run.components)) {
    const rows = numbers(c.metrics);
    if (!rows.length) continue;
    const details = el("details");
    details.append(el("summary", `${kind}: end of training (${kind}/meta.json)`), table(rows));
    blocks.push(details);
  }
  if (blocks.length) $("metrics").replaceChildren(...blocks);

  const d = run.defaults;
  $("candidates").value = d.candidates;
  $("keep").value = Math.min(d.keep, d.candidates);
  $("temperature").value = d.sampling.temperature;
  $("guidance_scale").value = d.sampling.guidance_scale;
  if (d.sampling.top_k !== null) $("top_k").value = d.sampling.top_k;
  if (d.sampling.top_p !== null) $("top_p").value = d.sampling.top_p;
  $("candidates").max = run.limits.max_candidates;
  $("keep").max = run.limits.max_keep;
  $("caption").maxLength = run.limits.max_caption_chars;
  $("examples").replaceChildren(...run.examples.map((c) => { const o = el("option"); o.value = c; return o; }));
  if (!$("caption").value && run.examples.length) $("caption").placeholder = run.examples[0];
}

function setStatus(text, error = false) {
  $("status").textContent = text;
  $("status").className = error ? "error" : "";
}

function request() {
  const body = { caption: $("caption").value };
  for (const name of ["candidates", "keep", "top_k", "seed"]) {
    if ($(name).value !== "") body[name] = parseInt($(name).value, 10);
  }
  for (const name of ["top_p", "temperature", "guidance_scale"]) {
    if ($(name).value !== "") body[name] = parseFloat($(name).value);
  }
  return body;
}

// "A Red Circle, top-left!" -> "a-red-circle-top-left": a file name part that any file system takes.
function slug(caption) {
  const ascii = caption.normalize("NFKD").replace(/[\u0300-\u036f]/g, "").toLowerCase();
  return ascii.replace(/[^a-z0-9]+/g, "-").slice(0, 60).replace(/^-+|-+$/g, "") || "image";
}

// what: "rank1", "rank2", ... or "grid"; the seed makes the name say how to draw the image again.
function fileName(job, what) {
  return `${slug(job.caption)}-seed${job.seed}-${what}.png`;
}

function download(url, name, text) {
  const link = el("a", text, "download");
  link.href = url;
  link.download = name;
  return link;
}

function showResult(job) {
  const figures = job.images.map((image) => {
    const fig = el("figure");
    fig.dataset.rank = image.rank;
    if (image.score !== null) fig.dataset.score = image.score;
    const img = el("img");
    img.src = image.url;
    img.alt = `${job.caption}, rank ${image.rank}`;
    const label = image.score === null ? `#${image.rank}` : `#${image.rank} · score ${image.score.toFixed(3)}`;
    const caption = el("figcaption", label);
    caption.append(download(image.url, fileName(job, `rank${image.rank}`), "download"));
    fig.append(img, caption);
    return fig;
  });
  $("results").replaceChildren(...figures);
  const grid = $("grid-download");
  grid.href = job.grid_url;
  grid.download = fileName(job, "grid");
  $("downloads").hidden = false;
  $("results").dataset.job = job.id;
  const scored = job.images.length && job.images[0].score !== null ? "ranked by reranker score" : "no reranker: in drawing order";
  setStatus(`best ${job.keep} of ${job.candidates} for “${job.seen_as}”, ${scored}; seed ${job.seed}, ${job.elapsed.toFixed(1)} s`);
}

function clearResult() {
  $("results").replaceChildren();
  delete $("results").dataset.job;
  $("downloads").hidden = true;
}

function historyEntry(job) {
  const item = el("li");
  item.dataset.job = job.id;
  item.dataset.status = job.status;
  const what = `${job.caption} · seed ${job.seed} · best ${job.keep} of ${job.candidates}`;
  if (job.status !== "done") {
    item.append(el("span", `${what} · ${job.status}`, "hint"));
    return item;
  }
  const button = el("button", undefined, "history-item");
  button.type = "button";
  const thumb = el("img");
  thumb.src = job.images[0].url;
  thumb.alt = `${job.caption}, rank 1`;
  button.append(thumb, el("span", what));
  button.addEventListener("click", () => showResult(history.get(job.id)));
  item.append(button);
  return item;
}

// Finished jobs only: one still queued or running joins the list when it ends.
async function refreshHistory() {
  const response = await fetch("/jobs");
  if (!response.ok) return;
  const ended = (await response.json()).filter((job) => !["queued", "running"].includes(job.status));
  history.clear();
  ended.forEach((job) => history.set(job.id, job));
  $("history").replaceChildren(...ended.map(historyEntry));
}

async function poll(id) {
  for (;;) {
    const response = await fetch(`/jobs/${encodeURIComponent(id)}`);
    const job = await response.json();
    if (!response.ok) throw new Error(job.detail || response.statusText);
    if (job.status === "done" || job.status === "cancelled") return job;
    if (job.status === "failed") throw new Error(job.error);
    const bar = $("progress");
    bar.hidden = false;
    bar.max = job.progress.total;
    bar.value = job.progress.done;
    if (job.cancel_requested) setStatus("cancelling: stops at the next drawn token");
    else if (job.status === "queued") setStatus(`queued: position ${job.queue_position} in line (1 = next to run)`);
    else setStatus(`drawing image tokens: ${job.progress.done} of ${job.progress.total}`);
    await new Promise((resolve) => setTimeout(resolve, POLL_MS));
  }
}

async function cancel(id) {
  // A body of length 0: the server takes no body without a Content-Length.
  const response = await fetch(`/jobs/${encodeURIComponent(id)}/cancel`, { method: "POST", body: "" });
  if (!response.ok) setStatus((await response.json()).detail || response.statusText, true);
}

async function generate(event) {
  event.preventDefault();
  const button = $("generate");
  const stop = $("cancel");
  button.disabled = true;
  $("seen-as").textContent = "";
  try {
    const response = await fetch("/generate", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(request()),
    });
    const job = await response.json();
    if (!response.ok) throw new Error(job.detail || response.statusText);
    if (job.seen_as !== job.caption.toLowerCase()) $("seen-as").textContent = `the model reads: ${job.seen_as}`;
    stop.onclick = () => { stop.disabled = true; cancel(job.id); };
    stop.disabled = false;
    stop.hidden = false;
    const ended = await poll(job.id);
    if (ended.status === "done") showResult(ended);
    else {
      clearResult();
      setStatus(ended.elapsed === null
        ? "cancelled before it ran"
        : `cancelled after ${ended.progress.done} of ${ended.progress.total} image tokens`);
    }
  } catch (error) {
    setStatus(error.message, true);
  } finally {
    stop.hidden = true;
    stop.onclick = null;
    $("progress").hidden = true;
    button.disabled = false;
    refreshHistory();
  }
}

// The line beside each sampling box is the request schema's description of it: what the
// setting is, then (after the colon, shown) what raising or lowering it does.
async function showExplanations() {
  const response = await fetch("/openapi.json");
  const fields = (await response.json()).components.schemas.GenerateRequest.properties;
  for (const name of EXPLAINED) {
    const description = fields[name].description;
    const hint = $(`${name}-explain`);
    hint.textContent = description.slice(description.indexOf(":") + 1).trim();
    hint.title = description;
  }
}

async function main() {
  $("generate-form").addEventListener("submit", generate);
  try {
    const response = await fetch("/run");
    showRun(await response.json());
  } catch (error) {
    setStatus(`cannot read /run: ${error.message}`, true);
  }
  showExplanations().catch(() => {}); // the form works without them
  refreshHistory();
}

main();
