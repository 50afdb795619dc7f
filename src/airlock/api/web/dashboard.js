// The dashboard: sign in with an API token (kept in sessionStorage, this tab only), start
// logins, watch sessions and CLI VMs (polled while the tab is visible), open a session's
// live view, and read its timeline.

const POLL_MS = 2_000;
const KEY = "airlock.token";
const $ = (id) => document.getElementById(id);

let token = sessionStorage.getItem(KEY) || "";
let pollTimer = null;
let lastSessions = "";
let lastVms = "";
let timelineFor = null;

function message(text) {
  $("message").textContent = text;
}

class ApiError extends Error {
  constructor(status, text) {
    super(text);
    this.status = status;
  }
}

async function api(method, path, body) {
  const init = { method, headers: { Authorization: `Bearer ${token}` } };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const r = await fetch(path, init);
  const data = r.headers.get("content-type")?.includes("json") ? await r.json() : null;
  if (!r.ok) throw new ApiError(r.status, data?.error?.message || `${method} ${path}: ${r.status}`);
  return data;
}

function when(iso) {
  return iso ? new Date(iso).toLocaleTimeString() : "";
}

function cell(text, className) {
  const td = document.createElement("td");
  td.textContent = text ?? "";
  if (className) td.className = className;
  return td;
}

function button(label, onClick, extra = {}) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = label;
  b.addEventListener("click", onClick);
  Object.assign(b, extra);
  return b;
}

// --- signing in -------------------------------------------------------------------------

async function signIn(candidate) {
  token = candidate;
  try {
    await api("GET", "/api/auth/sessions?limit=1");
  } catch (e) {
    token = "";
    sessionStorage.removeItem(KEY);
    message(e.status === 401 ? "That token was not accepted." : `Cannot sign in: ${e.message}`);
    return;
  }
  sessionStorage.setItem(KEY, token);
  message("");
  $("signin-section").hidden = true;
  $("app").hidden = false;
  $("signout").hidden = false;
  $("who").textContent = "Signed in";
  await loadProviders();
  await refresh();
}

function signOut() {
  token = "";
  sessionStorage.removeItem(KEY);
  clearTimeout(pollTimer);
  closeViewer();
  $("app").hidden = true;
  $("signout").hidden = true;
  $("who").textContent = "";
  $("signin-section").hidden = false;
  $("token").value = "";
  $("token").focus();
}

// --- providers and logins ---------------------------------------------------------------

async function loadProviders() {
  const box = $("providers");
  try {
    const providers = await api("GET", "/api/providers");
    box.replaceChildren(
      ...providers.map((p) =>
        button(`Log in ${p.id}`, () => startLogin(p.id), {
          disabled: !p.available,
          title: [p.available ? p.name : `${p.name}: ${p.reason}`, p.accounts]
            .filter(Boolean)
            .join("\n"),
          className: p.available ? "primary" : "",
        }),
      ),
      ...providers
        .filter((p) => p.accounts)
        .map((p) => {
          const line = document.createElement("p");
          line.className = "muted provider-accounts";
          line.textContent = `${p.name}: ${p.accounts}`;
          return line;
        }),
    );
  } catch (e) {
    box.textContent = `Cannot list providers: ${e.message}`;
  }
}

async function startLogin(provider) {
  message("");
  try {
    const session = await api("POST", "/api/auth/start", { provider });
    openViewer(session.novncURL);
    await refresh();
  } catch (e) {
    message(`Cannot start the ${provider} login: ${e.message}`);
  }
}

function openViewer(url) {
  if (!url) return;
  const path = new URL(url, location.href);
  const local = `${path.pathname}${path.search}`; // this origin, whatever the public URL says
  $("viewer-frame").src = local;
  $("viewer-newtab").href = local;
  $("viewer-section").hidden = false;
  $("viewer-frame").focus();
}

function closeViewer() {
  $("viewer-frame").removeAttribute("src");
  $("viewer-section").hidden = true;
}

// --- sessions, VMs, timeline ------------------------------------------------------------

