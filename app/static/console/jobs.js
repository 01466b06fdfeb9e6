// Jobs: the list, live (polled, and Server-Sent Events for the jobs still running), with
// progress bars, stages and cancel; a job's page: its request, result, warnings, error and
// artifacts, live until it ends, and the views of inspect, dump and sweep results.
import { ApiError, api, readEvents } from "./api.js";
import { bytes, clear, h, json, jobProgress, problemBox, updateJobProgress, when } from "./ui.js";
import { renderDump, renderInspect, renderSweep } from "./probe.js";

const ACTIVE = new Set(["queued", "running"]);
const LIST_POLL_MS = 3000;
const LIVE_STREAMS = 3; // SSE streams the list keeps open at once (browsers allow ~6 connections per host)

function cancelButton(job, status) {
  return h("button.danger", {
    type: "button",
    hidden: !ACTIVE.has(job.status),
    onclick: async (e) => {
      e.target.disabled = true;
      try {
        await api(`v1/jobs/${job.id}`, { method: "DELETE" });
      } catch (error) {
        clear(status, problemBox(error));
      }
    },
  }, "Cancel");
}

const FINAL = new Set(["succeeded", "failed", "canceled"]);
const EVENT_RETRIES = 5; // streams in a row that fail to open before giving up (as the CLI's follow)

function sleep(ms, signal) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(resolve, ms);
    signal?.addEventListener("abort", () => {
      clearTimeout(timer);
      reject(new DOMException("aborted", "AbortError"));
    }, { once: true });
  });
}

/** Follows a job by SSE until it ends or `signal` aborts; onJob(job) per change. A stream that
 * breaks off before its `end` event (a proxy's idle timeout, the service restarting) is not the
 * job's end: the job is asked for, then followed again, with a growing pause while streams fail.
 * A refusal from the API (401: the key form is back; 404) ends it with that error. */
export async function follow(id, onJob, signal, { pause = 500 } = {}) {
  let failures = 0;
  try {
    for (;;) {
      let ended = false;
      let last = null;
      try {
        await readEvents(`v1/jobs/${id}/events`, (name, data) => {
          if (name === "end") ended = true;
          else if (name === "job") {
            last = data;
            failures = 0;
            onJob(data);
          }
        }, signal);
      } catch (error) {
        // A refusal (401, 404) is final; a network error or a 5xx (a proxy while the service
        // restarts) is tried again, a few times in a row at most.
        if (error.name === "AbortError" || (error instanceof ApiError && !(error.problem?.status >= 500))) throw error;
        if (++failures > EVENT_RETRIES) throw error;
        await sleep(Math.min(pause * 2 ** failures, 5000), signal);
        continue;
      }
      if (ended || FINAL.has(last?.status)) return;
      // Cut off: where is the job now?
      const job = await api(`v1/jobs/${id}`, { signal });
      onJob(job);
      if (FINAL.has(job.status)) return;
      await sleep(pause, signal);
    }
  } catch (error) {
    if (error.name !== "AbortError") throw error;
  }
}

export async function renderJobs(view, signal) {
  const status = h("div.status");
  const body = h("tbody");
  const kind = h("select", { id: "jobs-kind" }, h("option", { value: "" }, "every kind"));
  const rows = new Map(); // id → {row, bar, state, cancel, streaming}
  const kinds = new Set();

  function row(job) {
    const bar = jobProgress(job);
    const state = h("td.status", {}, job.status);
    const cancel = cancelButton(job, status);
    const tr = h(
      "tr",
      { dataset: { job: job.id } },
      h("td.mono", {}, h("a", { href: `#/jobs/${job.id}` }, job.id)),
      h("td", {}, job.kind),
      state,
      h("td.wide", {}, bar.el),
      h("td", {}, when(job.created_at)),
      h("td", {}, cancel),
    );
    return { tr, bar, state, cancel, streaming: false };
  }

  function update(entry, job) {
    entry.state.textContent = job.status;
    updateJobProgress(entry.bar, job);
    entry.cancel.hidden = !ACTIVE.has(job.status);
  }

  async function refresh() {
    const query = kind.value ? `?kind=${encodeURIComponent(kind.value)}` : "";
    const { jobs } = await api(`v1/jobs${query}`, { signal });
    const entries = jobs.map((job) => {
      let entry = rows.get(job.id);
      if (!entry) rows.set(job.id, (entry = row(job)));
      else update(entry, job);
      kinds.add(job.kind);
      return entry;
    });
    clear(body, entries.length ? entries.map((e) => e.tr) : h("tr", {}, h("td", { colspan: 6 }, "No jobs yet.")));
    for (const k of kinds) if (![...kind.options].some((o) => o.value === k)) kind.append(h("option", { value: k }, k));
    let streaming = [...rows.values()].filter((e) => e.streaming).length;
    for (const job of jobs) {
      const entry = rows.get(job.id);
      if (!ACTIVE.has(job.status) || entry.streaming || streaming >= LIVE_STREAMS) continue;
      entry.streaming = true;
      streaming++;
      follow(job.id, (j) => update(entry, j), signal)
        .catch(() => {})
        .finally(() => (entry.streaming = false));
    }
  }

  kind.addEventListener("change", () => refresh().catch((e) => clear(status, problemBox(e))));
  view.append(h("h1", {}, "Jobs"), h("div.row", {}, h("label", {}, "Kind ", kind)), status, h("table.jobs", { id: "jobs" }, h("thead", {}, h("tr", {}, ["Job", "Kind", "Status", "Progress", "Created", ""].map((t) => h("th", {}, t)))), body));
  await refresh();
  const timer = setInterval(() => refresh().catch((e) => e.name !== "AbortError" && clear(status, problemBox(e))), LIST_POLL_MS);
  signal.addEventListener("abort", () => clearInterval(timer));
}

