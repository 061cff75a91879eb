// The runtime's HTTP API as the page uses it: the token, /v1/rpc streams, the page's routes.
//
// Every request either finishes, fails with an ApiError whose message a clinician can act on,
// or is aborted: short requests have timeouts, and a running stream is aborted when the
// runtime stops answering (see watchRuntime in app.js, which calls abortAll).

const TOKEN_KEY = "medgemma-edge-token";
let token = null;
let counter = 0;
const running = new Set();

export class ApiError extends Error {
  constructor(code, message, { status = 0, retryAfter = null } = {}) {
    super(message);
    this.name = "ApiError";
    this.code = code;
    this.status = status;
    this.retryAfter = retryAfter;
  }
}

export const UNREACHABLE =
  "The runtime is not reachable. It may have been stopped or restarted: start " +
  "“medgemma-edge serve” again and open the new address it prints.";

// The token arrives in the URL fragment (#token=...), which browsers never send to a server.
// Keep it for this tab only and take it out of the address bar, history and bookmarks.
export function takeToken() {
  const params = new URLSearchParams(location.hash.slice(1));
  const fromUrl = params.get("token");
  if (fromUrl) {
    sessionStorage.setItem(TOKEN_KEY, fromUrl);
    history.replaceState(null, "", location.pathname + location.search);
  }
  token = sessionStorage.getItem(TOKEN_KEY);
  return token;
}

export function forgetToken() {
  sessionStorage.removeItem(TOKEN_KEY);
  token = null;
}

function headers(extra = {}) {
  return { Authorization: `Bearer ${token}`, ...extra };
}

// An AbortSignal that fires on `outer` or after `ms` (AbortSignal.any is too new for some tablets).
function linked(outer, ms) {
  const ctrl = new AbortController();
  const onAbort = () => ctrl.abort(outer.reason);
  if (outer) {
    if (outer.aborted) ctrl.abort(outer.reason);
    else outer.addEventListener("abort", onAbort, { once: true });
  }
  const timer = ms ? setTimeout(() => ctrl.abort(new ApiError("timeout", "")), ms) : null;
  const release = () => {
    clearTimeout(timer);
    if (outer) outer.removeEventListener("abort", onAbort);
  };
  return { signal: ctrl.signal, abort: (why) => ctrl.abort(why), release };
}

function failure(err, signal, what) {
  if (err instanceof ApiError) return err;
  const reason = signal && signal.aborted ? signal.reason : null;
  if (reason instanceof ApiError && reason.code === "timeout") {
    return new ApiError("timeout", `The runtime did not answer in time (${what}). Try again.`);
  }
  if (reason instanceof ApiError) return reason;
  if (signal && signal.aborted) return new ApiError("aborted", "Stopped.");
  if (err instanceof SyntaxError) return new ApiError("internal", "The runtime sent a reply this page can't read.");
  return new ApiError("unreachable", UNREACHABLE);
}

async function httpError(resp) {
  let code = "internal";
  let message = `The runtime answered HTTP ${resp.status}.`;
  try {
    const body = await resp.json();
    if (body && body.error) {
      code = body.error.code || body.error.type || code;
      message = body.error.message || message;
    }
  } catch (_) {
    /* not JSON: keep the generic message */
  }
  if (resp.status === 401) {
    code = "unauthorized";
    message =
      "This page's access key is missing or no longer valid (the runtime restarts with a new one). " +
      "Open the address printed by “medgemma-edge serve” again.";
  }
  const retry = Number(resp.headers.get("retry-after")) || null;
  return new ApiError(code, message, { status: resp.status, retryAfter: retry });
}

// A short request: JSON in or raw bytes, JSON out, within `ms`.
async function request(method, path, { body = null, type = null, ms = 15000, signal = null, what = path } = {}) {
  const l = linked(signal, ms);
  try {
    const resp = await fetch(path, {
      method,
      headers: headers(type ? { "Content-Type": type } : {}),
      body,
      signal: l.signal,
      cache: "no-store",
    });
    if (!resp.ok) throw await httpError(resp);
    return await resp.json();
  } catch (err) {
    throw failure(err, l.signal, what);
  } finally {
    l.release();
  }
}

export const config = () => request("GET", "/v1/web/config", { what: "settings" });

