"""The ``oauth2`` provider: normalising captures, and the whole login on the host.

The end-to-end tests run, without any VM, every piece a browser VM login uses: the real
demo IdP (uvicorn on a loopback port), the real ``EgressProxy`` on a Unix socket, a small
TCP-to-Unix forwarder standing in for the agent's ``127.0.0.1:3128`` inside the VM, and the
real login program as a subprocess whose ``$BROWSER`` is a script doing the browser's part.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import socket
import stat
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
import uvicorn

import airlock
from airlock.demo_idp import create_idp_app
from airlock.domain.egress_policy import Decision, EgressPolicy, HostRule, rules
from airlock.egress import EgressProxy
from airlock.errors import CredentialError, Unavailable
from airlock.providers.base import Account
from airlock.providers.oauth2 import (
    TOKENS_PATH,
    OAuth2Provider,
    demo_idp_issuer,
    demo_oauth2_provider,
)
from tests.lifecycle_helpers import wait_for_blocking

NOW = datetime(2027, 1, 15, 8, 0, 30, tzinfo=UTC)
OBTAINED = 1_800_000_000  # 2027-01-15T08:00:00Z
SRC = Path(airlock.__file__).resolve().parents[1]


def jwt(claims: dict[str, object]) -> str:
    def part(obj: dict[str, object]) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'HS256', 'typ': 'JWT'})}.{part(claims)}.c2lnbmF0dXJl"


def tokens_file(**fields: object) -> dict[str, bytes]:
    data: dict[str, object] = {
        "access_token": "at-1",
        "token_type": "Bearer",
        "expires_in": 3600,
        "refresh_token": "rt-1",
        "scope": "openid profile email",
        "obtained_at": OBTAINED,
        "expires_at": OBTAINED + 3600,
    }
    data.update(fields)
    return {TOKENS_PATH: json.dumps({k: v for k, v in data.items() if v is not ...}).encode()}


@pytest.fixture
def provider() -> OAuth2Provider:
    return demo_oauth2_provider(4001)


# --- normalise --------------------------------------------------------------------------


def test_normalise_a_good_file(provider: OAuth2Provider) -> None:
    files = tokens_file(id_token=jwt({"sub": "demo", "email": "demo@airlock.test"}))
    creds = provider.normalise(files, now=NOW)
    assert creds.provider == "oauth2"
    assert creds.access_token == "at-1"
    assert creds.refresh_token == "rt-1"
    assert creds.expires_at == datetime(2027, 1, 15, 9, 0, 0, tzinfo=UTC)
    assert creds.expires_at.utcoffset() == timedelta(0)
    assert creds.scopes == ["openid", "profile", "email"]
    assert creds.account == Account(id="demo", email="demo@airlock.test")
    assert creds.plan is None
    assert creds.raw == files  # byte for byte


def test_raw_keeps_the_bytes_verbatim(provider: OAuth2Provider) -> None:
    text = b'{ "access_token" : "at", "token_type":"bearer",\n  "zz_vendor": [1, 2.50] }\n'
    creds = provider.normalise({TOKENS_PATH: text}, now=NOW)
    assert creds.raw == {TOKENS_PATH: text}
    assert creds.refresh_token is None
    assert creds.expires_at is None  # no expiry given: unknown, not invented
    assert creds.scopes == ["openid", "profile", "email"]  # omitted scope means as requested
    assert creds.account == Account()


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"expires_at": ...}, datetime(2027, 1, 15, 9, 0, 0, tzinfo=UTC)),  # obtained_at + in
        ({"expires_at": ..., "expires_in": 1}, datetime(2027, 1, 15, 8, 0, 1, tzinfo=UTC)),
        (  # no obtained_at: from the capture time
            {"expires_at": ..., "obtained_at": ..., "expires_in": 60},
            datetime(2027, 1, 15, 8, 1, 30, tzinfo=UTC),
        ),
        ({"expires_at": OBTAINED + 0.5}, datetime(2027, 1, 15, 8, 0, 0, 500000, tzinfo=UTC)),
    ],
)
def test_expiry_is_the_exact_utc_instant(
    provider: OAuth2Provider, fields: dict[str, object], expected: datetime
) -> None:
    assert provider.normalise(tokens_file(**fields), now=NOW).expires_at == expected


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"expires_at": (OBTAINED + 3600) * 1000}, "milliseconds"),
        ({"expires_at": 3600}, "not epoch seconds"),
        ({"expires_at": "2027-01-15T09:00:00Z"}, "number of seconds"),
        ({"expires_at": ..., "expires_in": True}, "number of seconds"),
        ({"expires_at": ..., "expires_in": -5}, "out of range"),
        ({"access_token": ...}, "access_token is missing"),
        ({"access_token": 42}, "access_token is not a non-empty string"),
        ({"access_token": ""}, "access_token is not a non-empty string"),
        ({"token_type": ...}, "token_type is missing"),
        ({"token_type": "mac"}, "only Bearer"),
        ({"refresh_token": 7}, "refresh_token"),
        ({"scope": 5}, "scope"),
        ({"id_token": "not-a-jwt"}, "id_token is not a JWT"),
        ({"id_token": "a.!!!.c"}, "id_token payload"),
    ],
)
def test_malformed_fields_are_refused_clearly(
    provider: OAuth2Provider, fields: dict[str, object], message: str
) -> None:
    with pytest.raises(CredentialError, match=message) as info:
        provider.normalise(tokens_file(**fields), now=NOW)
    assert info.value.status == 422


def test_truncated_json_is_refused(provider: OAuth2Provider) -> None:
    whole = tokens_file()[TOKENS_PATH]
    with pytest.raises(CredentialError, match="not valid JSON"):
        provider.normalise({TOKENS_PATH: whole[: len(whole) // 2]}, now=NOW)


@pytest.mark.parametrize("content", [b"[]", b'"at"', b"\xff\xfe", b""])
def test_non_object_content_is_refused(provider: OAuth2Provider, content: bytes) -> None:
    with pytest.raises(CredentialError):
        provider.normalise({TOKENS_PATH: content}, now=NOW)


def test_a_missing_file_is_refused(provider: OAuth2Provider) -> None:
    with pytest.raises(CredentialError, match=TOKENS_PATH):
        provider.normalise({".other/file.json": b"{}"}, now=NOW)


def test_scopes_as_a_list_are_accepted(provider: OAuth2Provider) -> None:
    creds = provider.normalise(tokens_file(scope=["a", "b"]), now=NOW)
    assert creds.scopes == ["a", "b"]


# --- configuration, plan, routes --------------------------------------------------------


def test_available_says_what_is_missing() -> None:
    reason = OAuth2Provider(None, "https://t.example/token", "", ["openid"]).available()
    assert reason is not None and "authorize URL" in reason and "client id" in reason
    bad = OAuth2Provider("ftp://a.example/auth", "https://t.example/token", "c").available()
    assert bad is not None and "authorize URL" in bad
    with pytest.raises(Unavailable):
        OAuth2Provider(None, None, None).login_plan()
    assert demo_oauth2_provider(4001).available() is None


def test_login_plan_runs_the_login_program(provider: OAuth2Provider) -> None:
    plan = provider.login_plan()
    assert plan.provider == "oauth2"
    assert plan.argv[:3] == ["{python}", "-m", "airlock.agent.oauth2_login"]
    args = dict(zip(plan.argv[3::2], plan.argv[4::2], strict=True))
    assert args == {
        "--authorize-url": "http://idp.airlock.test:4001/authorize",
        "--token-url": "http://idp.airlock.test:4001/token",
        "--client-id": "airlock-demo",
        "--scope": "openid profile email",
        "--output": "{home}/.airlock/oauth2/tokens.json",
    }
    assert plan.watch == [".airlock/oauth2/tokens.json"]


def test_egress_policy() -> None:
    demo = demo_oauth2_provider(4123).egress_policy()
    assert demo.required == (HostRule("idp.airlock.test", 4123),)
    assert demo.allow == (
        HostRule("static.idp.airlock.test", 4123),
        HostRule("*.login.airlock.test", 4123),
    )
    for name in ("idp.airlock.test", "static.idp.airlock.test", "sso.login.airlock.test"):
        assert demo.decide(name, 4123).decision is Decision.ALLOWED, name
        assert demo.target(name, 4123) == ("127.0.0.1", 4123)
    assert demo.decide("login.airlock.test", 4123).decision is Decision.DENIED
    assert demo.decide("idp.airlock.test", 443).decision is Decision.DENIED
    generic = OAuth2Provider(
        "https://Auth.example.com/oauth/authorize",
        "https://api.example.com:8443/token",
        "cid",
        ["read"],
        allow=rules("cdn.example.com"),
        bundles=frozenset({"github"}),
    ).egress_policy()
    assert generic.required == (HostRule("auth.example.com"), HostRule("api.example.com", 8443))
    assert generic.decide("cdn.example.com", 443).decision is Decision.ALLOWED
    assert generic.decide("github.githubassets.com", 443).decision is Decision.ALLOWED
    assert generic.target("auth.example.com", 443) == ("auth.example.com", 443)


# --- the login, end to end on the host ---------------------------------------------------


BROWSER_SCRIPT = r"""
import html, os, re, sys, urllib.error, urllib.parse, urllib.request

