// The dashboard's script: live updates of the job list and a job's page
// (the server renders; this swaps in fresh HTML), and the job folder upload.
"use strict";

async function swap(id, url) {
  const r = await fetch(url, { credentials: "same-origin" });
  if (r.status === 401 || r.redirected) { location.href = "/ui/login"; return null; }
  if (!r.ok) return null;
  const old = document.getElementById(id);
  const holder = document.createElement("div");
  holder.innerHTML = await r.text();
  const fresh = holder.querySelector("#" + id);
  if (old && fresh) old.replaceWith(fresh);
  return fresh;
}

// The job list refreshes every two seconds.
const jobs = document.getElementById("jobs");
if (jobs) setInterval(() => swap("jobs", "/ui?fragment=1"), 2000);

// A job's page follows the job's events and re-renders on each change.
const job = document.getElementById("job");
if (job) {
  const id = job.dataset.job;
  const ended = (el) => ["completed", "failed", "terminated", "deleted"].includes(el.dataset.state);
  let pending = null;
  const live = new EventSource(`/ui/jobs/${encodeURIComponent(id)}/live?version=${job.dataset.version}`);
  live.onmessage = () => {
    if (pending) return;
    pending = setTimeout(async () => {
      pending = null;
      const fresh = await swap("job", `/ui/jobs/${encodeURIComponent(id)}?fragment=1`);
      if (fresh && ended(fresh)) live.close();
    }, 200);
  };
  if (ended(job)) live.close();
}

// A new job from a job folder: the files go to the engine as base64.
function base64(buffer) {
  const bytes = new Uint8Array(buffer);
  let s = "";
  for (let i = 0; i < bytes.length; i += 0x8000) s += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  return btoa(s);
}

function esc(s) {
  return String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}

const upload = document.getElementById("upload");
if (upload) {
  upload.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const out = document.getElementById("upload-result");
    const files = {};
    for (const f of document.getElementById("folder").files) {
      files[f.webkitRelativePath || f.name] = base64(await f.arrayBuffer());
    }
    out.textContent = `Sending ${Object.keys(files).length} files…`;
    const r = await fetch("/ui/upload", {
      method: "POST", credentials: "same-origin", headers: { "content-type": "application/json" },
      body: JSON.stringify({ files, start: document.getElementById("start").checked }),
    });
    const body = await r.json().catch(() => ({}));
    if (r.ok) { location.href = body.url; return; }
    const problems = (body.errors || []).map((p) => `<li><code>${esc(p.path)}</code>: ${esc(p.message)} <span class="hint">${esc(p.hint)}</span></li>`).join("");
    out.innerHTML = `<p class="error" id="upload-error">${esc(body.detail || r.statusText)}</p><ul class="problems">${problems}</ul>`;
  });
}
