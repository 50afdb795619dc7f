// The viewer page: the remote browser (noVNC over our VNC WebSocket), a status bar fed by
// the session's events, a keepalive while the tab is visible, and the `complete` call once
// the person has seen the login succeed. Everything is authorized by the viewer token in
// this page's URL; the page never sees a bearer token.

import { showEgressNotice } from "./egress_notice.js";

const NOVNC = "/static/novnc/core/rfb.js";
const KEEPALIVE_MS = 20_000;
const COMPLETE_AFTER_MS = 2_500; // long enough to read "Connected ✓"
const GONE = new Set(["destroying", "destroyed", "lost"]);

const sessionId = location.pathname.split("/")[4] || "";
let token = new URLSearchParams(location.search).get("token") || "";
const base = `/api/auth/session/${encodeURIComponent(sessionId)}`;
const q = () => `token=${encodeURIComponent(token)}`;
// A view-only token ({expiry}.v.{mac}): watch only; the server drops any input anyway.
const viewOnly = token.split(".")[1] === "v";

const bar = document.getElementById("statusbar");
const statusEl = document.getElementById("status");
const countdownEl = document.getElementById("countdown");
const screenEl = document.getElementById("screen");
const noteEl = document.getElementById("screen-note");
const focusButton = document.getElementById("focus-screen");

let session = null; // the last session JSON from the events
let rfb = null;
let RFB = null;
let vncRetry = 0;
let completeTimer = null;
let completeSent = false;
let countdownTimer = null;
let eventsRetry = 0;

function say(text, tone = "") {
  if (statusEl.textContent !== text) statusEl.textContent = text;
  bar.dataset.tone = tone;
  document.title = `${text} · Airlock`;
}

function note(text) {
  noteEl.textContent = text;
}

const vmGone = () => Boolean(session?.vm && GONE.has(session.vm.state));

// --- the status bar ---------------------------------------------------------------------

function render() {
  const s = session;
  if (!s) return;
  const reason = s.failureReason ? `: ${s.failureReason}` : "";
  const vmState = s.vm?.state;
  if (s.status === "completed") say("Connected ✓", "ok");
  else if (vmState === "lost") say(`The browser VM was lost${reason}. Start the login again.`, "bad");
  else if (s.status === "initializing") say("Starting browser…");
  else if (s.status === "awaiting_user") say(`Sign in with ${s.provider}`);
  else if (s.status === "failed") say(`The login failed${reason}`, "bad");
  else if (s.status === "expired") say(`The login timed out${reason}`, "bad");
  else if (s.status === "cancelled") say(`The login was cancelled${reason}`, "bad");
  else say(`${s.status}${reason}`);
  renderCountdown();
}

function renderCountdown() {
  clearInterval(countdownTimer);
  countdownTimer = null;
  const vm = session?.vm;
  if (session?.status === "completed" && vm && GONE.has(vm.state)) {
    countdownEl.textContent = "(done: you can close this tab)";
    return;
  }
  if (!vm || vm.state !== "draining" || !vm.destroyAfter) {
    countdownEl.textContent = "";
    return;
  }
  const end = Date.parse(vm.destroyAfter);
  const tick = () => {
    const left = Math.max(0, Math.ceil((end - Date.now()) / 1000));
    countdownEl.textContent = `(closing in ${left} s)`;
  };
  tick();
  countdownTimer = setInterval(tick, 250);
}

// --- the session's events ---------------------------------------------------------------

function onSession(next) {
  const wasCompleted = session?.status === "completed";
  session = next;
  render();
  if (!rfb && !vmGone() && ["running", "draining"].includes(session.vm?.state)) connectVnc();
  if (vmGone()) {
    rfb?.disconnect();
    note(
      session.status === "completed"
        ? "You are signed in. The remote browser is closed; you can close this tab."
        : "The remote browser is gone.",
    );
  }
  const first = session.status === "completed" && !wasCompleted;
  if (first && !viewOnly && !completeSent && !vmGone()) {
    completeTimer = setTimeout(complete, COMPLETE_AFTER_MS);
  }
}