url = sys.argv[1]
mode = os.environ["FAKE_BROWSER_MODE"]
report = open(os.environ["FAKE_BROWSER_REPORT"], "a")


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


# Like Chromium: everything through the VM's proxy, except loopback, which goes direct.
proxied = urllib.request.build_opener(
    urllib.request.ProxyHandler({"http": os.environ["FAKE_BROWSER_PROXY"]}), NoRedirect
)
direct = urllib.request.build_opener(urllib.request.ProxyHandler({}), NoRedirect)


def visit_callback(location):
    try:
        response = direct.open(location, timeout=60)
        report.write(f"callback {response.status} {response.read().decode()}\n")
    except urllib.error.HTTPError as exc:
        report.write(f"callback {exc.code} {exc.read().decode()}\n")


query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))
redirect_uri, state = query["redirect_uri"], query["state"]
if mode == "idp":
    page = proxied.open(url, timeout=30).read().decode()
    request_id = re.search(r'name="request_id" value="([^"]+)"', page).group(1)
    action = html.unescape(re.search(r'<form method="post" action="([^"]+)"', page).group(1))
    form = {"request_id": request_id, "username": "demo", "password": "demo"}
    try:
        proxied.open(action, data=urllib.parse.urlencode(form).encode(), timeout=30)
        report.write("no redirect after sign-in\n")
        sys.exit(1)
    except urllib.error.HTTPError as exc:
        location = exc.headers["Location"]
        report.write(f"signed in {exc.code}\n")
    visit_callback(location)
