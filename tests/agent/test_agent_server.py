"""The guest agent, for real: every operation of ``agent.protocol`` over its Unix socket, with
``AgentClient`` on the other end."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

import pytest

from airlock.agent import protocol
from airlock.agent.client import AgentClient, AgentError, FileWrite
from airlock.providers.base import LoginPlan
from tests.lifecycle_helpers import wait_for

from .conftest import CHROMIUM, HOME, XVNC, StartAgent

pytestmark = pytest.mark.sandbox


async def raw_exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, message: dict[str, object]
) -> dict[str, object]:
    writer.write(protocol.encode(message))
    await writer.drain()
    return protocol.decode(await reader.readline())


async def test_hello_with_the_secret_is_required(start_agent: StartAgent) -> None:
    agent = await start_agent()

    reader, writer = await agent.open()
    answer = await raw_exchange(reader, writer, {"op": "hello", "secret": "not-the-secret"})
    assert answer["ok"] is False
    assert answer["error"]["code"] == "unauthorized"  # type: ignore[index]
    assert await reader.read() == b""  # and it hangs up

    reader, writer = await agent.open()
    answer = await raw_exchange(reader, writer, {"id": 1, "op": "ping"})
    assert answer["ok"] is False and await reader.read() == b""

    with pytest.raises(AgentError) as refused:
        await AgentClient.connect(*await agent.open(), "wrong")
    assert refused.value.code == "unauthorized"

    async with await agent.client() as client:
        assert client.hello == {"agent": protocol.VERSION, "role": "cli"}
        pong = await client.ping()
        assert pong["role"] == "cli" and pong["uptime_s"] >= 0 and "display" not in pong


async def test_unknown_and_malformed_requests_are_answered_not_fatal(
    start_agent: StartAgent,
) -> None:
    agent = await start_agent()
    async with await agent.client() as client:
        with pytest.raises(AgentError) as unknown:
            await client.request("reboot")
        assert unknown.value.code == "unknown_op"
        with pytest.raises(AgentError) as bad:
            await client.request("run", {"argv": "ls"})
        assert bad.value.code == "bad_request"
        with pytest.raises(AgentError) as no_login:
            await client.capture(0)
        assert no_login.value.code == "no_login"
        assert (await client.ping())["role"] == "cli"  # the connection is still good

    reader, writer = await agent.open()
    await raw_exchange(reader, writer, {"op": "hello", "secret": agent.secret})
    writer.write(b"this is not json\n")
    answer = protocol.decode(await reader.readline())
    assert answer["error"]["code"] == "bad_message"


async def test_write_files_is_atomic_private_and_validated_first(start_agent: StartAgent) -> None:
    agent = await start_agent()
    async with await agent.client() as client:
        written = await client.write_files(
            [
                FileWrite(".config/tool/creds.json", b'{"token": "t"}'),
                FileWrite("notes.txt", b"hello", mode=0o644),
            ]
        )
        assert written == [".config/tool/creds.json", "notes.txt"]
        stat = await client.run(
            [
                "stat",
                "-c",
                "%a %s %n",
                f"{HOME}/.config",
                f"{HOME}/.config/tool",
                f"{HOME}/.config/tool/creds.json",
                f"{HOME}/notes.txt",
            ]
        )
        assert stat.exit_code == 0, stat.stderr
        assert stat.stdout.split("\n")[:4] == [
            f"700 {_size(stat.stdout, 0)} {HOME}/.config",
            f"700 {_size(stat.stdout, 1)} {HOME}/.config/tool",
            f"600 14 {HOME}/.config/tool/creds.json",
            f"644 5 {HOME}/notes.txt",
        ]
        cat = await client.run(["cat", f"{HOME}/.config/tool/creds.json"])
        assert cat.stdout == '{"token": "t"}'
        # Overwrite: still one file, no temp file left behind.
        await client.write_files({".config/tool/creds.json": b'{"token": "u"}'})
        listing = await client.run(["ls", "-A", f"{HOME}/.config/tool"])
        assert listing.stdout.split() == ["creds.json"]

        with pytest.raises(AgentError) as bad:
            await client.request(
                "write_files",
                {
                    "files": [
                        {"path": "first.txt", "content_b64": "aGk=", "mode": 0o600},
                        {"path": "second.txt", "content_b64": "%%%", "mode": 0o600},
                    ]
                },
            )
        assert bad.value.code == "bad_request"
        missing = await client.run(["test", "-e", f"{HOME}/first.txt"])
        assert missing.exit_code == 1  # nothing was written


def _size(stat_output: str, line: int) -> str:
    return stat_output.split("\n")[line].split()[1]


async def test_run_reports_exit_output_timeouts_and_caps_output(start_agent: StartAgent) -> None:
    agent = await start_agent()
    async with await agent.client() as client:
        result = await client.run(
            ["sh", "-c", 'echo out; echo err >&2; echo "$GREETING $HOME"; exit 3'],
            env={"GREETING": "hi"},
        )
        assert (result.exit_code, result.stdout, result.stderr) == (3, f"out\nhi {HOME}\n", "err\n")
        assert not result.timed_out and not result.truncated

        started = time.monotonic()
        slow = await client.run(["sh", "-c", "echo begun; sleep 30 & sleep 30"], timeout_s=0.5)
        assert slow.timed_out and slow.exit_code is None and slow.stdout == "begun\n"
        assert time.monotonic() - started < 5
        leftovers = await client.run(["sh", "-c", "ps -e -o comm= | grep -c '^sleep$' || true"])
        assert leftovers.stdout.strip() == "0"  # the whole process group was killed

        started = time.monotonic()
        daemon = await client.run(["sh", "-c", "sleep 30 & echo left a child"])
        assert daemon.exit_code == 0 and daemon.stdout == "left a child\n"
        assert time.monotonic() - started < 1  # not waiting for the child's end of the pipe
        leftovers = await client.run(["sh", "-c", "ps -e -o comm= | grep -c '^sleep$' || true"])
        assert leftovers.stdout.strip() == "0"

        big = await client.run(["sh", "-c", "head -c 200000 /dev/zero | tr '\\0' x"])
        assert big.truncated and len(big.stdout) == 64 * 1024 and big.exit_code == 0

        with pytest.raises(AgentError) as missing:
            await client.run(["/no/such/binary"])
        assert missing.value.code == "spawn_failed"


CAPTURE_SCRIPT = """
import json, os, time
home = os.environ["HOME"]
os.makedirs(os.path.join(home, ".tool"), exist_ok=True)
path = os.path.join(home, ".tool", "auth.json")
time.sleep(0.3)
with open(path, "w") as f:
    f.write('{"access_token": "abc", "refre')  # half-written: not JSON yet
    f.flush()
    time.sleep(0.5)
    f.write('sh_token": "def", "blob": "' + "z" * 100000 + '"}')
