// Merge: models A/B/C and a mode; α per block by sliders (BASE + 25 or 19 blocks, with the
// presets) or by a spec string; β and elemental entries; every change is checked by a debounced
// dry run (POST /v1/plans/merge) whose problem is shown at its field and position, and whose
// plan is a filterable table; then submit.
import { api, openapi } from "./api.js";
import { clear, h, markedText, problemBox } from "./ui.js";

const PLAN_ROWS = 400; // rows of the plan table drawn at once (the counts cover every key)

function select(id, options, value) {
  return h("select", { id, name: id }, options.map(([v, label]) => h("option", { value: v, selected: v === value }, label)));
}

/** One vertical slider per block, BASE first; returns {el, values(), set(values)}. */
function sliders(blocks) {
  const names = ["BASE", ...blocks];
  const cells = names.map((name) => {
    const range = h("input", { type: "range", min: "0", max: "1", step: "0.01", value: "0.5", "aria-label": `α ${name}`, dataset: { block: name } });
    const number = h("output", {}, "0.50");
    range.addEventListener("input", () => (number.value = Number(range.value).toFixed(2)));
    return { name, range, number, el: h("div.slider", {}, number, range, h("label", {}, name)) };
  });
  return {
    el: h("div.sliders", { id: "sliders" }, cells.map((c) => c.el)),
    values: () => cells.map((c) => Number(c.range.value)),
    set(values, base) {
      cells.forEach((c, i) => {
        const v = i === 0 ? (base ?? Number(c.range.value)) : values[i - 1];
        if (v === undefined) return;
        c.range.value = String(v);
        c.number.value = Number(v).toFixed(2);
      });
    },
  };
}

function planTable(plan) {
  const filter = h("input", { type: "search", id: "plan-filter", placeholder: "filter by key, block or action (e.g. OUT05 attn2 merge)", size: 50 });
  const body = h("tbody");
  const shown = h("span.muted");
  const counts = {};
  for (const k of plan.keys) counts[k.action] = (counts[k.action] || 0) + 1;
  const draw = () => {
    const words = filter.value.toLowerCase().split(/\s+/).filter(Boolean);
    const rows = plan.keys.filter((k) => words.every((w) => `${k.key} ${k.block} ${k.action}`.toLowerCase().includes(w)));
    shown.textContent = `${rows.length} of ${plan.keys.length} keys${rows.length > PLAN_ROWS ? ` (first ${PLAN_ROWS} shown)` : ""}`;
    clear(
      body,
      rows.slice(0, PLAN_ROWS).map((k) =>
        h("tr", {}, h("td.mono", {}, k.key), h("td", {}, k.block), h("td.num", {}, k.alpha ?? ""), h("td.num", {}, k.beta ?? ""), h("td", { title: k.reason || "" }, k.action)),
      ),
    );
  };
  filter.addEventListener("input", draw);
  draw();
  return h(
    "section.card",
    { id: "plan" },
    h("h2", {}, "Dry run: ", `${plan.arch} · ${plan.mode} → ${plan.output}`),
    h("div.muted", {}, Object.entries(counts).map(([a, n]) => `${a}: ${n}`).join(" · ")),
    plan.warnings.length ? h("ul.warnings", {}, plan.warnings.map((w) => h("li", {}, w))) : "",
    h("div.row", {}, filter, shown),
    h("div.scroll", {}, h("table.plan", {}, h("thead", {}, h("tr", {}, ["key", "block", "α", "β", "action"].map((t) => h("th", {}, t)))), body)),
  );
}