elif mode == "deny":
    bad = urllib.parse.urlencode({"code": "x", "state": "forged"})
    visit_callback(f"{redirect_uri}?{bad}")
    denied = urllib.parse.urlencode({"error": "access_denied", "state": state})
    visit_callback(f"{redirect_uri}?{denied}")
elif mode == "bogus-code":
    visit_callback(f"{redirect_uri}?" + urllib.parse.urlencode({"code": "x", "state": state}))
"""


@dataclass
class Idp:
    port: int
    issuer: str


@pytest.fixture
def idp() -> Iterator[Idp]:
    """The real demo IdP, served by uvicorn on a loopback port in a thread of its own."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    app = create_idp_app(issuer=demo_idp_issuer(port), user="demo", password="demo")
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    wait_for_blocking(lambda: server.started, timeout=5, interval=0.01, what="the demo IdP starts")
    yield Idp(port, demo_idp_issuer(port))
    server.should_exit = True
    thread.join(10)
    sock.close()
    assert not thread.is_alive()


@contextlib.asynccontextmanager
async def vm_port_3128(unix_path: Path) -> AsyncIterator[int]:
    """What the guest agent does inside the VM: a loopback TCP port whose connections are
    carried to the egress proxy's Unix socket. Yields the port."""
    tasks: set[asyncio.Task[None]] = set()

    async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
            dst.write_eof()

    async def forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_unix_connection(unix_path)
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(pipe(reader, up_writer))
                group.create_task(pipe(up_reader, writer))
        finally:
            up_writer.close()
            writer.close()

    def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.create_task(forward(reader, writer), name="vm-3128")
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()


