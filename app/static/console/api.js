// The API client: the key (localStorage, plus a SameSite=Strict cookie that the service accepts
// only for GET/HEAD of model files and artifacts), JSON calls, problem details, uploads with
// progress and Server-Sent Events read through fetch (EventSource cannot send a header).

const STORAGE = "mergeprobe.key";
const COOKIE = "mergeprobe_key";

export function getKey() {
  return localStorage.getItem(STORAGE) || "";
}

export function setKey(key) {
  if (key) localStorage.setItem(STORAGE, key);
  else localStorage.removeItem(STORAGE);
  syncCookie();
}

export function syncCookie() {
  const key = getKey();
  const secure = location.protocol === "https:" ? "; Secure" : "";
  document.cookie = key
    ? `${COOKIE}=${encodeURIComponent(key)}; path=/; SameSite=Strict${secure}`
    : `${COOKIE}=; path=/; max-age=0; SameSite=Strict${secure}`;
}

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
 * `signal` aborts. Resolves when the stream ends. */
export async function readEvents(path, onEvent, signal) {
  const response = await fetch(path, { headers: authHeaders({ Accept: "text/event-stream" }), signal });
  if (!response.ok || !response.body) throw new ApiError(await response.json().catch(() => ({ status: response.status })));
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
