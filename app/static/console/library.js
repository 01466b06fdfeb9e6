// Library: every model and LoRA (arch, variant, hashes, size, lineage), upload with a progress
// bar, download (a plain link: the browser streams the file, authorised by the key cookie),
// delete, and inspect (a job whose page charts the per-block table).
import { api, uploadModel } from "./api.js";
import { bytes, clear, h, problemBox, progressBar } from "./ui.js";

/** The parents a merged model records in its `sd_merge_models` metadata (sha256 → entry). */
function lineage(model) {
  const text = model.metadata?.sd_merge_models;
  if (!text) return "";
  try {
    const parents = JSON.parse(text);
    return Object.entries(parents)
      .map(([sha, entry]) => entry?.name || sha.slice(0, 10))
      .join(" + ");
  } catch {
    return "";
  }
}

function uploadForm(onDone) {
  const file = h("input", { type: "file", id: "upload-file", accept: ".safetensors,.ckpt" });
  const name = h("input", { type: "text", id: "upload-name", placeholder: "name in the library (.safetensors or .ckpt)", size: 36 });
  const bar = progressBar();
  bar.el.hidden = true;
  const status = h("div.status", { id: "upload-status" });
  file.addEventListener("change", () => {
    if (file.files[0] && !name.value) name.value = file.files[0].name;
  });
  const button = h("button", { type: "submit", id: "upload-button" }, "Upload");
  return h(
    "form.card.upload",
    {
      onsubmit: async (e) => {
        e.preventDefault();
        const chosen = file.files[0];
        if (!chosen) return;
        button.disabled = true;
        bar.el.hidden = false;
        clear(status);
        try {
          const model = await uploadModel(chosen, name.value || chosen.name, (loaded, total) =>
            bar.set(loaded, total, `${bytes(loaded)} / ${bytes(total)}`),
          );
          bar.set(1, 1, `done · ${model.name}`, "succeeded");
          clear(status, `Added ${model.name} (${model.arch}, ${model.short_hash})`);
          file.value = "";
          name.value = "";
          onDone();
        } catch (error) {
          bar.set(0, 1, "failed", "failed");
          clear(status, problemBox(error));
        } finally {
          button.disabled = false;
        }
      },
    },
    h("h2", {}, "Upload a model"),
    h("div.row", {}, file, name, button),
    bar.el,
    status,
  );
}

function deleteButton(model, onDone, status) {
  let armed = false;
  const button = h("button.danger", {
    type: "button",
    onclick: async () => {
      if (!armed) {
        armed = true;
        button.textContent = "Confirm delete";
        setTimeout(() => {
          armed = false;
          button.textContent = "Delete";
        }, 4000);
        return;
      }
      try {
        await api(`v1/models/${encodeURIComponent(model.id)}`, { method: "DELETE" });
        onDone();
      } catch (error) {
        clear(status, problemBox(error));
      }
    },
  }, "Delete");
  return button;
}

async function inspect(model, status) {
  try {
    const job = await api("v1/jobs/inspect", { method: "POST", body: { model: model.id } });
    location.hash = `#/jobs/${job.id}`;
  } catch (error) {
    clear(status, problemBox(error));
  }
}

function modelRow(model, refresh, status) {
  const variant = model.variant || {};
  return h(
    "tr",
    { dataset: { model: model.id } },
    h("td", {}, h("strong", {}, model.name), h("div.muted", {}, model.kind === "lora" ? `LoRA${model.lora?.format ? ` · ${model.lora.format}` : ""}` : model.format)),
    h("td", {}, model.arch),
    h("td", { title: variant.title || "" }, variant.name || ""),
    h("td.mono", { title: `sha256 ${model.sha256}\nlegacy ${model.legacy_hash}` }, model.short_hash, h("div.muted", {}, model.legacy_hash)),
    h("td.num", {}, bytes(model.size_bytes)),
    h("td.num", {}, model.key_count),
    h("td.lineage", {}, lineage(model)),
    h(
      "td.actions",
      {},
      h("a.button", { href: model.download_url, download: model.name }, "Download"),
      model.kind === "checkpoint" ? h("button", { type: "button", onclick: () => inspect(model, status) }, "Inspect") : "",
      deleteButton(model, refresh, status),
    ),
  );
}

export async function renderLibrary(view, signal) {
  const body = h("tbody");
  const status = h("div.status");
  const count = h("span.muted");
  const refresh = async () => {
    const { models } = await api("v1/models", { signal });
    count.textContent = `${models.length} model(s)`;
    clear(body, models.length ? models.map((m) => modelRow(m, refresh, status)) : h("tr", {}, h("td", { colspan: 8 }, "The library is empty: upload a model.")));
  };
  view.append(
    h("h1", {}, "Library ", count),
    uploadForm(() => refresh()),
    status,
    h(
      "table.models",
      { id: "models" },
      h("thead", {}, h("tr", {}, ["Model", "Arch", "Variant", "Hash", "Size", "Keys", "Lineage", ""].map((t) => h("th", {}, t)))),
      body,
    ),
  );
  await refresh();
}