function renderSessions(sessions) {
  // novncURL carries a fresh token every time: it is not a change worth a redraw (which
  // would also take the keyboard focus away from a button in the table).
  const key = JSON.stringify(sessions.map((s) => ({ ...s, novncURL: Boolean(s.novncURL) })));
  if (key === lastSessions) return;
  lastSessions = key;
  $("sessions").replaceChildren(
    ...sessions.map((s) => {
      const tr = document.createElement("tr");
      tr.dataset.sessionId = s.sessionId;
      const status = s.failureReason ? `${s.status}: ${s.failureReason}` : s.status;
      const actions = cell("", "actions");
      if (s.novncURL) actions.append(button("View", () => openViewer(latestUrl(s.sessionId))));
      actions.append(button("Timeline", () => showTimeline(s.sessionId)));
      if (["initializing", "awaiting_user"].includes(s.status)) {
        actions.append(button("Cancel", () => act("DELETE", `/api/auth/session/${s.sessionId}`)));
      }
      tr.append(
        cell(s.sessionId.slice(0, 8)),
        cell(s.provider),
        cell(status, `state-${s.status}`),
        cell(s.vm ? s.vm.state : "", s.vm ? `state-${s.vm.state}` : ""),
        cell(when(s.createdAt)),
        actions,
      );
      return tr;
    }),
  );
}

const urls = new Map(); // sessionId -> the newest novncURL (its token is the freshest)
const latestUrl = (id) => urls.get(id);

function renderVms(vms) {
  const key = JSON.stringify(vms);
  if (key === lastVms) return;
  lastVms = key;
  $("vms").replaceChildren(
    ...vms.map((vm) => {
      const tr = document.createElement("tr");
      const actions = cell("", "actions");
      if (!["destroying", "destroyed", "lost"].includes(vm.state)) {
        actions.append(button("Destroy", () => act("DELETE", `/api/vms/${vm.vmId}`)));
      }
      tr.append(cell(vm.vmId), cell(vm.state, `state-${vm.state}`), cell(when(vm.createdAt)), actions);
      return tr;
    }),
  );
}

async function showTimeline(sessionId) {
  timelineFor = sessionId;
  try {
    const entries = await api("GET", `/api/auth/session/${sessionId}/timeline`);
    $("timeline-title").textContent = `Timeline of session ${sessionId.slice(0, 8)}`;
    $("timeline").replaceChildren(
      ...entries.map((e) => {
        const tr = document.createElement("tr");
        tr.append(
          cell(when(e.at)), cell(e.kind), cell(e.from), cell(e.to), cell(e.cause), cell(e.actor),
        );
        return tr;
      }),
    );
    $("timeline-section").hidden = false;
  } catch (e) {
    message(`Cannot read the timeline: ${e.message}`);
  }
}

async function act(method, path, body) {
  message("");
  try {
    await api(method, path, body);
  } catch (e) {
    message(e.message);
  }
  await refresh();
}

async function refresh() {
  clearTimeout(pollTimer);
  if (!token) return;
  try {
    const [sessions, vms] = await Promise.all([
      api("GET", "/api/auth/sessions?limit=50"),
      api("GET", "/api/vms?role=cli"),
    ]);
    for (const s of sessions) if (s.novncURL) urls.set(s.sessionId, s.novncURL);
    renderSessions(sessions);
    renderVms(vms);
    if (timelineFor) await showTimeline(timelineFor);
  } catch (e) {
    if (e.status === 401) {
      signOut();
      message("The token is no longer accepted: sign in again.");
      return;
    }
    message(`Cannot refresh: ${e.message}`);
  }
  if (document.visibilityState === "visible") pollTimer = setTimeout(refresh, POLL_MS);
}

$("signin").addEventListener("submit", (e) => {
  e.preventDefault();
  signIn($("token").value.trim());
});
$("signout").addEventListener("click", signOut);
$("new-vm").addEventListener("click", () => act("POST", "/api/vms", { role: "cli" }));
$("viewer-close").addEventListener("click", closeViewer);
document.addEventListener("visibilitychange", () => {
  if (document.visibilityState === "visible" && token) refresh();
});

if (token) signIn(token);
