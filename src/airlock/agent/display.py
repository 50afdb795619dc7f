"""The screen of a browser VM: Xvnc (served only on ``{state_dir}/vnc.sock``), Chromium as
its only window (restarted when it dies, fitted to the screen), the start page Chromium
shows until the login URL is known, and the ``$BROWSER`` helper's socket through which a
login CLI hands that URL over. Standard library only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import struct
import sys
import time
import urllib.parse
from pathlib import Path

from airlock.agent import chromium_policy, protocol, x11
from airlock.agent.config import Config
from airlock.agent.files import write_atomic
from airlock.agent.protocol import EGRESS_PORT, START_PAGE_PORT
from airlock.agent.tasks import Owner, exited

log = logging.getLogger("airlock.agent")

START_PAGE_WAIT_S = 25.0  # how long the start page's request for the login URL is held
DISPLAY = ":0"
X_SOCKET = "/tmp/.X11-unix/X0"
SCREEN_POLL_S = 0.5  # how soon the kiosk window follows a viewer's resize
START_PAGE_URL = f"http://127.0.0.1:{START_PAGE_PORT}/"
# What Chromium shows until the login URL is known: it asks the agent for the URL (the
# request is held until there is one) and replaces itself with it, so the login opens in
# place in the same app window. Loopback: Chromium never sends it through the proxy.
START_PAGE = (
    "<!doctype html><meta charset=utf-8><title>Starting…</title>"
    "<body style='font:20px sans-serif;display:flex;align-items:center;"
    "justify-content:center;height:90vh;color:#444'>Starting…"
    "<script>(async () => { for (;;) { try { const r = await fetch('/next', "
    "{cache: 'no-store'}); const url = r.ok ? await r.text() : ''; "
    "if (url) { location.replace(url); return; } } catch (e) { "
    "await new Promise((ok) => setTimeout(ok, 200)); } } })();</script>"
).encode()
OPEN_SOCKET_NAME = "open.sock"  # in the VM's private run dir, for the BROWSER helper


def _redact(url: str) -> str:
    """A URL for the log: scheme, host and path only (query strings carry OAuth state)."""
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


def _no_password_manager(user_data_dir: Path) -> None:
    """A fresh profile whose password manager is off: no "Save password?" bubble over the
    page after the person signs in, and no password kept in the VM's profile."""
    prefs = user_data_dir / "Default" / "Preferences"
    if prefs.exists():
        return
    prefs.parent.mkdir(parents=True, exist_ok=True)
    prefs.write_text(
        json.dumps(
            {"credentials_enable_service": False, "profile": {"password_manager_enabled": False}}
        )
    )