time.sleep(60)
"""


async def test_login_capture_and_ack_wipe(start_agent: StartAgent) -> None:
    agent = await start_agent()
    async with await agent.client() as client:
        assert (await client.login_status())["state"] == "idle"
        plan = LoginPlan(
            provider="tool",
            argv=["{python}", "-c", CAPTURE_SCRIPT],
            watch=[".tool/auth.json"],
            env={"TOOL_HOME": "{home}/.tool"},
        )
        await client.start_login(plan)
        status = await client.login_status()
        assert status["state"] == "running" and not status["captured"]
        with pytest.raises(AgentError) as twice:
            await client.start_login(plan)
        assert twice.value.code == "conflict"

        assert await client.capture_files(0.1) is None  # not there yet: the long poll times out
        files = await client.capture_files(10)
        assert files is not None
        data = json.loads(files[".tool/auth.json"])  # > 64 KiB: the client reads past limits
        assert data["access_token"] == "abc" and data["refresh_token"] == "def"
        assert await client.capture_files(0) == files  # reported again until acknowledged
        assert (await client.login_status())["captured"]

        assert await client.ack_capture() == [".tool/auth.json"]
        gone = await client.run(["ls", "-A", f"{HOME}/.tool"])
        assert gone.exit_code == 0 and gone.stdout == ""
        assert await client.ack_capture() == []
        assert not (await client.login_status())["captured"]


async def test_an_unacknowledged_capture_blocks_a_new_login(start_agent: StartAgent) -> None:
    agent = await start_agent()
    plan = LoginPlan(
        provider="quick",
        argv=["sh", "-c", 'echo \'{"t": 1}\' > "$HOME/c.json"'],
        watch=["c.json"],
    )
    async with await agent.client() as client:
        await client.start_login(plan)
        assert await client.capture_files(5) == {"c.json": b'{"t": 1}\n'}

        async def exited() -> bool:
            return (await client.login_status())["state"] == "exited"

        await wait_for(exited, timeout=5, interval=0.02)
        with pytest.raises(AgentError) as stranded:
            await client.start_login(plan)
        assert stranded.value.code == "conflict"
        assert await client.ack_capture() == ["c.json"]
        await client.start_login(plan)  # now it may run again


async def test_login_exit_code_and_browser_helper_url(start_agent: StartAgent) -> None:
    agent = await start_agent()
    url = "https://idp.example/authorize?client_id=x&state=a%2Fb&scope=a+b#frag"
    async with await agent.client() as client:
        await client.start_login(
            LoginPlan(
                provider="tool",
                argv=["sh", "-c", f'"$BROWSER" "{url}" && exit 7'],
                watch=["never.json"],
            )
        )
        status: dict[str, Any] = {}

        async def exited() -> bool:
            status.update(await client.login_status())
            return status["state"] == "exited"

        await wait_for(exited, timeout=5)
        assert (status["state"], status["exit_code"], status["url"]) == ("exited", 7, url)

        await client.start_login(  # a finished login may be replaced
            LoginPlan(provider="t", argv=["sh", "-c", '"$BROWSER" file:///etc/passwd'], watch=[])
        )
        status.clear()
        await wait_for(exited, timeout=5)
        assert status["exit_code"] == 1 and status["url"] is None  # only http(s) is opened


async def test_connect_pipes_to_a_port_inside(start_agent: StartAgent) -> None:
    agent = await start_agent()
    async with await agent.client() as client:
        await client.write_files({"www/hello.txt": b"hello from inside"})
        await client.start_login(
            LoginPlan(
                provider="http",
                argv=[
                    "{python}",
                    "-m",
                    "http.server",
                    "8765",
                    "-b",
                    "127.0.0.1",
                    "-d",
                    "{home}/www",
                ],
                watch=[],
            )
        )
    streams: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def connected() -> bool:
        client = await agent.client()
        try:
            streams.append(await client.connect_port(8765))
        except AgentError as exc:
            assert exc.code == "connect_failed"
            return False
        return True

    await wait_for(connected, timeout=5)
    reader, writer = streams[0]
    writer.write(b"GET /hello.txt HTTP/1.0\r\n\r\n")
    response = await reader.read()
    writer.close()
    assert response.startswith(b"HTTP/1.0 200") and response.endswith(b"hello from inside")

    async with await agent.client() as client:
        with pytest.raises(AgentError) as refused:
            await client.connect_port(1)
        assert refused.value.code == "connect_failed"


async def test_wipe_overwrites_and_removes(start_agent: StartAgent) -> None:
    agent = await start_agent()
    async with await agent.client() as client:
        await client.write_files({"a.json": b"{}", "sub/b.json": b"[]"})
        assert await client.wipe(["a.json", f"{HOME}/sub/b.json", "missing.json"]) == [
            "a.json",
            f"{HOME}/sub/b.json",
        ]
        left = await client.run(["find", HOME, "-type", "f"])
        assert left.stdout == ""


# A login program's stand-in inside the VM: a web server on loopback that records each
# request's path and query in a file, and $BROWSER called with its URLs (the first at once,
# before Chromium is up; the second later, when the start page is long gone).
FAKE_LOGIN = r"""
import http.server, os, subprocess, sys, threading, time
log = open(os.path.expanduser("~/requests.log"), "a", buffering=1)
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        log.write(self.path + "\n")
        self.send_response(200); self.send_header("Content-Type", "text/html")
        self.end_headers()
        self.wfile.write(b"<title>idp</title><script>fetch('/wd?' + navigator.webdriver)</script>")
    def log_message(self, *a): pass
