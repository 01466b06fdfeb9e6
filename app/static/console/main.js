// The console's entry: the key form, the hash router (#/library, #/merge, #/jobs, #/jobs/<id>)
// and the views' lifetimes (each view gets an AbortSignal that ends its streams and timers).
import { api, getKey, setKey, startSession } from "./api.js";
import { clear, h, installZoom, problemBox } from "./ui.js";
import { renderJob, renderJobs } from "./jobs.js";
import { renderLibrary } from "./library.js";
import { renderMerge } from "./merge.js";

const view = document.getElementById("view");
let current = null; // the AbortController of the view on screen

function keyForm(message) {
  const input = h("input", { type: "password", id: "api-key", name: "api-key", placeholder: "API key", autocomplete: "current-password", required: true });
  const status = h("div.status");
  const form = h(
    "form.card.key-form",
    {
      onsubmit: async (e) => {
        e.preventDefault();
        try {
          await setKey(input.value.trim());
          await api("v1/models");
          route();
        } catch (error) {
          await setKey("");
          clear(status, problemBox(error));
        }
      },
    },
    h("h1", {}, "API key"),
    h("p", {}, message || "This service needs a key (MERGEPROBE_API_KEYS). It is kept in this browser only."),
    h("label", { for: "api-key" }, "Key "),
    input,
    h("button", { type: "submit" }, "Use key"),
    h("button.secondary", {
      type: "button",
      onclick: () => {
        keyless = true;
        sessionStorage.setItem("mergeprobe.keyless", "1");
        route();
      },
    }, "Continue without a key"),
    status,
  );
  return form;
}

// Without a kept key the form comes first (a service without MERGEPROBE_API_KEYS needs none:
// "Continue without a key"), so that no request is sent only to be refused.
let keyless = sessionStorage.getItem("mergeprobe.keyless") === "1";

function needsKey() {
  return !getKey() && !keyless;
}

async function route() {
  current?.abort();
  current = new AbortController();
  const signal = current.signal;
  const hash = location.hash.replace(/^#\/?/, "") || "library";
  const [section, id] = hash.split("/");
  for (const link of document.querySelectorAll("[data-nav]")) link.classList.toggle("active", link.dataset.nav === section);
  document.getElementById("key-forget").hidden = !getKey();
  document.getElementById("key-state").textContent = getKey() ? "key set" : "";
  if (needsKey()) {
    clear(view, keyForm());
    return;
  }
  clear(view);
  try {
    if (section === "merge") await renderMerge(view, signal);
    else if (section === "jobs" && id) await renderJob(view, id, signal);
    else if (section === "jobs") await renderJobs(view, signal);
    else await renderLibrary(view, signal);
  } catch (error) {
    if (error.name !== "AbortError") view.append(problemBox(error));
  }
}

window.addEventListener("hashchange", route);
window.addEventListener("mergeprobe:unauthorized", () => {
  setKey("").catch(() => {});
  keyless = false;
  sessionStorage.removeItem("mergeprobe.keyless");
  current?.abort();
  clear(view, keyForm("The key was refused: enter a valid one."));
});
document.getElementById("key-forget").addEventListener("click", async () => {
  await setKey("");
  keyless = false;
  sessionStorage.removeItem("mergeprobe.keyless");
  route();
});
installZoom();
// The download cookie lasts 12 hours: a fresh one on every load, and while the page stays open.
startSession();
setInterval(startSession, 6 * 3600 * 1000);
route();
