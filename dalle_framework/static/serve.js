// The page of `dalle serve`: fills the form's defaults and the run panel from GET /run,
// posts the form to POST /generate, polls GET /jobs/{id} for progress, then shows the
// ranked images. Text from the server is set with textContent only.
"use strict";

const $ = (id) => document.getElementById(id);
const POLL_MS = 250;

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
  $("guidance").value = d.sampling.guidance_scale;
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
  for (const name of ["top_p", "temperature", "guidance"]) {
    if ($(name).value !== "") body[name] = parseFloat($(name).value);
  }
  return body;
}

function showResult(job) {
  const figures = job.images.map((image) => {
    const fig = el("figure");
    fig.dataset.rank = image.rank;
    if (image.score !== null) fig.dataset.score = image.score;
    const img = el("img");
    img.src = image.url;
    img.alt = `${job.caption}, rank ${image.rank}`;
    fig.append(img, el("figcaption", image.score === null ? `#${image.rank}` : `#${image.rank} · score ${image.score.toFixed(3)}`));
    return fig;
  });
  $("results").replaceChildren(...figures);
  const scored = job.images.length && job.images[0].score !== null ? "ranked by reranker score" : "no reranker: in drawing order";
  setStatus(`best ${job.keep} of ${job.candidates} for “${job.seen_as}”, ${scored}; seed ${job.seed}, ${job.elapsed.toFixed(1)} s`);
}

async function poll(id) {
  for (;;) {
    const response = await fetch(`/jobs/${encodeURIComponent(id)}`);
    const job = await response.json();
    if (!response.ok) throw new Error(job.detail || response.statusText);
    if (job.status === "done") return job;
    if (job.status === "failed") throw new Error(job.error);
    const bar = $("progress");
    bar.hidden = false;
    bar.max = job.progress.total;
    bar.value = job.progress.done;
    setStatus(job.status === "queued"
      ? `queued (position ${job.queue_position})`
      : `drawing image tokens: ${job.progress.done} of ${job.progress.total}`);
    await new Promise((resolve) => setTimeout(resolve, POLL_MS));
  }
}

async function generate(event) {
  event.preventDefault();
  const button = $("generate");
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
    showResult(await poll(job.id));
  } catch (error) {
    setStatus(error.message, true);
  } finally {
    $("progress").hidden = true;
    button.disabled = false;
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
}

main();