function listen() {
  const events = new EventSource(`${base}/viewer/events?${q()}`);
  events.addEventListener("session", (e) => {
    eventsRetry = 0;
    onSession(JSON.parse(e.data));
  });
  events.addEventListener("egress", (e) => showEgressNotice(JSON.parse(e.data)));
  events.onerror = () => {
    if (vmGone()) {
      events.close(); // the stream ends after the VM's final state: nothing more to hear
      return;
    }
    if (events.readyState === EventSource.CLOSED) {
      // Refused (the token expired, or the VM went while we were away) or the controller
      // is down: try again a few times, with the token the last keepalive gave us.
      eventsRetry += 1;
      if (eventsRetry > 5) {
        say("Lost contact with Airlock. Reload the page, or start the login again.", "bad");
        return;
      }
      setTimeout(listen, 1000 * eventsRetry);
    }
  };
}

// --- presence and cleanup ---------------------------------------------------------------

async function keepalive() {
  if (document.visibilityState !== "visible" || vmGone() || completeSent) return;
  try {
    const r = await fetch(`${base}/viewer/keepalive?${q()}`, { method: "POST" });
    if (!r.ok) return;
    const body = await r.json();
    token = body.token;
    if (session?.vm && body.destroyAfter) {
      session.vm.destroyAfter = body.destroyAfter;
      renderCountdown();
    }
  } catch {
    // The controller is unreachable: the events stream reports that.
  }
}

async function complete() {
  if (completeSent) return;
  completeSent = true;
  try {
    const r = await fetch(`${base}/viewer/complete?${q()}`, { method: "POST" });
    if (r.ok) onSession((await r.json()).session);
  } catch {
    // The grace period ends the VM anyway.
  }
}

// --- the remote screen ------------------------------------------------------------------

async function connectVnc() {
  if (!RFB) {
    try {
      RFB = (await import(NOVNC)).default;
    } catch {
      say("The viewer is not installed: set-up did not run (noVNC is missing).", "bad");
      note("Run `make setup` in the Airlock checkout, then reload this page.");
      return;
    }
  }
  if (rfb || vmGone()) return;
  note("Connecting to the remote screen…");
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const url = `${scheme}://${location.host}${base}/vnc?${q()}`;
  rfb = new RFB(screenEl, url, { wsProtocols: ["binary"], shared: true });
  rfb.scaleViewport = true; // the whole remote screen, scaled to the window
  rfb.resizeSession = true; // and the remote screen resized to it, where the server can
  rfb.viewOnly = viewOnly;
  rfb.focusOnClick = !viewOnly;
  rfb.background = "#222";
  rfb.addEventListener("connect", () => {
    vncRetry = 0;
    note("");
    if (!viewOnly) rfb.focus();
  });
  rfb.addEventListener("disconnect", () => {
    rfb = null;
    if (vmGone() || completeSent) return;
    vncRetry += 1;
    if (vncRetry > 6) {
      note("The remote screen cannot be reached. Reload the page to try again.");
      return;
    }
    note("The remote screen connection dropped; reconnecting…");
    setTimeout(connectVnc, Math.min(500 * 2 ** vncRetry, 8000));
  });
}

focusButton.addEventListener("click", () => rfb?.focus());
// Keys go to the remote browser while its screen has focus (Tab included): F6 leaves it.
window.addEventListener(
  "keydown",
  (e) => {
    if (e.key === "F6" && document.activeElement?.tagName === "CANVAS") {
      e.preventDefault();
      e.stopPropagation();
      focusButton.focus();
    }
  },
  true,
);

if (viewOnly) {
  focusButton.hidden = true;
  document.getElementById("view-only").hidden = false;
}
if (!sessionId || !token) {
  say("This viewer link is incomplete: it needs a session and a token.", "bad");
} else {
  listen();
  setInterval(keepalive, KEEPALIVE_MS);
  document.addEventListener("visibilitychange", keepalive);
}