class Display:
    """The URL a login opened and the screen that shows it. In a CLI VM only the URL part
    runs (``login_status`` reports it); a browser VM also runs ``browser_stack``."""

    def __init__(self, config: Config, owner: Owner) -> None:
        self.config = config
        self._owner = owner
        self.url: str | None = None
        self._url_changed = asyncio.Event()  # set (and replaced) whenever url changes
        self._start_page_served = False  # the URL went to the start page: later ones cannot
        self.browser_ready = False  # Chromium has asked its start page for the URL
        self.display_ready = False

    # -- BROWSER helper -> Chromium ---------------------------------------------------------

    def write_browser_helper(self) -> None:
        """An executable for $BROWSER: it hands the URL to this agent and returns at once."""
        package_root = Path(protocol.__file__).resolve().parent.parent.parent
        script = (
            f"#!{sys.executable}\n"
            "import sys\n"
            f"sys.path.insert(0, {str(package_root)!r})\n"
            "from airlock.agent.open_url import main\n"
            f"sys.exit(main(sys.argv[1:], {str(self.config.run_dir / OPEN_SOCKET_NAME)!r}))\n"
        )
        write_atomic(self.config.run_dir / "browser", script.encode(), 0o700)

    async def on_open_url(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = self._owner.adopt_current_task("open-url-connection")
        try:
            line = await asyncio.wait_for(reader.readline(), 5)
            url = line.decode("utf-8", "replace").strip()
            scheme = urllib.parse.urlsplit(url).scheme
            if scheme not in ("http", "https"):
                writer.write(b"error: only http and https URLs\n")
            else:
                self._open_url(url)
                writer.write(b"ok\n")
            await writer.drain()
        except (OSError, TimeoutError, ValueError):
            pass
        finally:
            writer.close()
            self._owner.release(task)

    def set_url(self, url: str | None) -> None:
        self.url = url
        self._url_changed.set()
        self._url_changed = asyncio.Event()

    def _open_url(self, url: str) -> None:
        log.info("opening %s", _redact(url))
        pending_start_page = not self._start_page_served
        self.set_url(url)
        if self.config.role != "browser" or pending_start_page:
            return  # the start page takes it (now, or when Chromium comes up)
        # The start page has gone to an earlier URL: hand this one to the running Chromium
        # through its own command line (the profile's singleton passes it on and exits).
        self._owner.spawn(self._hand_to_chromium(url), "open-url")

    async def _hand_to_chromium(self, url: str) -> None:
        try:
            proc = await asyncio.create_subprocess_exec(
                *self._chromium_argv(url),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
                env=self._chromium_env(),
                process_group=0,
            )
        except OSError as exc:
            log.error("could not hand the URL to Chromium: %s", exc.strerror)
            return
        self._owner.children.add(proc)
        if not await exited(proc, 30):
            await self._owner.kill(proc)
        self._owner.children.discard(proc)

    # -- the start page: Chromium's first page, on loopback ---------------------------------

    async def on_start_page(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """``GET /``: the start page; ``GET /next``: the login URL, held until there is one
        (at most ``START_PAGE_WAIT_S``, then an empty answer and the page asks again)."""
        task = self._owner.adopt_current_task("start-page-connection")
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            parts = request.split(b" ", 2)
            path = parts[1] if len(parts) == 3 and parts[0] == b"GET" else b""
            if path == b"/":
                self.browser_ready = True  # Chromium is up and loading its first page
                body, kind = START_PAGE, b"text/html; charset=utf-8"
            elif path == b"/next":
                self.browser_ready = True  # (the window is up too; it may not be seen yet)
                if self.url is None:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._url_changed.wait(), START_PAGE_WAIT_S)
                url = self.url or ""
                if url:
                    self._start_page_served = True
                body, kind = url.encode(), b"text/plain; charset=utf-8"
            else:
                writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
                await writer.drain()
                return
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: " + kind + b"\r\nCache-Control: no-store"
                b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n"
                b"Connection: close\r\n\r\n" + body
            )
            await writer.drain()
        except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()
            self._owner.release(task)

    # -- the screen: Xvnc + Chromium --------------------------------------------------------

    async def browser_stack(self) -> None:
        """Keep Xvnc and Chromium running; restart either if it dies (Ctrl+W quits kiosk)."""
        failures = 0
        while True:
            started = time.monotonic()
            xvnc = await self._start_xvnc()
            try:
                await self._wait_x_ready(xvnc)
                try:  # before Chromium reads the keymap (see x11.PRELOADED_KEYSYMS)
                    added = await asyncio.to_thread(x11.preload_keymap, X_SOCKET)
                    log.info("keymap: %d keysyms added", added)
                except (OSError, struct.error) as exc:
                    log.warning("cannot preload the keymap: %r", exc)
                self.display_ready = True
                while xvnc.returncode is None:
                    chrome_started = time.monotonic()
                    chrome = await self._start_chromium()
                    waits = [
                        self._owner.spawn(xvnc.wait(), "xvnc-wait"),
                        self._owner.spawn(chrome.wait(), "chromium-wait"),
                    ]
                    fitter = self._owner.spawn(self._fit_window_to_screen(), "fit-window")
                    try:
                        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        for waiter in [*waits, fitter]:
                            waiter.cancel()
                        await self._owner.kill(chrome)
                    log.warning("chromium exited with %s", chrome.returncode)
                    if time.monotonic() - chrome_started < 10:
                        failures += 1
                        await asyncio.sleep(min(0.5 * failures, 5))
                    else:
                        failures = 0
            except OSError as exc:
                log.error("display stack: %s", exc)
            finally:
                self.display_ready = False
                await self._owner.kill(xvnc)
            log.warning("xvnc exited with %s", xvnc.returncode)
            if time.monotonic() - started < 10:
                failures += 1
                await asyncio.sleep(min(0.5 * failures, 5))

    async def _fit_window_to_screen(self) -> None:
        """Keep the kiosk window as large as the X screen, and focused. A viewer resizes the
        screen (noVNC's resizeSession: RFB SetDesktopSize, which Xvnc applies through RandR),
        but Chromium with no window manager keeps its window size, so the page would be cut
        off or leave a blank border. Polls (cheap: an X connection setup and a few round
        trips) and moves the window by X11 ConfigureWindow, gives it the input focus
        (``x11``: what a window manager would do)."""
        fitted: tuple[int, int] | None = None
        while True:
            try:
                size = await asyncio.to_thread(x11.fit_and_focus, X_SOCKET)
                if size:
                    # Chromium is on the display: ready for a URL (the start page takes it
                    # when it runs). Not later, at its window or the start page's request:
                    # those wait for more of Chromium's start (measured: start p50 1.8 or
                    # 2.2 s instead of 0.7 s under the product load).
                    self.browser_ready = True
                if isinstance(size, tuple) and size != fitted:
                    log.info("kiosk window fitted to the screen: %dx%d", *size)
                    fitted = size
            except (OSError, ValueError, struct.error) as exc:
                log.debug("cannot fit the window to the screen yet: %r", exc)
            await asyncio.sleep(SCREEN_POLL_S if fitted else 0.02)

    async def _start_xvnc(self) -> asyncio.subprocess.Process:
        cfg = self.config
        vnc = cfg.state_dir / "vnc.sock"
        for stale in (Path("/tmp/.X0-lock"), Path("/tmp/.X11-unix/X0"), vnc):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
        w, h = cfg.screen
        argv = [
            cfg.xvnc,
            DISPLAY,
            "-geometry",
            f"{w}x{h}",
            "-depth",
            "24",
            "-rfbunixpath",
            str(vnc),
            "-rfbunixmode",
            "0600",
            "-rfbport",
            "-1",  # no TCP VNC port at all: only the Unix socket
            "-SecurityTypes",
            "None",  # the socket's directory is 0700 on the host; the controller authenticates
            "-nolisten",
            "tcp",
            "-desktop",
            "airlock",
        ]
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            process_group=0,  # not a session of its own: the VM is one scheduling group
        )
        self._owner.children.add(proc)
        return proc

    async def _wait_x_ready(self, xvnc: asyncio.subprocess.Process) -> None:
        """Until the X socket accepts a connection and the VNC socket exists."""
        x_socket = "/tmp/.X11-unix/X0"
        vnc = self.config.state_dir / "vnc.sock"
        deadline = time.monotonic() + 15
        loop = asyncio.get_running_loop()
        while time.monotonic() < deadline:
            if xvnc.returncode is not None:
                raise OSError(f"Xvnc exited with {xvnc.returncode} while starting")
            if vnc.exists():
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                    s.setblocking(False)
                    try:
                        await loop.sock_connect(s, x_socket)
                        return
                    except OSError:
                        pass
            await asyncio.sleep(0.01)
        raise OSError("Xvnc did not come up in 15 s")

    def _chromium_argv(self, url: str) -> list[str]:
        """Chromium's command line. No ``--remote-debugging-*`` and no ``--enable-automation``:
        Google refuses to sign in a browser that has either (and a DevTools port would let
        anything in the VM read the session's cookies). What DevTools did is done without
        it: the start page opens the login URL, ``x11`` fits and focuses the window."""
        cfg = self.config
        w, h = cfg.screen
        argv = [
            cfg.chromium,
            "--kiosk",
            # Its own sandbox needs to make user namespaces, which the VM refuses (seccomp,
            # bwrap --disable-userns): the VM's confinement is the boundary (README).
            "--no-sandbox",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-breakpad",
            "--noerrdialogs",
            "--password-store=basic",
            "--test-type",  # no "unsupported command-line flag" bar over the login page
            f"--user-data-dir={cfg.run_dir / 'chromium'}",
            f"--proxy-server=http://127.0.0.1:{EGRESS_PORT}",
            f"--window-size={w},{h}",
            "--window-position=0,0",
            # An app window: no toolbar or tab strip, whose WebUI costs a second core-second
            # at start (measured: 1.87 CPU-s vs 0.76 over the first 4.5 s); the login URL
            # replaces the start page in place. After a crash, straight back to the login.
            f"--app={url}",
        ]
        if cfg.single_process:
            # One process, not ten (zygote, GPU, network, storage, renderers): each is a
            # fork+exec of a 250 MB binary that initialises its own copy of the world.
            # Measured from launch to a loaded login page plus 1 s: 0.69 CPU-s instead of
            # 1.07 (median of 9). It gives up no isolation that exists here: with
            # --no-sandbox a renderer already runs as the browser's user, and the VM is
            # the boundary. A renderer crash takes the browser with it; browser_stack
            # restarts it straight back to the login URL. Chromium calls the mode
            # unsupported, so an operator can turn it off (AIRLOCK_BROWSER_SINGLE_PROCESS).
            argv[1:1] = ["--single-process", "--no-zygote"]
        return argv

    def _chromium_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            DISPLAY=DISPLAY, HOME=str(self.config.home), DBUS_SESSION_BUS_ADDRESS="disabled:"
        )
        return env

    async def _start_chromium(self) -> asyncio.subprocess.Process:
        _no_password_manager(self.config.run_dir / "chromium")
        chromium_policy.install()  # its own background traffic off (a sandbox binds it in)
        self._start_page_served = self.url is not None
        proc = await asyncio.create_subprocess_exec(
            *self._chromium_argv(self.url or START_PAGE_URL),
            stdin=asyncio.subprocess.DEVNULL,
            env=self._chromium_env(),
            process_group=0,  # not a session of its own: the VM is one scheduling group
        )
        self._owner.children.add(proc)
        log.info("chromium started: pid %d", proc.pid)
        return proc
