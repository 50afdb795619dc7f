// The viewer page: the remote browser (noVNC over our VNC WebSocket), a status bar fed by
// the session's events, a keepalive while the tab is visible, and the `complete` call once
// the person has seen the login succeed. Everything is authorized by the viewer token in
// this page's URL; the page never sees a bearer token.

import { showEgressNotice } from "./egress_notice.js";

const NOVNC = "/static/novnc/core/rfb.js";
const NOVNC_KEYBOARD = "/static/novnc/core/input/keyboard.js";
const NOVNC_KEYSYMS = "/static/novnc/core/input/keysymdef.js";
const CLIPBOARD_MAX = 64 * 1024; // characters, each way; the proxy drops longer cut texts
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
  rfb.focusOnClick = false; // the text sink takes the keyboard, not the canvas (see below)
  rfb.background = "#222";
  rfb.addEventListener("connect", () => {
    vncRetry = 0;
    note("");
    if (!viewOnly) focusScreen();
  });
  rfb.addEventListener("clipboard", (e) => copyOut(e.detail.text));
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

// --- keyboard, clipboard and touch input (live view only, not view-only) ----------------
//
// The keyboard focus is a transparent text area over the screen (#keys), not the canvas:
// - a key whose keydown names its character (any layout: noVNC takes e.key) or a special
//   key (Tab, Enter, arrows, shortcuts) goes to noVNC's own Keyboard, as keysyms;
// - text the local browser composes with no such keydown (dead keys, IME/CJK, on-screen
//   keyboards, autofill, "insertText") lands in the text area: it is sent as the keysyms of
//   its characters (Xvnc adds a keysym it has no key for to its keymap on the fly);
// - Ctrl+V / ⌘V pastes natively into the text area (no clipboard permission needed): the
//   text goes to Xvnc's clipboard (ClientCutText) and the remote field gets Ctrl+V, so it
//   arrives exactly and at once, whatever its characters;
// - a Ctrl shortcut (Ctrl+A/C/X/Z...) goes as the key's letter in the case its Shift gives
//   (see shortcutKeysym);
// - the first click into the view only gives it the focus: a click passed through would
//   also land in the remote page and take the focus off the field the page focused.

const keysEl = document.getElementById("keys");
const pasteButton = document.getElementById("paste-button");
const keyboardButton = document.getElementById("keyboard-button");
const pasteBox = document.getElementById("paste-box");
const pasteText = document.getElementById("paste-text");
const copyBox = document.getElementById("copy-box");
const copyText = document.getElementById("copy-text");
const XK_BACKSPACE = 0xff08;
const XK_TAB = 0xff09;
const XK_RETURN = 0xff0d;
const XK_CONTROL_L = 0xffe3;
const XK_V = 0x0076;
let keysyms = null;

function focusScreen() {
  keysEl.focus({ preventScroll: true });
}

// Xvnc (RawKeyboard off, so layouts work) ignores the scancode of a key event and types
// its keysym with the keys of the VM's US keymap, pressing or releasing Shift as that
// keysym needs. noVNC's keysym is the key's e.key, and with Ctrl held that is not always
// the letter Shift gives: "A" with Caps Lock on (or from Playwright's "Control+A"), "ф" on a
// Russian layout. Xvnc then adds a Shift (Ctrl+Shift+A: not select all) or a key that is
// no letter at all, and the shortcut does nothing. A local browser takes the shortcut from
// the key's keyCode (A-Z, the same in every layout) and the Shift key: so does this.
function shortcutKeysym(e) {
  if (!e.ctrlKey || e.altKey || e.metaKey || e.keyCode < 65 || e.keyCode > 90) return null;
  return e.shiftKey ? e.keyCode : e.keyCode + 0x20; // XK_A..XK_Z, XK_a..XK_z
}

function composing(e) {
  return e.isComposing || e.keyCode === 229 || ["Dead", "Process", "Unidentified"].includes(e.key);
}

// The characters the VM's keymap has keys for (ASCII, Latin-1, €: the agent maps them
// before Chromium starts). Text with others (CJK, other scripts) goes as a paste: Xvnc would
// add a key for each on the fly, and Chromium misses a key press right after such a change.
const ON_THE_KEYMAP = /^[\n\r\t\x20-\x7e\xa0-\xff€]*$/u;

function typeText(text) {
  if (!rfb || !keysyms || !text) return;
  if (!ON_THE_KEYMAP.test(text)) {
    sendPaste(text);
    return;
  }
  for (const ch of text) {
    const cp = ch.codePointAt(0);
    let keysym = keysyms.lookup(cp);
    if (ch === "\n" || ch === "\r") keysym = XK_RETURN;
    else if (ch === "\t") keysym = XK_TAB;
    rfb.sendKey(keysym, null);
  }
}

function sendPaste(text) {
  if (!rfb || !text) return;
  if (text.length > CLIPBOARD_MAX) {
    note(`Not pasted: more than ${CLIPBOARD_MAX} characters.`);
    setTimeout(() => note(""), 4000);
    return;
  }
  rfb.clipboardPasteFrom(text); // Xvnc owns the remote clipboard now, with this text
  rfb.sendKey(XK_CONTROL_L, "ControlLeft", true);
  rfb.sendKey(XK_V, "KeyV", true);
  rfb.sendKey(XK_V, "KeyV", false);
  rfb.sendKey(XK_CONTROL_L, "ControlLeft", false);
}