function artifactList(job) {
  if (!job.artifacts.length) return h("p.muted", {}, "No artifacts (they are listed once a job has succeeded).");
  return h(
    "div",
    {},
    h("p", {}, h("a.button", { href: `v1/jobs/${job.id}/artifacts.zip`, download: `${job.id}-artifacts.zip` }, "Download all (zip)")),
    h(
      "table.artifacts",
      {},
      job.artifacts.map((a) =>
        h("tr", {}, h("td", {}, h("a", { href: a.url, download: a.name }, a.name)), h("td", {}, a.media_type), h("td.num", {}, bytes(a.size_bytes)), h("td.mono", { title: a.sha256 }, a.sha256.slice(0, 12))),
      ),
    ),
  );
}

function resultLinks(job) {
  const model = job.result?.model;
  if (!model?.download_url) return "";
  return h(
    "p.result-model",
    {},
    "Result: ",
    h("strong", {}, model.name),
    ` (${model.short_hash}) `,
    h("a.button", { href: model.download_url, download: model.name, id: "result-download" }, "Download model"),
  );
}

export async function renderJob(view, id, signal) {
  let job = await api(`v1/jobs/${id}`, { signal });
  const status = h("div.status");
  const bar = jobProgress(job);
  const state = h("span.badge", { id: "job-status" }, job.status);
  const cancel = cancelButton(job, status);
  const details = h("div");
  const views = h("div");

  function drawDetails() {
    const warnings = [...(job.result?.warnings || [])];
    clear(
      details,
      job.error ? h("section.card", {}, h("h2", {}, "Error"), problemBox({ problem: job.error })) : "",
      resultLinks(job),
      warnings.length ? h("section.card", {}, h("h2", {}, "Warnings"), h("ul.warnings", {}, warnings.map((w) => h("li", {}, w)))) : "",
      h("div.columns", {}, h("section.card", {}, h("h2", {}, "Request"), json(job.request)), h("section.card", {}, h("h2", {}, "Result"), job.result ? json(job.result) : h("p.muted", {}, "None yet."))),
      h("section.card", { id: "artifacts" }, h("h2", {}, "Artifacts"), artifactList(job)),
    );
  }

  async function drawViews() {
    if (job.status !== "succeeded") return;
    if (job.kind === "inspect") clear(views, renderInspect(job));
    else if (job.kind === "dump") clear(views, await renderDump(job, signal));
    else if (job.kind === "sweep") clear(views, await renderSweep(job, signal));
  }

  view.append(
    h("h1", {}, `${job.kind} job `, h("span.mono", {}, job.id), " ", state),
    h("div.row", {}, h("div.wide", { id: "job-progress" }, bar.el), cancel),
    h("p.muted", {}, `created ${when(job.created_at)}`, job.finished_at ? ` · finished ${when(job.finished_at)}` : ""),
    status,
    views,
    details,
  );
  drawDetails();
  await drawViews();
  if (ACTIVE.has(job.status)) {
    follow(
      id,
      (next) => {
        const ended = ACTIVE.has(job.status) && !ACTIVE.has(next.status);
        job = next;
        state.textContent = job.status;
        updateJobProgress(bar, job);
        cancel.hidden = !ACTIVE.has(job.status);
        if (ended) {
          drawDetails();
          drawViews().catch((e) => clear(status, problemBox(e)));
        }
      },
      signal,
    ).catch((e) => clear(status, problemBox(e)));
  }
}