@dataclass
class LoginRun:
    returncode: int
    stderr: str
    report: str


async def run_login(
    tmp_path: Path,
    argv: list[str],
    *,
    mode: str,
    proxy_port: int | None,
    extra: tuple[str, ...] = ("--timeout", "60"),
) -> LoginRun:
    """Run the login program the way the guest agent does: ``{python}`` and ``{home}``
    replaced, ``BROWSER`` set."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    browser = tmp_path / "fake-browser"
    browser.write_text(f"#!{sys.executable}\n{BROWSER_SCRIPT}")
    browser.chmod(0o755)
    report = tmp_path / "browser-report.txt"
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "PYTHONPATH": str(SRC),
        "BROWSER": str(browser),
        "FAKE_BROWSER_MODE": mode,
        "FAKE_BROWSER_REPORT": str(report),
        "FAKE_BROWSER_PROXY": f"http://127.0.0.1:{proxy_port or 9}",
    }
    if proxy_port is not None:
        env["HTTP_PROXY"] = f"http://127.0.0.1:{proxy_port}"
    args = [a.replace("{python}", sys.executable).replace("{home}", str(home)) for a in argv]
    proc = await asyncio.create_subprocess_exec(
        *args,
        *extra,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(120):
            _, stderr = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    text = report.read_text() if report.exists() else ""
    return LoginRun(proc.returncode, stderr.decode(), text)


async def test_login_end_to_end_through_the_egress_proxy(
    idp: Idp, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="airlock.egress")
    provider = demo_oauth2_provider(idp.port)
    proxy = EgressProxy(provider.egress_policy(), vm_id="vm-e2e")
    await proxy.serve(tmp_path / "egress.sock")
    try:
        async with vm_port_3128(tmp_path / "egress.sock") as port:
            run = await run_login(tmp_path, provider.login_plan().argv, mode="idp", proxy_port=port)
    finally:
        await proxy.close()

    assert run.returncode == 0, run.stderr
    assert "signed in 302" in run.report
    assert "callback 200" in run.report and "Signed in. You can close this window." in run.report
    path = tmp_path / "home" / TOKENS_PATH
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(path.parent.parent.stat().st_mode) == 0o700
    assert [p.name for p in path.parent.iterdir()] == ["tokens.json"]  # no temp file left

    raw = path.read_bytes()
    creds = provider.normalise({TOKENS_PATH: raw}, now=datetime.now(UTC))
    assert creds.account.email == "demo@airlock.test"
    assert creds.account.id == "demo"
    assert creds.scopes == ["openid", "profile", "email"]
    assert creds.refresh_token
    assert creds.expires_at is not None
    lifetime = creds.expires_at - datetime.now(UTC)
    assert timedelta(minutes=58) < lifetime <= timedelta(hours=1)
    data = json.loads(raw)
    assert data["expires_at"] == data["obtained_at"] + 3600
    for secret in (creds.access_token, creds.refresh_token, data["id_token"]):
        assert secret not in run.stderr
        assert secret not in caplog.text

    # The token is real: the IdP accepts it.
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{idp.port}") as client:
        me = await client.get(
            "/userinfo", headers={"Authorization": f"Bearer {creds.access_token}"}
        )
    assert me.status_code == 200 and me.json()["email"] == "demo@airlock.test"

    # Browser GET + POST and the login program's token POST all went through the proxy.
    allowed = [r.getMessage() for r in caplog.records if " allowed " in r.getMessage()]
    dest = f"idp.airlock.test:{idp.port}"
    assert sum(f"GET {dest} allowed status=200" in m for m in allowed) == 1
    assert sum(f"POST {dest} allowed status=302" in m for m in allowed) == 1
    assert sum(f"POST {dest} allowed status=200" in m for m in allowed) == 1


async def test_login_fails_when_the_egress_proxy_does_not_allow_the_idp(
    idp: Idp, tmp_path: Path
) -> None:
    provider = demo_oauth2_provider(idp.port)
    proxy = EgressProxy(EgressPolicy("oauth2", allow=rules("elsewhere.example")), vm_id="vm-locked")
    await proxy.serve(tmp_path / "egress.sock")
    try:
        async with vm_port_3128(tmp_path / "egress.sock") as port:
            run = await run_login(
                tmp_path,
                provider.login_plan().argv,
                mode="bogus-code",
                proxy_port=port,
            )
    finally:
        await proxy.close()
    assert run.returncode == 1
    assert "token endpoint answered 403" in run.stderr
    assert "callback 400" in run.report and "Sign-in failed" in run.report
    assert not (tmp_path / "home" / TOKENS_PATH).exists()


async def test_a_forged_state_is_ignored_and_a_denial_is_reported(tmp_path: Path) -> None:
    provider = demo_oauth2_provider(9)  # never contacted
    run = await run_login(tmp_path, provider.login_plan().argv, mode="deny", proxy_port=None)
    assert run.returncode == 1
    assert "state does not match" in run.stderr
    assert "the identity provider refused: access_denied" in run.stderr
    first, second = run.report.splitlines()[:2]
    assert first.startswith("callback 400") and "does not belong to this login" in first
    assert second.startswith("callback 400") and "access_denied" in second
    assert not (tmp_path / "home" / TOKENS_PATH).exists()


async def test_an_unreachable_token_endpoint_is_a_clear_failure(tmp_path: Path) -> None:
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    dead = free.getsockname()[1]
    free.close()
    provider = OAuth2Provider(
        "http://127.0.0.1:9/authorize", f"http://127.0.0.1:{dead}/token", "cid", ["openid"]
    )
    run = await run_login(
        tmp_path,
        provider.login_plan().argv,
        mode="bogus-code",
        proxy_port=None,
        extra=("--timeout", "60", "--proxy", "none"),
    )
    assert run.returncode == 1
    assert "cannot reach the token endpoint directly" in run.stderr
    assert "callback 400" in run.report


async def test_without_a_browser_it_prints_the_url_and_times_out(tmp_path: Path) -> None:
    home = tmp_path / "home"
    plan = demo_oauth2_provider(4001).login_plan()
    args = [a.replace("{python}", sys.executable).replace("{home}", str(home)) for a in plan.argv]
    proc = await asyncio.create_subprocess_exec(
        *args,
        "--timeout",
        "0.5",
        env={"PATH": os.environ.get("PATH", ""), "HOME": str(home), "PYTHONPATH": str(SRC)},
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(60):
        _, stderr = await proc.communicate()
    assert proc.returncode == 3
    text = stderr.decode()
    assert "open this URL in a browser to sign in:\nhttp://idp.airlock.test:4001/authorize?" in text
    assert "code_challenge_method=S256" in text
    assert "timed out" in text


async def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    plan = demo_oauth2_provider(4001).login_plan()
    args = [
        a.replace("{python}", sys.executable).replace("{home}", str(tmp_path)) for a in plan.argv
    ]
    proc = await asyncio.create_subprocess_exec(
        *args,
        "--param",
        "redirect_uri=http://evil.example/",
        env={"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(SRC)},
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(60):
        _, stderr = await proc.communicate()
    assert proc.returncode == 1
    assert b"--param cannot set redirect_uri" in stderr
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "airlock.agent.oauth2_login",
        "--client-id",
        "x",
        env={"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(SRC)},
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(60):
        await proc.communicate()
    assert proc.returncode == 2


def test_the_refresh_tokens_end_comes_from_the_file(provider: OAuth2Provider) -> None:
    stated = provider.normalise(tokens_file(refresh_expires_at=OBTAINED + 86400), now=NOW)
    assert stated.refresh_expires_at == datetime.fromtimestamp(OBTAINED + 86400, tz=UTC)
    lifetime = provider.normalise(tokens_file(refresh_token_expires_in=600), now=NOW)
    assert lifetime.refresh_expires_at == datetime.fromtimestamp(OBTAINED + 600, tz=UTC)
    assert lifetime.refreshed_at == datetime.fromtimestamp(OBTAINED, tz=UTC)
    assert provider.normalise(tokens_file(), now=NOW).refresh_expires_at is None
    unrefreshable = provider.normalise(
        tokens_file(refresh_token=None, refresh_token_expires_in=600), now=NOW
    )
    assert unrefreshable.refresh_expires_at is None
