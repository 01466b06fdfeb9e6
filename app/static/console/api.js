// The API client: the key (localStorage; sent as a Bearer header), the download cookie, JSON
// calls, problem details, uploads with progress and Server-Sent Events read through fetch
// (EventSource cannot send a header).
//
// What the browser fetches by itself (<a download>, <img>) cannot carry a header: for those the
// service sets an HttpOnly cookie (POST v1/console/session), a token derived from the key that
// expires and is good for GET/HEAD of model files and artifacts only. The key itself is never put
// in a cookie: cookies are not isolated by port, any other app on this host could read it.

const STORAGE = "mergeprobe.key";

export function getKey() {
  return localStorage.getItem(STORAGE) || "";
}

/** Keeps `key` (or forgets it: ""); the download cookie follows (dropped before the key goes,
 * since dropping it needs the key). */
export async function setKey(key) {
  if (!key && getKey()) await endSession();
  if (key) localStorage.setItem(STORAGE, key);
  else localStorage.removeItem(STORAGE);
  if (key) await startSession();
}

/** Asks for a fresh download cookie (12 h); a refused key brings back the key form. */
export async function startSession() {
  if (getKey()) await api("v1/console/session", { method: "POST" }).catch(() => {});
}

async function endSession() {
  await fetch("v1/console/session", { method: "DELETE", headers: authHeaders() }).catch(() => {});
}

// Consoles before the download cookie kept the raw key in a script-readable cookie: drop it.
document.cookie = "mergeprobe_key=; path=/; max-age=0; SameSite=Strict";

/** An RFC 9457 problem as an Error: `problem.field`, `problem.position`, `problem.detail`. */
export class ApiError extends Error {
  constructor(problem) {
    super(problem.detail || problem.title || `HTTP ${problem.status}`);
    this.problem = problem;
  }
}

function authHeaders(extra = {}) {
  const headers = { ...extra };
  const key = getKey();
  if (key) headers.Authorization = `Bearer ${key}`;
  return headers;
}

export async function api(path, { method = "GET", body, signal } = {}) {
  const init = { method, headers: authHeaders(), signal };
  if (body !== undefined) {
    init.body = JSON.stringify(body);
    init.headers["Content-Type"] = "application/json";
  }
  const response = await fetch(path, init);
  if (response.status === 204) return null;
  const type = response.headers.get("content-type") || "";
  const data = type.includes("json") ? await response.json() : await response.text();
  if (!response.ok) {
    const problem = typeof data === "object" ? data : { status: response.status, title: response.statusText, detail: data };
    if (response.status === 401) window.dispatchEvent(new CustomEvent("mergeprobe:unauthorized"));
    throw new ApiError(problem);
  }
  return data;
}

/** Uploads `file` as the raw body of POST /v1/models; onProgress(loaded, total). */
export function uploadModel(file, name, onProgress) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", `v1/models?name=${encodeURIComponent(name)}`);
    const key = getKey();
    if (key) xhr.setRequestHeader("Authorization", `Bearer ${key}`);
    xhr.setRequestHeader("Content-Type", "application/octet-stream");
    xhr.upload.onprogress = (e) => onProgress(e.loaded, e.lengthComputable ? e.total : file.size);
    xhr.onload = () => {
      let data = null;
      try {
        data = JSON.parse(xhr.responseText);
      } catch {
        data = { status: xhr.status, title: xhr.statusText, detail: xhr.responseText };
      }
      if (xhr.status >= 200 && xhr.status < 300) resolve(data);
      else reject(new ApiError(data));
    };
    xhr.onerror = () => reject(new ApiError({ status: 0, title: "Network error", detail: "the upload was cut off" }));
    xhr.send(file);
  });
}

/** Reads a text/event-stream with fetch; calls onEvent(name, data) per event until it ends or
 * `signal` aborts. Resolves when the stream ends: whether by an `end` event or cut off (a proxy's
 * idle timeout, the service restarting) is for the caller to tell. */
export async function readEvents(path, onEvent, signal) {
  const response = await fetch(path, { headers: authHeaders({ Accept: "text/event-stream" }), signal });
  if (!response.ok || !response.body) {
    if (response.status === 401) window.dispatchEvent(new CustomEvent("mergeprobe:unauthorized"));
    throw new ApiError(await response.json().catch(() => ({ status: response.status })));
  }
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let name = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith(":")) continue; // a keepalive comment
        if (line.startsWith("event:")) name = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
      if (data.length) onEvent(name, JSON.parse(data.join("\n")));
    }
  }
}

let openapiDocument = null;
/** The service's OpenAPI document, fetched once (enums such as the merge modes come from it). */
export async function openapi() {
  openapiDocument ??= await api("openapi.json");
  return openapiDocument;
}