srv = http.server.ThreadingHTTPServer(("127.0.0.1", 8765), H)
threading.Thread(target=srv.serve_forever, daemon=True).start()
subprocess.run([os.environ["BROWSER"], "http://127.0.0.1:8765/authorize?a=1&b=two%20words"])
while "second" not in open(os.path.expanduser("~/requests.log")).read():
    if os.path.exists(os.path.expanduser("~/go")):
        subprocess.run([os.environ["BROWSER"], "http://127.0.0.1:8765/second?c=3"])
        os.unlink(os.path.expanduser("~/go"))
    time.sleep(0.1)
time.sleep(30)
"""
WINDOWS = (
    "from airlock.agent import x11\n"
    "with x11.XConnection('/tmp/.X11-unix/X0') as x:\n"
    "    print(sum(x.viewable(w) for w in x.children(x.root)), x.top_level(), x.width)\n"
)


@pytest.mark.skipif(XVNC is None or CHROMIUM is None, reason="needs Xvnc and chromium")
async def test_browser_role_opens_the_login_url_in_place_without_devtools(
    start_agent: StartAgent,
) -> None:
    agent = await start_agent("browser")
    async with await agent.client() as client:
        await client.write_files({"login.py": FAKE_LOGIN.encode()})
        # Straight away: Chromium is not up yet; its start page fetches the URL when it is.
        await client.start_login(
            LoginPlan(provider="p", argv=["{python}", "{home}/login.py"], watch=[])
        )

        async def requests() -> list[str]:
            seen = await client.run(["sh", "-c", "cat ~/requests.log 2>/dev/null || true"])
            return [r for r in seen.stdout.splitlines() if r != "/favicon.ico"]

        async def opened() -> bool:
            return await requests() == ["/authorize?a=1&b=two%20words", "/wd?false"]

        try:
            await wait_for(opened, timeout=20, interval=0.1)
        except AssertionError:
            raise AssertionError(await requests()) from None
        assert (await client.login_status())["url"].endswith("/authorize?a=1&b=two%20words")
        # navigator.webdriver is false (the page said so, above): no automation flags.
        # One window, the kiosk app window, covering the screen (the start page was
        # replaced in place: no second window, no tab strip).
        windows = (await client.run([sys.executable, "-c", WINDOWS])).stdout
        assert windows.startswith("1 ") and "x=0, y=0, width=1280, height=800" in windows
        # A later URL, once the start page is gone: Chromium's own command line hands it
        # to the running browser.
        await client.write_files({"go": b""})

        async def handed_on() -> bool:
            return "/second?c=3" in await requests()

        try:
            await wait_for(handed_on, timeout=30, interval=0.1)
        except AssertionError:
            raise AssertionError(await requests()) from None
        flags = await client.run(
            ["sh", "-c", "cat /proc/[0-9]*/cmdline | tr '\\0' '\\n' | grep -- '^--' || true"]
        )
        assert (
            "--remote-debugging" not in flags.stdout and "--enable-automation" not in flags.stdout
        )


@pytest.mark.skipif(XVNC is None or CHROMIUM is None, reason="needs Xvnc and chromium")
@pytest.mark.parametrize("model", ["single", "multi"])
async def test_browser_process_model_is_the_one_asked_for(
    start_agent: StartAgent, model: str
) -> None:
    agent = await start_agent("browser", "--browser-processes", model)
    async with await agent.client() as client:

        async def loaded() -> bool:  # the start page asked for a URL
            return bool((await client.ping()).get("browser"))

        await wait_for(loaded, timeout=20, interval=0.1, what="Chromium loads its start page")
        listing = await client.run(
            ["sh", "-c", "for f in /proc/[0-9]*/cmdline; do tr '\\0' ' ' < $f; echo; done"]
        )
    chromium = [line for line in listing.stdout.splitlines() if "--user-data-dir=" in line]
    children = [line for line in chromium if " --type=" in line]
    assert chromium, listing.stdout
    if model == "single":
        assert children == [] and all("--single-process" in line for line in chromium)
    else:
        assert children and not any("--single-process" in line for line in chromium)