async function copyOut(text) {
  if (viewOnly || typeof text !== "string" || !text || text.length > CLIPBOARD_MAX) return;
  try {
    await navigator.clipboard.writeText(text);
    copyBox.hidden = true;
  } catch {
    copyText.value = text; // the browser refused: the person copies it from the box
    copyBox.hidden = false;
  }
}

async function pasteControl() {
  try {
    const text = await navigator.clipboard.readText();
    sendPaste(text);
    focusScreen();
  } catch {
    pasteBox.hidden = false; // no permission (or Firefox, Safari): paste into a box instead
    pasteText.value = "";
    pasteText.focus();
  }
}

async function setUpInput() {
  const [{ default: Keyboard }, { default: symbols }] = await Promise.all([
    import(NOVNC_KEYBOARD),
    import(NOVNC_KEYSYMS),
  ]);
  keysyms = symbols;
  const keyboard = new Keyboard(keysEl);
  const shortcuts = new Map(); // code -> the keysym of a shortcut key while it is down
  keyboard.onkeyevent = (keysym, code, down) => {
    const sym = shortcuts.get(code) ?? keysym; // its release too: the same keysym as its press
    if (!down) shortcuts.delete(code);
    rfb?.sendKey(sym, code, down);
  };
  keyboard.grab();
  // Before noVNC's Keyboard (capture, on the parent): what the browser composes stays with
  // the browser; Ctrl+V / ⌘V is left to the browser's own paste (see "paste" below).
  screenEl.addEventListener(
    "keydown",
    (e) => {
      if (e.target !== keysEl) return;
      if (e.key === "F6") {
        e.stopPropagation();
        e.preventDefault();
        focusButton.focus(); // keys go to the remote browser, Tab included: F6 leaves it
        return;
      }
      // The V key (keyCode 86 in any layout, as for the other shortcuts below) or a "v".
      const vKey = e.keyCode === 86 || e.key.toLowerCase() === "v";
      const paste = (e.ctrlKey || e.metaKey) && !e.altKey && vKey;
      if (paste || composing(e)) {
        e.stopPropagation();
        return;
      }
      // For noVNC's Keyboard next, which tracks a key by its code (where there is one).
      const shortcut = shortcutKeysym(e);
      const tracked = e.code && e.code !== "Unidentified";
      if (shortcut !== null && tracked && !shortcuts.has(e.code)) shortcuts.set(e.code, shortcut);
    },
    true,
  );
  keysEl.addEventListener("compositionend", (e) => {
    typeText(e.data);
    keysEl.value = "";
  });
  keysEl.addEventListener("input", (e) => {
    if (e.isComposing || e.inputType === "insertCompositionText") return;
    if (e.inputType === "insertLineBreak") rfb?.sendKey(XK_RETURN, null);
    else if (e.inputType === "deleteContentBackward") rfb?.sendKey(XK_BACKSPACE, null);
    else if (e.inputType !== "insertFromPaste") typeText(e.data ?? keysEl.value);
    keysEl.value = "";
  });
  keysEl.addEventListener("paste", (e) => {
    e.preventDefault();
    sendPaste(e.clipboardData?.getData("text/plain") ?? "");
  });
  keysEl.addEventListener("focus", () => screenEl.classList.add("focused"));
  focusButton.addEventListener("click", () => {
    armed = false; // focused by the page's own control: the next click is the remote page's
  });
  keysEl.addEventListener("blur", () => screenEl.classList.remove("focused"));
  // The first press into the view (and the first after it lost the focus) focuses it and
  // goes no further: a person clicks into the view to type into it.
  let armed = true;
  let swallowUp = false;
  keysEl.addEventListener("blur", () => {
    armed = true;
  });
  const press = (e) => {
    if (armed || document.activeElement !== keysEl) {
      e.preventDefault();
      e.stopPropagation();
      armed = false;
      swallowUp = true;
      focusScreen();
    }
  };
  const release = (e) => {
    if (swallowUp) {
      e.preventDefault();
      e.stopPropagation();
      swallowUp = false;
    }
    if (document.activeElement !== keysEl) focusScreen();
  };
  screenEl.addEventListener("mousedown", press, true);
  screenEl.addEventListener("mouseup", release, true);
  pasteButton.addEventListener("click", pasteControl);
  keyboardButton.addEventListener("click", focusScreen); // in the tap: the keyboard shows
  pasteBox.addEventListener("submit", (e) => {
    e.preventDefault();
    sendPaste(pasteText.value);
    pasteText.value = "";
    pasteBox.hidden = true;
    focusScreen();
  });
  document.getElementById("paste-cancel").addEventListener("click", () => {
    pasteBox.hidden = true;
    focusScreen();
  });
  document.getElementById("copy-close").addEventListener("click", () => {
    copyBox.hidden = true;
    focusScreen();
  });
}

focusButton.addEventListener("click", focusScreen);

if (viewOnly) {
  for (const el of [focusButton, pasteButton, keyboardButton, keysEl]) el.hidden = true;
  document.getElementById("view-only").hidden = false;
} else {
  setUpInput().catch(() => note("The viewer's keyboard could not load: reload the page."));
}
if (!sessionId || !token) {
  say("This viewer link is incomplete: it needs a session and a token.", "bad");
} else {
  listen();
  setInterval(keepalive, KEEPALIVE_MS);
  document.addEventListener("visibilitychange", keepalive);
}
