"""The wire protocol between the controller and the guest agent. Standard library only.

Transport: a byte stream (a Unix socket for ``sandbox``, virtio-serial or a forwarded port
for ``qemu``, vsock for ``firecracker``). Messages are JSON objects, one per line (UTF-8,
``\\n``-terminated), at most ``MAX_MESSAGE`` bytes.

1. The client's first message is ``{"op": "hello", "secret": "<per-VM secret>"}``. The
   agent answers ``{"ok": true, "result": {"agent": VERSION, "role": "browser"|"cli"}}`` or
   ``{"ok": false, "error": {...}}`` and closes. Nothing else is accepted before hello.
2. Then requests ``{"id": n, "op": "...", ...}`` each answered, in order, by
   ``{"id": n, "ok": true, "result": {...}}`` or ``{"id": n, "ok": false, "error":
   {"code": "...", "message": "..."}}``. One request at a time per connection; open more
   connections for concurrency.
3. ``connect`` turns the connection into a raw byte pipe to a TCP port inside the VM once
   it has answered ok (this is how, for ``qemu``, the VNC stream travels).

Operations (arguments -> result):

- ``ping`` -> ``{role, uptime_s, display?, browser?, lease_ends_in_ms?}`` (``browser: true``
  once Chromium's window is up or its start page has asked for the URL: the browser VM is
  ready for a login URL; ``lease_ends_in_ms`` while a lease holds).
- ``start_login {login: LoginPlan}`` -> ``{started: true}``. Runs the plan's argv with
  ``BROWSER`` set to a helper that opens the URL in the VM's Chromium.
- ``login_status`` -> ``{state: "idle"|"running"|"exited", exit_code, url, captured}``
- ``capture {timeout_s}`` -> ``{captured: false}`` or ``{captured: true, files: {path:
  base64}}``: long poll until every watched file exists, parses as JSON and has been stable
  for two polls. The agent keeps reporting the same capture until ``ack_capture``.
- ``ack_capture`` -> ``{wiped: [paths]}``: the controller has stored the capture; the agent
  deletes the files (overwrite, then unlink) and forgets them.
- ``write_files {files: [{path, content_b64, mode}]}`` -> ``{written: [paths]}``: atomic
  (temp file in the same directory, fsync, rename), parent dirs created 0700.
- ``run {argv, timeout_s, env?}`` -> ``{exit_code, stdout, stderr}`` (verification).
- ``wipe {paths}`` -> ``{wiped: [paths]}``.
- ``connect {port}`` -> ``{connected: true}``, then raw bytes to ``127.0.0.1:port``.
- ``restored {secret, entropy}`` -> ``{reseeded: "ioctl"|"write", machine_id}``: the VM was
  resumed from a snapshot other VMs share; ``entropy`` (base64, 32 to 512 bytes) goes into
  the kernel's pool, ``/etc/machine-id`` is renewed where it can be, and ``secret`` (>= 32
  printable chars) replaces the snapshot's for every later hello.
- ``lease {for_ms, margin_ms?}`` -> ``{ends_in_ms}`` (browser VMs; a CLI VM answers
  ``no_lease``): the VM ends itself ``for_ms + margin_ms`` from now on its own monotonic
  clock unless the controller renews the lease before. The boot lease is the same JSON in
  ``{state_dir}/agent.lease``. In the sandbox the agent's exit ends the sandbox; under a
  guest init the agent exits with ``LEASE_EXPIRED_EXIT`` and the init powers the guest off.

A ``LoginPlan`` is ``{provider, argv, env, watch: [paths], home_relative: true}``; in argv and
env, ``{python}`` is replaced by the agent's interpreter and ``{home}`` by the VM user's home.
"""

from __future__ import annotations

import json
from typing import Any, Literal, NotRequired, TypedDict

VERSION = "1"
MAX_MESSAGE = 4 * 1024 * 1024
EGRESS_PORT = 3128  # inside the VM: the egress proxy as Chromium and the CLIs see it
LEASE_EXPIRED_EXIT = 75  # the agent's exit status when its lease ran out
START_PAGE_PORT = 3129  # inside the VM, loopback only: the agent's start page for Chromium


# The result of each operation, as the agent sends it (the requests are checked field by
# field on arrival, so they stay ``dict[str, Any]`` until then).


class PingResult(TypedDict):
    role: str
    uptime_s: float
    display: NotRequired[str]
    browser: NotRequired[bool]
    lease_ends_in_ms: NotRequired[int]


class StartLoginResult(TypedDict):
    started: bool


class LoginStatusResult(TypedDict):
    state: Literal["idle", "running", "exited"]
    exit_code: int | None
    url: str | None
    captured: bool


class CaptureResult(TypedDict):
    captured: bool
    files: NotRequired[dict[str, str]]  # path -> base64, when captured


class WipedResult(TypedDict):
    wiped: list[str]


class WrittenResult(TypedDict):
    written: list[str]


class RunResult(TypedDict):
    exit_code: int | None
    stdout: str
    stderr: str
    timed_out: bool
    truncated: bool


class LeaseResult(TypedDict):
    ends_in_ms: int


class RestoredResult(TypedDict):
    reseeded: Literal["ioctl", "write"]
    machine_id: bool


class ProtocolError(Exception):
    """The peer sent something that is not this protocol."""


def encode(message: dict[str, Any]) -> bytes:
    data = json.dumps(message, separators=(",", ":")).encode() + b"\n"
    if len(data) > MAX_MESSAGE:
        raise ProtocolError(f"message of {len(data)} bytes exceeds {MAX_MESSAGE}")
    return data


def decode(line: bytes) -> dict[str, Any]:
    if len(line) > MAX_MESSAGE:
        raise ProtocolError("message too large")
    try:
        message = json.loads(line)
    except ValueError as exc:
        raise ProtocolError(f"not JSON: {exc}") from None
    if not isinstance(message, dict):
        raise ProtocolError("a message must be a JSON object")
    return message
