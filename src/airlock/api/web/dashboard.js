// The dashboard: sign in with an API token (kept in sessionStorage, this tab only), start
// logins, watch sessions, CLI VMs and the logins each holds (polled while the tab is
// visible), log a VM in, again, or move a login into it, open a session's live view, and
// read its timeline.

const POLL_MS = 2_000;
const KEY = "airlock.token";
const $ = (id) => document.getElementById(id);

let token = sessionStorage.getItem(KEY) || "";
let pollTimer = null;
let lastSessions = "";
let lastVms = "";
let lastLogins = "";
let providers = []; // GET /api/providers: {id, name, available, reason?}
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

function day(iso) {
  return iso ? new Date(iso).toLocaleString() : "";
}

const providerName = (id) => providers.find((p) => p.id === id)?.name || id;

// What a person needs to know of a login: its state and, where known, when it ends (the
// refresh token's end, else the access token's).
function loginSummary(c) {
  const end = c.refreshExpiresAt || c.accessExpiresAt;
  const word = { active: "active", expiring: "expiring", expired: "expired", revoked: "revoked",
    needs_login: "needs login" }[c.state] || c.state;
  if (!end || ["revoked", "needs_login"].includes(c.state)) return word; // no end to wait for
  return `${word}, ${new Date(end) > new Date() ? "expires" : "expired"} ${day(end)}`;
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
    providers = await api("GET", "/api/providers");
    lastVms = ""; // the VMs' rows name the providers: draw them again
    box.replaceChildren(
      ...providers.map((p) =>
        button(`Log in ${p.name}`, () => startLogin(p.id), {
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

async function startLogin(provider, cliVmId) {
  message("");
  try {
    const body = cliVmId ? { provider, cliVmId } : { provider };
    const session = await api("POST", "/api/auth/start", body);
    openViewer(session.novncURL);
    await refresh();
  } catch (e) {
    message(`Cannot start the ${providerName(provider)} login: ${e.message}`);
  }
}

async function moveHere(provider, vmId) {
  message("");
  try {
    const moved = await api("POST", `/api/vms/${vmId}/credentials`, { provider });
    message(moved.notice || "");
  } catch (e) {
    message(`Cannot move the ${providerName(provider)} login into ${vmId}: ${e.message}`);
  }
  await refresh();
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

// One line per provider in a CLI VM's row: the logins it holds (state and expiry, and
// "Log in again"), or "Move here" for one held elsewhere (another VM, the vault), or "Log in".
function vmLogins(vm, logins) {
  const box = document.createElement("td");
  box.className = "logins";
  if (vm.state !== "running") {
    const held = logins.filter((c) => c.holderVmId === vm.vmId);
    box.textContent = held.map((c) => `${providerName(c.provider)}: ${loginSummary(c)}`).join("; ");
    return box;
  }
  for (const p of providers.filter((p) => p.available)) {
    const here = logins.filter((c) => c.provider === p.id && c.holderVmId === vm.vmId);
    const elsewhere = logins.filter((c) => c.provider === p.id && c.holderVmId !== vm.vmId);
    const line = document.createElement("div");
    line.className = "login";
    line.dataset.provider = p.id;
    const name = document.createElement("strong");
    name.textContent = p.name;
    line.append(name);
    const where = `${p.name} in ${vm.vmId}`;
    if (here.length) {
      for (const c of here) {
        const state = document.createElement("span");
        state.className = `state-${c.state}`;
        state.textContent = ` ${c.account ? `${c.account}: ` : ""}${loginSummary(c)} `;
        line.append(state);
      }
      const attention = here.some((c) => c.state !== "active");
      line.append(button("Log in again", () => startLogin(p.id, vm.vmId), {
        className: attention ? "primary" : "", ariaLabel: `Log in again: ${where}`,
      }));
    } else if (elsewhere.length) {
      const c = elsewhere[0];
      const note = document.createElement("span");
      note.className = "muted";
      note.textContent = ` ${c.holderVmId ? `in ${c.holderVmId}` : "in the vault"}, ${loginSummary(c)} `;
      line.append(note, button("Move here", () => moveHere(p.id, vm.vmId), {
        ariaLabel: `Move here: ${where}`,
      }));
    } else {
      const note = document.createElement("span");
      note.className = "muted";
      note.textContent = " not logged in ";
      line.append(note, button("Log in", () => startLogin(p.id, vm.vmId), {
        ariaLabel: `Log in: ${where}`,
      }));
    }
    box.append(line);
  }
  return box;
}

function renderVms(vms, logins) {
  const key = JSON.stringify([vms, logins]);
  if (key === lastVms) return;
  lastVms = key;
  $("vms").replaceChildren(
    ...vms.map((vm) => {
      const tr = document.createElement("tr");
      tr.dataset.vmId = vm.vmId;
      const actions = cell("", "actions");
      if (!["destroying", "destroyed", "lost"].includes(vm.state)) {
        actions.append(button("Destroy", () => act("DELETE", `/api/vms/${vm.vmId}`)));
      }
      tr.append(
        cell(vm.vmId),
        cell(vm.state, `state-${vm.state}`),
        vmLogins(vm, logins),
        cell(when(vm.createdAt)),
        actions,
      );
      return tr;
    }),
  );
}

function renderLogins(logins) {
  const key = JSON.stringify(logins);
  if (key === lastLogins) return;
  lastLogins = key;
  $("logins").replaceChildren(
    ...logins.map((c) => {
      const tr = document.createElement("tr");
      tr.dataset.grantId = c.grantId;
      const end = c.refreshExpiresAt || c.accessExpiresAt;
      tr.append(
        cell(providerName(c.provider)),
        cell(c.account),
        cell(c.holderVmId || "the vault"),
        cell(c.state === "needs_login" ? "needs login" : c.state, `state-${c.state}`),
        cell(day(end)),
        cell(c.stateReason || ""),
      );
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
    const [sessions, vms, logins] = await Promise.all([
      api("GET", "/api/auth/sessions?limit=50"),
      api("GET", "/api/vms?role=cli"),
      api("GET", "/api/credentials"),
    ]);
    for (const s of sessions) if (s.novncURL) urls.set(s.sessionId, s.novncURL);
    renderSessions(sessions);
    renderVms(vms, logins);
    renderLogins(logins);
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
