// What probe jobs produced, to look at: an inspect's per-block table as charts; a dump's
// features (and per-block prompt differences) as a block × step gallery with zoom and a colour
// scale, attention maps and token heatmaps overlaid on the image; a sweep's grid, influence
// ranking and a baseline ↔ variant flicker per cell.
import { api } from "./api.js";
import { barChart, clear, h, openZoom, rankChart, zoomable } from "./ui.js";

const FLICKER_MS = 500;

function blockOrder(name) {
  const m = /^(BASE|IN|M|OUT)(\d*)$/.exec(name) || [];
  return { BASE: 0, IN: 1, M: 2, OUT: 3 }[m[1]] * 100 + Number(m[2] || 0);
}

export function renderInspect(job) {
  const blocks = job.result.blocks;
  return h(
    "section.card",
    { id: "inspect-chart" },
    h("h2", {}, `Per block: ${job.result.model} (${job.result.arch}, ${job.result.total_params.toLocaleString()} parameters)`),
    barChart(blocks.map((b) => ({ label: b.block, value: b.mean_abs ?? 0 })), { title: "mean |w|" }),
    barChart(blocks.map((b) => ({ label: b.block, value: b.params })), { title: "parameters", format: (v) => v.toLocaleString() }),
    h(
      "table",
      {},
      h("thead", {}, h("tr", {}, ["block", "parameters", "tensors", "mean |w|", "dtypes"].map((t) => h("th", {}, t)))),
      h("tbody", {}, blocks.map((b) => h("tr", {}, h("td", {}, b.block), h("td.num", {}, b.params.toLocaleString()), h("td.num", {}, b.tensors), h("td.num", {}, b.mean_abs?.toPrecision(4) ?? ""), h("td", {}, Object.entries(b.dtypes).map(([d, n]) => `${d}: ${n}`).join(", "))))),
    ),
  );
}

// -- colour scales -----------------------------------------------------------------------------
// A few stops of each map, interpolated into a 256-entry table.
const SCALES = {
  viridis: ["#440154", "#3b528b", "#21918c", "#5ec962", "#fde725"],
  magma: ["#000004", "#51127c", "#b73779", "#fc8961", "#fcfdbf"],
  coolwarm: ["#3b4cc0", "#8db0fe", "#dddddd", "#f49a7b", "#b40426"],
};

function lut(name) {
  const stops = SCALES[name].map((c) => [1, 3, 5].map((i) => parseInt(c.slice(i, i + 2), 16)));
  const table = new Uint8ClampedArray(256 * 3);
  for (let i = 0; i < 256; i++) {
    const t = (i / 255) * (stops.length - 1);
    const k = Math.min(Math.floor(t), stops.length - 2);
    const f = t - k;
    for (let c = 0; c < 3; c++) table[i * 3 + c] = stops[k][c] * (1 - f) + stops[k + 1][c] * f;
  }
  return table;
}

/** The image at `src` drawn in a canvas with the luminance mapped through `scale`. */
function colourised(src, alt, scale) {
  const canvas = h("canvas.thumb", { title: alt, "aria-label": alt });
  const img = new Image();
  img.onload = () => {
    canvas.width = img.naturalWidth;
    canvas.height = img.naturalHeight;
    const ctx = canvas.getContext("2d");
    ctx.drawImage(img, 0, 0);
    const data = ctx.getImageData(0, 0, canvas.width, canvas.height);
    const table = lut(scale);
    const px = data.data;
    for (let i = 0; i < px.length; i += 4) {
      const v = Math.round(0.299 * px[i] + 0.587 * px[i + 1] + 0.114 * px[i + 2]);
      px[i] = table[v * 3];
      px[i + 1] = table[v * 3 + 1];
      px[i + 2] = table[v * 3 + 2];
    }
    ctx.putImageData(data, 0, 0);
  };
  img.src = src;
  canvas.addEventListener("click", () => openZoom(canvas.toDataURL("image/png"), alt));
  return canvas;
}

function legend(scale) {
  if (scale === "saved") return h("span.muted", {}, "colours as saved");
  const canvas = h("canvas.legend", { width: 256, height: 10 });
  const ctx = canvas.getContext("2d");
  const table = lut(scale);
  for (let i = 0; i < 256; i++) {
    ctx.fillStyle = `rgb(${table[i * 3]},${table[i * 3 + 1]},${table[i * 3 + 2]})`;
    ctx.fillRect(i, 0, 1, 10);
  }
  return h("span.legend-box", {}, "low ", canvas, " high");
}

// -- dump ----------------------------------------------------------------------------------------
const GALLERY_NAME = /^(features|diff)_([A-Z]+\d+)_step(\d+)_(cond|uncond)(?:_(.+))?\.(png)$/;