export async function renderMerge(view, signal) {
  const [{ models }, { presets }, doc] = await Promise.all([api("v1/models", { signal }), api("v1/presets", { signal }), openapi()]);
  const checkpoints = models.filter((m) => m.kind === "checkpoint");
  const modes = doc.components.schemas.MergeRequest.properties.mode.enum;
  if (checkpoints.length < 2) {
    view.append(h("h1", {}, "Merge"), h("p", {}, "The library needs two checkpoints: upload them in the Library."));
    return;
  }
  const options = checkpoints.map((m) => [m.id, `${m.name} (${m.arch})`]);
  const modelA = select("model-a", options, checkpoints[0].id);
  const modelB = select("model-b", options, checkpoints[1].id);
  const modelC = select("model-c", [["", "—"], ...options], "");
  const mode = select("mode", modes.map((m) => [m, m]), "weighted_sum");
  const alphaKind = select("alpha-kind", [["sliders", "sliders per block"], ["spec", "spec string or preset name"]], "sliders");
  const preset = h("select", { id: "preset" });
  const spec = h("input", { type: "text", id: "alpha-spec", name: "alpha", placeholder: "IN00-IN11:0.2, M00:1, OUT00-OUT11:0.7, _:0.5", size: 60, hidden: true });
  const beta = h("input", { type: "text", id: "beta", name: "beta", placeholder: "β: a number or a spec (modes that use it)", size: 40 });
  const elemental = h("textarea", { id: "elemental", name: "elemental", rows: 3, cols: 60, placeholder: "OUT05:attn2:0.2 (one entry per line or comma)" });
  const outputName = h("input", { type: "text", id: "output-name", placeholder: "result name (.safetensors), default derived", size: 36 });
  const dtype = select("output-dtype", ["fp16", "bf16", "fp32", "keep"].map((d) => [d, d]), "fp16");
  const sliderBox = h("div");
  const problems = h("div", { id: "merge-problem" });
  const planBox = h("div");
  const submit = h("button.primary", { type: "submit", id: "merge-submit" }, "Submit merge");
  const fieldMarks = { alpha: h("div.mark-box"), beta: h("div.mark-box"), elemental: h("div.mark-box") };
  let blockSliders = null;
  let arch = null;

  async function loadArch() {
    const a = checkpoints.find((m) => m.id === modelA.value)?.arch;
    if (a === arch || !a || a === "unknown") return;
    arch = a;
    const { blocks } = await api(`v1/archs/${a}/blocks`, { signal });
    blockSliders = sliders(blocks);
    blockSliders.el.addEventListener("input", changed);
    clear(sliderBox, blockSliders.el);
    clear(preset, h("option", { value: "" }, "preset…"), Object.keys(presets[a] || {}).map((p) => h("option", { value: p }, p)));
  }

  function request() {
    const body = { model_a: modelA.value, model_b: modelB.value, mode: mode.value, output: { dtype: dtype.value } };
    if (modelC.value) body.model_c = modelC.value;
    if (outputName.value.trim()) body.output.name = outputName.value.trim();
    if (alphaKind.value === "sliders" && blockSliders) {
      const [base, ...rest] = blockSliders.values();
      body.alpha = rest;
      body.base_alpha = base;
    } else {
      const text = spec.value.trim();
      body.alpha = text === "" ? 0.5 : Number.isFinite(Number(text)) ? Number(text) : text;
    }
    const b = beta.value.trim();
    if (b) body.beta = Number.isFinite(Number(b)) ? Number(b) : b;
    if (elemental.value.trim()) body.elemental = elemental.value;
    return body;
  }

  function showProblem(error) {
    const p = error.problem || {};
    clear(problems, problemBox(error));
    for (const box of Object.values(fieldMarks)) clear(box);
    const root = (p.field || "").split(/[.[]/)[0];
    const texts = { alpha: spec.value, beta: beta.value, elemental: elemental.value };
    if (root in fieldMarks && p.position !== null && p.position !== undefined && typeof request()[root] === "string") {
      clear(fieldMarks[root], markedText(texts[root], p.position));
    }
    for (const [name, input] of [["alpha", spec], ["beta", beta], ["elemental", elemental]]) input.classList.toggle("invalid", name === root);
    if (root === "model_c") modelC.classList.add("invalid");
  }

  let timer = null;
  let sequence = 0;
  async function validate() {
    const mine = ++sequence;
    try {
      const plan = await api("v1/plans/merge", { method: "POST", body: request(), signal });
      if (mine !== sequence) return;
      clear(problems);
      for (const box of Object.values(fieldMarks)) clear(box);
      for (const input of [spec, beta, elemental, modelC]) input.classList.remove("invalid");
      clear(planBox, planTable(plan));
      submit.disabled = false;
    } catch (error) {
      if (mine !== sequence || error.name === "AbortError") return;
      showProblem(error);
      clear(planBox);
      submit.disabled = true;
    }
  }
  function changed() {
    clearTimeout(timer);
    timer = setTimeout(validate, 350);
  }

  preset.addEventListener("change", () => {
    const values = presets[arch]?.[preset.value];
    if (values && blockSliders) blockSliders.set(values);
    if (alphaKind.value === "spec" && preset.value) spec.value = preset.value;
    changed();
  });
  alphaKind.addEventListener("change", () => {
    const specMode = alphaKind.value === "spec";
    spec.hidden = !specMode;
    sliderBox.hidden = specMode;
    changed();
  });
  modelA.addEventListener("change", async () => {
    await loadArch();
    changed();
  });
  for (const input of [modelB, modelC, mode, spec, beta, elemental, outputName, dtype]) input.addEventListener("input", changed);

  const form = h(
    "form.card.merge",
    {
      id: "merge-form",
      onsubmit: async (e) => {
        e.preventDefault();
        submit.disabled = true;
        try {
          const job = await api("v1/jobs/merge", { method: "POST", body: request() });
          location.hash = `#/jobs/${job.id}`;
        } catch (error) {
          showProblem(error);
          submit.disabled = false;
        }
      },
    },
    h("div.grid", {}, h("label", {}, "Model A ", modelA), h("label", {}, "Model B ", modelB), h("label", {}, "Model C ", modelC), h("label", {}, "Mode ", mode)),
    h("div.row", {}, h("label", {}, "α by ", alphaKind), preset, spec),
    fieldMarks.alpha,
    sliderBox,
    h("div.row", {}, h("label", {}, "β ", beta)),
    fieldMarks.beta,
    h("label.block", {}, "Elemental entries", elemental),
    fieldMarks.elemental,
    h("div.row", {}, h("label", {}, "Output ", outputName), h("label", {}, "dtype ", dtype), submit),
    problems,
  );
  view.append(h("h1", {}, "Merge"), form, planBox);
  await loadArch();
  await validate();
}