export async function preview(file, { frame = null, signal = null } = {}) {
  const q = frame === null ? "" : `?frame=${frame}`;
  return request("POST", `/v1/preview${q}`, {
    body: file,
    type: "application/octet-stream",
    ms: 120000, // a large DICOM on a slow device
    signal,
    what: "reading the image",
  });
}

// One /v1/rpc request whose replies arrive as NDJSON. `call.done` resolves with {result, done}
// or rejects with an ApiError; `call.cancel()` asks the runtime to stop it (the stream then
// ends with done(cancelled)) and aborts the connection if that doesn't come within 3 s.
export class Call {
  constructor(op, params, { onEvent = () => {}, signal = null, ms = 0 } = {}) {
    counter += 1;
    this.id = `web-${op}-${Date.now().toString(36)}-${counter}`;
    this.op = op;
    this.cancelled = false;
    this.link = linked(signal, ms);
    running.add(this);
    this.done = this.run(params, onEvent).finally(() => {
      running.delete(this);
      this.link.release();
    });
  }

  async run(params, onEvent) {
    const body = JSON.stringify({ v: 1, id: this.id, op: this.op, params });
    let resp;
    try {
      resp = await fetch("/v1/rpc", {
        method: "POST",
        headers: headers({ "Content-Type": "application/json" }),
        body,
        signal: this.link.signal,
        cache: "no-store",
      });
    } catch (err) {
      throw failure(err, this.link.signal, this.op);
    }
    if (!(resp.headers.get("content-type") || "").includes("ndjson")) throw await httpError(resp);
    let result = null;
    let error = null;
    let done = null;
    try {
      const reader = resp.body.getReader();
      const decoder = new TextDecoder();
      let buf = "";
      for (;;) {
        const { value, done: end } = await reader.read();
        if (end) break;
        buf += decoder.decode(value, { stream: true });
        let nl;
        while ((nl = buf.indexOf("\n")) >= 0) {
          const line = buf.slice(0, nl).trim();
          buf = buf.slice(nl + 1);
          if (!line) continue;
          const msg = JSON.parse(line);
          if (msg.type === "event") onEvent(msg);
          else if (msg.type === "result") result = msg.result;
          else if (msg.type === "error") error = msg.error;
          else if (msg.type === "done") done = msg;
        }
      }
    } catch (err) {
      throw failure(err, this.link.signal, this.op);
    }
    if (error) throw new ApiError(error.code, error.message, { retryAfter: error.retry_after ?? null });
    if (!done) throw new ApiError("unreachable", UNREACHABLE);
    return { result, done };
  }

  async cancel() {
    this.cancelled = true;
    const fallback = setTimeout(() => this.link.abort(new ApiError("aborted", "Stopped.")), 3000);
    this.done.finally(() => clearTimeout(fallback)).catch(() => {});
    try {
      await rpc("cancel", { target: this.id }, { ms: 5000 });
    } catch (_) {
      /* the fallback aborts the stream */
    }
  }

  abort(err) {
    this.link.abort(err || new ApiError("aborted", "Stopped."));
  }
}

// A request with a short answer (health, cancel): the whole reply within `ms`.
export async function rpc(op, params = {}, { ms = 15000, signal = null } = {}) {
  const call = new Call(op, params, { signal, ms });
  return call.done;
}

export const health = () => rpc("health", {}, { ms: 8000 }).then((r) => r.result);

// The runtime went away: end every running stream with `err` instead of waiting forever.
export function abortAll(err) {
  for (const call of running) call.abort(err);
}

export const busy = () => running.size > 0;

// Run `start()` (which returns a promise) again while the model is loading, after the
// runtime's retry_after, until it answers or `signal` aborts. `onWait(err)` shows the wait.
export async function whenLoaded(start, { signal = null, onWait = () => {} } = {}) {
  for (;;) {
    try {
      return await start();
    } catch (err) {
      if (!(err instanceof ApiError) || err.code !== "loading") throw err;
      onWait(err);
      await sleep((err.retryAfter || 1) * 1000, signal);
    }
  }
}

export function sleep(ms, signal = null) {
  return new Promise((resolve, reject) => {
    if (signal && signal.aborted) return reject(new ApiError("aborted", "Stopped."));
    const t = setTimeout(resolve, ms);
    if (signal) {
      signal.addEventListener(
        "abort",
        () => {
          clearTimeout(t);
          reject(new ApiError("aborted", "Stopped."));
        },
        { once: true },
      );
    }
  });
}
