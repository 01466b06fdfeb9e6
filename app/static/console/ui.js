// Small DOM helpers shared by the views: element building, formatting, progress bars, problems,
// inline-SVG bar charts and the click-to-zoom overlay.

/** h("div.card", {onclick}, child, ...): an element; strings become text nodes. */
export function h(tag, attrs = {}, ...children) {
  const [name, ...classes] = tag.split(".");
  const el = document.createElement(name);
  if (classes.length) el.className = classes.join(" ");
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else if (key === "dataset") Object.assign(el.dataset, value);
    else if (key in el && typeof value !== "string") el[key] = value;
    else el.setAttribute(key, value === true ? "" : value);
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : String(child));
  }
}

export function clear(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

export function bytes(n) {
  if (n === null || n === undefined) return "";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i++;
  }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

export function when(iso) {
  return iso ? new Date(iso).toLocaleString() : "";
}

export function json(value) {
  return h("pre.json", {}, JSON.stringify(value, null, 2));
}

/** A progress bar: returns {el, set(completed, total, label)}. */
export function progressBar() {
  const fill = h("div.fill");
  const label = h("span.label");
  const el = h("div.progress", { role: "progressbar", "aria-valuemin": "0", "aria-valuemax": "100" }, fill, label);
  return {
    el,
    set(completed, total, text, status) {
      const pct = total > 0 ? Math.min(100, Math.round((100 * completed) / total)) : status === "succeeded" ? 100 : 0;
      fill.style.width = `${pct}%`;
      el.setAttribute("aria-valuenow", String(pct));
      el.dataset.status = status || "";
      label.textContent = text ?? `${pct}%`;
    },
  };
}

export function jobProgress(job) {
  const bar = progressBar();
  updateJobProgress(bar, job);
  return bar;
}

export function updateJobProgress(bar, job) {
  const p = job.progress || { completed: 0, total: 0, stage: "" };
  const pct = p.total > 0 ? Math.round((100 * p.completed) / p.total) : job.status === "succeeded" ? 100 : 0;
  const done = job.status === "succeeded" ? 100 : pct;
  const active = job.status === "queued" || job.status === "running";
  bar.set(done, 100, `${job.status}${active && p.stage ? ` · ${p.stage}` : ""} · ${done}%`, job.status);
}

/** A problem (RFC 9457) as a message block. */
export function problemBox(error) {
  const p = error.problem || { title: "Error", detail: String(error.message || error) };
  return h(
    "div.problem",
    { role: "alert" },
    h("strong", {}, p.title || "Error"),
    p.status ? ` (${p.status})` : "",
    p.field ? h("span.field", {}, ` field ${p.field}${p.position !== null && p.position !== undefined ? ` at ${p.position}` : ""}`) : "",
    p.detail ? h("div", {}, p.detail) : "",
  );
}

/** Text with the character at `position` marked (where a spec string went wrong). */
export function markedText(text, position) {
  const at = Math.max(0, Math.min(position, text.length));
  return h(
    "div.marked",
    {},
    text.slice(0, at),
    h("mark", {}, text.slice(at, at + 1) || "\u2003"),
    text.slice(at + 1),
  );
}

const SVG = "http://www.w3.org/2000/svg";
function svg(tag, attrs = {}, ...children) {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
  for (const c of children) el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return el;
}

/** A vertical bar chart of [{label, value}] as inline SVG (one bar per entry). */
export function barChart(entries, { title = "", format = (v) => v.toPrecision(3), height = 180 } = {}) {
  const values = entries.map((e) => (Number.isFinite(e.value) ? e.value : 0));
  const max = Math.max(...values, 0) || 1;
  const barW = 26;
  const left = 8;
  const top = 22;
  const plotH = height - top - 44;
  const width = left * 2 + entries.length * barW;
  const chart = svg("svg", { class: "chart", viewBox: `0 0 ${width} ${height}`, width, height, role: "img", "aria-label": title });
  chart.append(svg("text", { x: left, y: 14, class: "chart-title" }, title));
  entries.forEach((e, i) => {
    const v = values[i];
    const barH = (plotH * v) / max;
    const x = left + i * barW;
    const bar = svg("rect", { x: x + 3, y: top + plotH - barH, width: barW - 6, height: Math.max(barH, 0.5), class: "bar" });
    bar.append(svg("title", {}, `${e.label}: ${format(v)}`));
    chart.append(bar);
    chart.append(svg("text", { x: x + barW / 2, y: top + plotH + 8, class: "chart-label", transform: `rotate(60 ${x + barW / 2} ${top + plotH + 8})` }, e.label));
  });
  chart.append(svg("line", { x1: left, x2: width - left, y1: top + plotH, y2: top + plotH, class: "axis" }));
  return chart;
}

/** A horizontal bar chart (rankings): label, bar, value per row. */
export function rankChart(entries, { title = "", format = (v) => v.toFixed(3) } = {}) {
  const max = Math.max(...entries.map((e) => e.value), 0) || 1;
  const rowH = 16;
  const labelW = 70;
  const barMax = 320;
  const height = 24 + entries.length * rowH;
  const chart = svg("svg", { class: "chart", viewBox: `0 0 ${labelW + barMax + 70} ${height}`, width: labelW + barMax + 70, height, role: "img", "aria-label": title });
  chart.append(svg("text", { x: 0, y: 14, class: "chart-title" }, title));
  entries.forEach((e, i) => {
    const y = 22 + i * rowH;
    chart.append(svg("text", { x: labelW - 6, y: y + 11, class: "chart-label end" }, e.label));
    const bar = svg("rect", { x: labelW, y: y + 2, width: Math.max(0.5, (barMax * e.value) / max), height: rowH - 4, class: "bar" });
    bar.append(svg("title", {}, `${e.label}: ${format(e.value)}`));
    chart.append(bar);
    chart.append(svg("text", { x: labelW + (barMax * e.value) / max + 4, y: y + 11, class: "chart-label" }, format(e.value)));
  });
  return chart;
}

// -- zoom overlay ----------------------------------------------------------------------------
let zoomScale = 1;

function setZoom(scale) {
  zoomScale = Math.max(0.25, Math.min(32, scale));
  const img = document.getElementById("zoom-img");
  // Layout size rather than a transform: the stage scrolls over the whole zoomed image.
  if (img.naturalWidth) img.style.width = `${Math.round(img.naturalWidth * zoomScale)}px`;
  document.getElementById("zoom-level").textContent = `${Math.round(zoomScale * 100)}%`;
}

/** Opens `src` (an <img> or <canvas> source) in the overlay, fitted to the window first. */
export function openZoom(src, alt = "") {
  const overlay = document.getElementById("zoom");
  const img = document.getElementById("zoom-img");
  img.alt = alt;
  img.onload = () => {
    const fit = Math.min((window.innerWidth * 0.85) / img.naturalWidth, (window.innerHeight * 0.8) / img.naturalHeight);
    setZoom(Math.max(1, Math.floor(fit * 4) / 4));
  };
  img.src = src;
  overlay.hidden = false;
}

export function installZoom() {
  const overlay = document.getElementById("zoom");
  overlay.addEventListener("click", (e) => {
    const action = e.target.dataset.zoom;
    if (action === "in") setZoom(zoomScale * 1.5);
    else if (action === "out") setZoom(zoomScale / 1.5);
    else if (action === "close" || e.target.classList.contains("zoom-stage")) overlay.hidden = true;
  });
  overlay.addEventListener("wheel", (e) => {
    e.preventDefault();
    setZoom(zoomScale * (e.deltaY < 0 ? 1.25 : 0.8));
  }, { passive: false });
  document.addEventListener("keydown", (e) => {
    if (e.key === "Escape") overlay.hidden = true;
  });
}

/** An <img> of an artifact that opens in the zoom overlay when clicked. */
export function zoomable(src, alt, cls = "thumb") {
  return h(`img.${cls}`, { src, alt, title: alt, loading: "lazy", onclick: () => openZoom(src, alt) });
}