function gallery(job) {
  const cells = new Map(); // `${kind}/${half}/${block}/${step}` → artifact
  const blocks = new Set();
  const steps = new Set();
  const kinds = new Set();
  const halves = new Set();
  for (const a of job.artifacts) {
    const m = GALLERY_NAME.exec(a.name);
    if (!m || m[5]) continue; // batch items beyond the first stay in the artifact list
    const [, kind, block, step, half] = m;
    cells.set(`${kind}/${half}/${block}/${Number(step)}`, a);
    kinds.add(kind);
    blocks.add(block);
    steps.add(Number(step));
    halves.add(half);
  }
  if (!cells.size) return "";
  const kind = h("select", { id: "gallery-kind" }, [...kinds].map((k) => h("option", { value: k }, k === "diff" ? "per-block prompt difference" : k)));
  const half = h("select", { id: "gallery-half" }, [...halves].sort().map((x) => h("option", { value: x, selected: x === "cond" }, x)));
  const scale = h("select", { id: "gallery-scale" }, ["saved", ...Object.keys(SCALES)].map((s) => h("option", { value: s, selected: s === "viridis" }, s === "saved" ? "as saved" : s)));
  const legendBox = h("span");
  const table = h("table.gallery", { id: "gallery" });
  const blockList = [...blocks].sort((a, b) => blockOrder(a) - blockOrder(b));
  const stepList = [...steps].sort((a, b) => a - b);
  const draw = () => {
    const s = kind.value === "diff" ? "saved" : scale.value; // differences are rendered in colour already
    clear(legendBox, legend(s));
    clear(
      table,
      h("thead", {}, h("tr", {}, h("th", {}, "block \\ step"), stepList.map((st) => h("th", {}, st)))),
      h(
        "tbody",
        {},
        blockList.map((b) =>
          h(
            "tr",
            {},
            h("th", {}, b),
            stepList.map((st) => {
              const a = cells.get(`${kind.value}/${half.value}/${b}/${st}`);
              if (!a) return h("td");
              return h("td", {}, s === "saved" ? zoomable(a.url, a.name) : colourised(a.url, a.name, s));
            }),
          ),
        ),
      ),
    );
  };
  for (const control of [kind, half, scale]) control.addEventListener("change", draw);
  draw();
  return h(
    "section.card",
    { id: "dump-gallery" },
    h("h2", {}, "Block × step gallery"),
    h("div.row", {}, h("label", {}, "Show ", kind), h("label", {}, "Half ", half), h("label", {}, "Colour scale ", scale), legendBox),
    h("p.muted", {}, "Click an image to zoom (wheel or +/− in the viewer)."),
    h("div.scroll", {}, table),
  );
}

async function attention(job, signal) {
  const byName = new Map(job.artifacts.map((a) => [a.name, a]));
  const heatmaps = new Map(); // token position → artifact
  for (const a of job.artifacts) {
    const m = /^heatmap_t(\d+)_(.*)\.png$/.exec(a.name);
    if (m) heatmaps.set(Number(m[1]), { artifact: a, word: m[2] });
  }
  const maps = job.artifacts.filter((a) => a.name.startsWith("attention_"));
  const image = byName.get("image_0.png");
  if (!heatmaps.size && !maps.length) return "";
  // The tokens of the prompt the probed blocks read (a layer prompt's groups resolved).
  const prompts = Object.values(job.result?.prompts || {});
  const prompt = job.request.prompt.includes("(~:") && prompts.length ? prompts[Math.floor(prompts.length / 2)] : job.request.prompt;
  let tokens;
  try {
    tokens = (await api(`v1/archs/${job.result.arch}/tokenize`, { method: "POST", body: { prompt }, signal })).tokens;
  } catch {
    tokens = [...heatmaps.entries()].map(([position, x]) => ({ position, text: x.word }));
  }
  const overlay = h("img.overlay", { alt: "" });
  const opacity = h("input", { type: "range", min: "0", max: "1", step: "0.05", value: "0.6", id: "heatmap-opacity" });
  opacity.addEventListener("input", () => (overlay.style.opacity = opacity.value));
  overlay.style.opacity = opacity.value;
  const chips = h("div.tokens", { id: "tokens" });
  const choose = (position) => {
    const entry = heatmaps.get(position);
    overlay.hidden = !entry;
    if (entry) overlay.src = entry.artifact.url;
    for (const chip of chips.children) chip.classList.toggle("active", Number(chip.dataset.position) === position);
  };
  for (const t of tokens) {
    chips.append(h("button.token", { type: "button", disabled: !heatmaps.has(t.position), dataset: { position: t.position }, onclick: () => choose(t.position) }, t.text));
  }
  const first = tokens.find((t) => heatmaps.has(t.position) && t.position > 0);
  if (first) choose(first.position);
  return h(
    "section.card",
    { id: "attention" },
    h("h2", {}, "Attention"),
    h("p.muted", {}, "Choose a token: its heatmap (averaged over heads, blocks and steps) over the image."),
    chips,
    h("div.row", {}, h("div.stack", {}, image ? h("img.base", { src: image.url, alt: "generated image" }) : "", overlay), h("label", {}, "Heatmap opacity ", opacity)),
    maps.length ? h("div", {}, h("h3", {}, "Maps per block and step (a row per head, a column per token)"), h("div.thumbs", {}, maps.map((a) => h("figure", {}, zoomable(a.url, a.name, "map"), h("figcaption", {}, a.name))))) : "",
  );
}

function layerPrompts(job) {
  const prompts = job.result?.prompts || {};
  const values = Object.values(prompts);
  if (new Set(values).size < 2) return "";
  const counts = {};
  for (const v of values) counts[v] = (counts[v] || 0) + 1;
  const common = Object.entries(counts).sort((a, b) => b[1] - a[1])[0][0];
  return h(
    "section.card",
    { id: "layer-prompts" },
    h("h2", {}, "Per-block prompts"),
    h("table", {}, Object.entries(prompts).map(([block, p]) => h(`tr${p === common ? "" : ".differs"}`, {}, h("th", {}, block), h("td", {}, p)))),
  );
}

export async function renderDump(job, signal) {
  const images = job.artifacts.filter((a) => /^image_\d+\.png$/.test(a.name));
  return h(
    "div",
    {},
    images.length ? h("section.card", {}, h("h2", {}, "Images"), h("div.thumbs", {}, images.map((a) => zoomable(a.url, a.name, "image")))) : "",
    gallery(job),
    await attention(job, signal),
    layerPrompts(job),
  );
}

// -- sweep ---------------------------------------------------------------------------------------
function flicker(job, signal) {
  const names = new Set(job.artifacts.map((a) => a.name));
  const url = (name) => job.artifacts.find((a) => a.name === name)?.url;
  const rows = job.result.rows || [];
  const variants = [...new Set(rows.map((r) => r.variant))];
  const seeds = [...new Set(rows.map((r) => r.seed))];
  if (!variants.length) return "";
  const variant = h("select", { id: "flicker-variant" }, variants.map((v) => h("option", { value: v }, rows.find((r) => r.variant === v)?.label || v)));
  const seed = h("select", { id: "flicker-seed" }, seeds.map((s) => h("option", { value: s }, `seed ${s}`)));
  const frame = h("img.image", { id: "flicker-image", alt: "" });
  const which = h("span.badge", { id: "flicker-which" });
  const gif = h("img.image", { alt: "baseline ↔ variant GIF" });
  const diff = h("img.image", { alt: "difference" });
  const stats = h("div.muted");
  let showVariant = false;
  let frames = [];
  const show = (img, name) => {
    img.hidden = !names.has(name);
    if (names.has(name)) img.src = url(name);
    else img.removeAttribute("src");
  };
  const pick = () => {
    const base = `baseline_s${seed.value}.png`;
    const own = `${variant.value}_s${seed.value}.png`;
    frames = [base, own].filter((n) => names.has(n)).map((n) => ({ name: n, url: url(n) }));
    show(gif, `flip_${variant.value}_s${seed.value}.gif`);
    show(diff, `diff_${variant.value}_s${seed.value}.png`);
    const row = rows.find((r) => r.variant === variant.value && String(r.seed) === seed.value);
    stats.textContent = row ? `changed share ${row.changed_share.toFixed(3)} · mean |Δ| ${row.mean_abs_diff.toFixed(2)} · SSIM ${row.ssim.toFixed(3)}` : "";
    tick();
  };
  const tick = () => {
    if (!frames.length) return;
    showVariant = !showVariant && frames.length > 1;
    const f = frames[showVariant ? 1 : 0];
    frame.src = f.url;
    frame.alt = f.name;
    which.textContent = showVariant ? variant.value : "baseline";
  };
  variant.addEventListener("change", pick);
  seed.addEventListener("change", pick);
  frame.addEventListener("click", () => openZoom(frame.src, frame.alt));
  const timer = setInterval(tick, FLICKER_MS);
  signal.addEventListener("abort", () => clearInterval(timer));
  pick();
  return h(
    "section.card",
    { id: "flicker" },
    h("h2", {}, "Baseline ↔ variant"),
    h("div.row", {}, h("label", {}, "Variant ", variant), seed, which, stats),
    h("div.thumbs", {}, h("figure", {}, frame, h("figcaption", {}, `flicker every ${FLICKER_MS} ms`)), h("figure", {}, gif, h("figcaption", {}, "GIF")), h("figure", {}, diff, h("figcaption", {}, "difference"))),
  );
}

export async function renderSweep(job, signal) {
  const grid = job.artifacts.find((a) => a.name === "grid.png");
  const ranking = job.result.ranking || [];
  return h(
    "div.side-by-side",
    {},
    grid ? h("section.card", { id: "sweep-grid" }, h("h2", {}, "Grid"), h("p.muted", {}, "Click to zoom."), zoomable(grid.url, "grid.png", "grid")) : "",
    ranking.length ? h("section.card", { id: "ranking" }, h("h2", {}, "Influence"), rankChart(ranking.map((r) => ({ label: r.label || r.variant, value: r.changed_share })), { title: "mean changed share (pixels beyond the threshold)" })) : "",
    flicker(job, signal),
  );
}
