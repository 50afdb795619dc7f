"""A test double of Firecracker (an outside system), first-class and on purpose: Firecracker
cannot run on the build machines (their KVM is kvm-pvm), so the ``firecracker`` runtime's
tests drive this instead. Nothing in production imports it.

It serves Firecracker's API on a Unix socket (HTTP/1.1, keep-alive) with the semantics of
``firecracker-api-v1.17.0-dev.yaml`` for the calls the runtime makes: 204 on success, 400
with ``{"fault_message"}`` on a bad request, pre-boot calls refused after ``InstanceStart``,
``/snapshot/load`` only on a fresh process, ``/snapshot/create`` only when paused, drives
and kernels that must exist, a tap that must exist in the network namespace it runs in.
Every request is appended to ``--record`` (JSON lines) for the tests to check against the
spec. Its "guest" is a real guest agent process (``airlock.agent.server``) configured from
the config drive, reached through a vsock multiplexer that behaves as Firecracker's docs
say: a host connects to the vsock Unix socket, writes ``CONNECT <port>\\n``, reads
``OK <host port>\\n`` and then bytes flow; when nothing listens on the guest port the
connection is closed. Pausing stops the guest (SIGSTOP); a snapshot records the guest's
config (standing in for its memory), and a load starts the guest from it, secret included,
as a restored clone would be.

    python -m airlock.runtimes.firecracker_api_double --api-sock PATH [--id ID] [--record F]
"""

# Like Firecracker's API thread, the double handles one request at a time, and its file
# checks are part of each answer: blocking calls in its handlers are deliberate.
# ruff: noqa: ASYNC220, ASYNC230, ASYNC240

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import itertools
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from airlock.agent.guest import write_boot_lease
from airlock.agent.protocol import LEASE_EXPIRED_EXIT
from airlock.agent.streams import pipe

GUEST_PORTS = {1024: "agent.sock", 5900: "vnc.sock"}
EGRESS_PORT = 3128
PR_SET_PDEATHSIG = 1
MAX_BODY = 1 << 20


class Fault(Exception):
    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


Handler = Callable[[dict[str, Any], re.Match[str]], Awaitable[dict[str, Any] | None]]


class VsockMuxer:
    """The host side of Firecracker's vsock device: a Unix socket that forwards
    ``CONNECT <port>`` to the guest's listener on that port (here: a Unix socket)."""

    def __init__(self, uds_path: Path, guest_listeners: dict[int, Path]) -> None:
        self.uds_path = uds_path
        self.guest_listeners = guest_listeners
        self._server: asyncio.Server | None = None
        self._ports = itertools.count(1 << 30)  # Firecracker's local ports start here
        self._streams: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.uds_path.unlink()
        self._server = await asyncio.start_unix_server(self._on_host, path=str(self.uds_path))

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        self.reset()

    def reset(self) -> None:
        """VIRTIO_VSOCK_EVENT_TRANSPORT_RESET: every open connection is closed."""
        for writer in list(self._streams):
            writer.close()
        self._streams.clear()

    async def _on_host(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5)
            match = re.fullmatch(rb"CONNECT (\d+)\n", line)
            target = self.guest_listeners.get(int(match.group(1))) if match else None
            if target is None:
                return
            try:
                g_reader, g_writer = await asyncio.open_unix_connection(str(target))
            except OSError:
                return  # nothing listens on that guest port: Firecracker closes
            writer.write(f"OK {next(self._ports)}\n".encode())
            await writer.drain()
            self._streams.update((writer, g_writer))
            await asyncio.gather(_pump(reader, g_writer), _pump(g_reader, writer))
        except (OSError, TimeoutError, ValueError):
            pass
        finally:
            self._streams.discard(writer)
            writer.close()


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """One direction: ``agent.streams.pipe``, then close the writer, so the end of either
    direction ends the whole connection (not ``agent.streams.splice``, which lets the other
    direction go on after a half-close)."""
    try:
        with contextlib.suppress(OSError):
            await pipe(reader, writer)
    finally:
        writer.close()


def _die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class FirecrackerDouble:
    def __init__(self, api_sock: Path, vm_id: str, record: Path | None) -> None:
        self.api_sock = api_sock
        self.vm_id = vm_id
        self.record = record
        self.state = "Not started"
        self.configured: list[str] = []
        self.machine: dict[str, Any] = {"vcpu_count": 1, "mem_size_mib": 128}
        self.boot_source: dict[str, Any] | None = None
        self.drives: dict[str, dict[str, Any]] = {}
        self.netifs: dict[str, dict[str, Any]] = {}
        self.vsock: dict[str, Any] | None = None
        self.guest_config: dict[str, str] | None = None
        self.guest: subprocess.Popen[bytes] | None = None
        self.muxer: VsockMuxer | None = None
        # Relative to the working directory (the VM's state dir): Unix socket paths stay
        # short however deep the state dir is.
        self.guest_dir = Path("guest")
        self._stop = asyncio.Event()
        self._watcher: asyncio.Task[None] | None = None
        self.routes: list[tuple[str, re.Pattern[str], Handler, bool]] = [
            # (method, path, handler, pre-boot only)
            ("PUT", re.compile(r"/machine-config"), self._machine_config, True),
            ("PUT", re.compile(r"/boot-source"), self._boot_source, True),
            ("PUT", re.compile(r"/drives/([^/]+)"), self._drive, True),
            ("PUT", re.compile(r"/network-interfaces/([^/]+)"), self._netif, True),
            ("PUT", re.compile(r"/vsock"), self._vsock, True),
            ("PUT", re.compile(r"/entropy"), self._entropy, True),
            ("PUT", re.compile(r"/actions"), self._action, False),
            ("PATCH", re.compile(r"/vm"), self._vm_state, False),
            ("PUT", re.compile(r"/snapshot/create"), self._snapshot_create, False),
            ("PUT", re.compile(r"/snapshot/load"), self._snapshot_load, False),
            ("GET", re.compile(r"/"), self._describe, False),
            ("GET", re.compile(r"/version"), self._version, False),
        ]

    # -- HTTP --------------------------------------------------------------------------------

    async def serve(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.api_sock.unlink()
        server = await asyncio.start_unix_server(self._on_client, path=str(self.api_sock))
        stop = self._stop
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            await stop.wait()
        finally:
            server.close()
            await self._stop_guest()

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, target, _version = lines[0].split(" ", 2)
                headers = {}
                for line in lines[1:]:
                    if ":" in line:
                        name, value = line.split(":", 1)
                        headers[name.strip().lower()] = value.strip()
                length = int(headers.get("content-length", "0"))
                if length > MAX_BODY:
                    raise ValueError("body too large")
                body = await reader.readexactly(length) if length else b""
                status, answer = await self._handle(method, target, body)
                payload = json.dumps(answer).encode() if answer is not None else b""
                reason = {200: "OK", 204: "No Content", 400: "Bad Request"}.get(status, "Error")
                head_out = f"HTTP/1.1 {status} {reason}\r\nServer: Firecracker API\r\n"
                if payload:
                    head_out += "Content-Type: application/json\r\n"
                head_out += f"Content-Length: {len(payload)}\r\n\r\n"
                writer.write(head_out.encode() + payload)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ValueError):
            pass
        finally:
            writer.close()

    async def _handle(
        self, method: str, target: str, raw: bytes
    ) -> tuple[int, dict[str, Any] | None]:
        path = target.split("?", 1)[0]
        body: Any = None
        if raw:
            try:
                body = json.loads(raw)
            except ValueError:
                body = {"_unparsable": raw.decode("utf-8", "replace")}
        if self.record is not None:
            with open(self.record, "a") as f:
                f.write(json.dumps({"method": method, "path": path, "body": body}) + "\n")
        for want, pattern, handler, pre_boot in self.routes:
            match = pattern.fullmatch(path)
            if match is None or want != method:
                continue
            if pre_boot and self.state != "Not started":
                return 400, _fault(
                    "The requested operation is not supported after starting the microVM."
                )
            if method != "GET" and not isinstance(body, dict):
                return 400, _fault("The request body must be a JSON object.")
            try:
                result = await handler(body or {}, match)
            except Fault as exc:
                return exc.status, _fault(str(exc))
            if method in ("PUT", "PATCH") and not match.re.pattern.startswith("/snapshot/load"):
                self.configured.append(path)
            return (200, result) if result is not None else (204, None)
        return 400, _fault(f"Invalid request method and/or path: {method} {path}.")

    # -- pre-boot configuration --------------------------------------------------------------

    async def _machine_config(self, body: dict[str, Any], _m: re.Match[str]) -> None:
        vcpus, mem = body.get("vcpu_count"), body.get("mem_size_mib")
        if not isinstance(vcpus, int) or not 1 <= vcpus <= 32 or not isinstance(mem, int):
            raise Fault("vcpu_count (1-32) and mem_size_mib are required integers")
        self.machine = body

    async def _boot_source(self, body: dict[str, Any], _m: re.Match[str]) -> None:
        kernel = body.get("kernel_image_path")
        if not isinstance(kernel, str) or not Path(kernel).is_file():
            raise Fault(f"Cannot open the kernel image: {kernel!r}")
        initrd = body.get("initrd_path")
        if initrd is not None and not Path(str(initrd)).is_file():
            raise Fault(f"Cannot open the initrd: {initrd!r}")
        self.boot_source = body

    async def _drive(self, body: dict[str, Any], m: re.Match[str]) -> None:
        if body.get("drive_id") != m.group(1):
            raise Fault("The id from the path does not match the id from the body!")
        if not isinstance(body.get("is_root_device"), bool):
            raise Fault("is_root_device is required")
        path = body.get("path_on_host")
        if not isinstance(path, str) or not Path(path).is_file():
            raise Fault(f"Unable to open the block device file {path!r}")
        self.drives[m.group(1)] = body

    async def _netif(self, body: dict[str, Any], m: re.Match[str]) -> None:
        if body.get("iface_id") != m.group(1):
            raise Fault("The id from the path does not match the id from the body!")
        _require_tap(body.get("host_dev_name"))
        self.netifs[m.group(1)] = body

    async def _vsock(self, body: dict[str, Any], _m: re.Match[str]) -> None:
        cid = body.get("guest_cid")
        if not isinstance(cid, int) or cid < 3 or not isinstance(body.get("uds_path"), str):
            raise Fault("guest_cid (>= 3) and uds_path are required")
        self.vsock = body

    async def _entropy(self, body: dict[str, Any], _m: re.Match[str]) -> None:
        return None

    # -- running ------------------------------------------------------------------------------

    async def _action(self, body: dict[str, Any], _m: re.Match[str]) -> None:
        action = body.get("action_type")
        if action not in ("FlushMetrics", "InstanceStart", "SendCtrlAltDel"):
            raise Fault(f"unknown action_type {action!r}")
        if action != "InstanceStart":
            if self.state == "Not started":
                raise Fault("The microVM is not running.")
            return
        if self.state != "Not started":
            raise Fault("The microVM is already running.")
        if self.boot_source is None:
            raise Fault("Cannot start microvm without kernel configuration.")
        config = None
        for drive in self.drives.values():
            if not drive.get("is_root_device") and drive.get("is_read_only"):
                raw = Path(drive["path_on_host"]).read_bytes().rstrip(b"\0")
                with contextlib.suppress(ValueError):
                    config = json.loads(raw)
        if not isinstance(config, dict):
            raise Fault("no config drive: the guest cannot start")
        await self._start_guest({str(k): str(v) for k, v in config.items()})
        self.state = "Running"

    async def _vm_state(self, body: dict[str, Any], _m: re.Match[str]) -> None:
        wanted = body.get("state")
        if wanted not in ("Paused", "Resumed"):
            raise Fault(f"unknown state {wanted!r}")
        if self.state == "Not started":
            raise Fault("The microVM is not running.")
        if self.guest is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.guest.pid, signal.SIGSTOP if wanted == "Paused" else signal.SIGCONT)
        self.state = "Paused" if wanted == "Paused" else "Running"

    async def _snapshot_create(self, body: dict[str, Any], _m: re.Match[str]) -> None:
        if self.state != "Paused":
            raise Fault("Cannot create a snapshot: the microVM is not paused.")
        snap, mem = body.get("snapshot_path"), body.get("mem_file_path")
        if not isinstance(snap, str) or not isinstance(mem, str):
            raise Fault("snapshot_path and mem_file_path are required")
        if self.muxer is not None:
            self.muxer.reset()  # vsock connections do not survive a snapshot
        state = {
            "guest": self.guest_config,
            "drives": self.drives,
            "netifs": self.netifs,
            "vsock": self.vsock,
            "machine": self.machine,
        }
        Path(snap).write_text(json.dumps(state))
        Path(mem).write_bytes(os.urandom(4096))

    async def _snapshot_load(self, body: dict[str, Any], _m: re.Match[str]) -> None:
        if self.state != "Not started" or self.configured:
            raise Fault(
                "Loading a microVM snapshot not allowed after configuring boot-specific resources."
            )
        backend = body.get("mem_backend")
        mem = backend.get("backend_path") if isinstance(backend, dict) else None
        mem = mem or body.get("mem_file_path")
        if not isinstance(mem, str) or not Path(mem).is_file():
            raise Fault(f"Cannot open the memory file {mem!r}")
        try:
            state = json.loads(Path(str(body.get("snapshot_path"))).read_text())
        except (OSError, ValueError) as exc:
            raise Fault(f"Cannot load the snapshot: {exc}") from None
        for drive in state["drives"].values():  # reopened by the names they were given
            if not Path(drive["path_on_host"]).is_file():
                raise Fault(f"Unable to open the block device file {drive['path_on_host']!r}")
        self.drives, self.machine = state["drives"], state["machine"]
        self.netifs, self.vsock = state["netifs"], state["vsock"]
        for override in body.get("network_overrides") or []:
            iface = self.netifs.get(override.get("iface_id"))
            if iface is None:
                raise Fault(f"no network interface {override.get('iface_id')!r} in the snapshot")
            _require_tap(override.get("host_dev_name"))
            iface["host_dev_name"] = override["host_dev_name"]
        if isinstance(body.get("vsock_override"), dict):
            assert self.vsock is not None
            self.vsock["uds_path"] = body["vsock_override"]["uds_path"]
        await self._start_guest(state["guest"])
        self.state = "Running"
        if not body.get("resume_vm"):
            await self._vm_state({"state": "Paused"}, _m)

    async def _describe(self, _body: dict[str, Any], _m: re.Match[str]) -> dict[str, Any]:
        return {
            "app_name": "Firecracker",
            "id": self.vm_id,
            "state": self.state,
            "vmm_version": "1.17.0-dev",
        }

    async def _version(self, _body: dict[str, Any], _m: re.Match[str]) -> dict[str, Any]:
        return {"firecracker_version": "1.17.0-dev"}

    # -- the guest ----------------------------------------------------------------------------

    async def _start_guest(self, config: dict[str, str]) -> None:
        if self.vsock is None:
            raise Fault("no vsock device: the guest agent cannot be reached")
        self.guest_config = config
        guest = self.guest_dir
        guest.mkdir(mode=0o700, exist_ok=True)
        (guest / "home").mkdir(mode=0o700, exist_ok=True)
        secret = guest / "agent.secret"
        secret.write_text(config["secret"] + "\n")
        write_boot_lease(config, guest)  # as the guest init does from the config disk
        uds = Path(self.vsock["uds_path"])
        argv = [
            sys.executable,
            "-m",
            "airlock.agent.server",
            "--state-dir",
            str(guest),
            "--role",
            config.get("role", "cli"),
            "--egress-socket",
            f"{uds}_{EGRESS_PORT}",  # a guest connection to the host's port 3128
            "--run-dir",
            str(guest / "run"),
        ]
        log = open(guest / "agent.log", "ab")  # noqa: SIM115 - the child keeps it
        try:
            self.guest = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env={**os.environ, "HOME": str(guest / "home")},
                preexec_fn=_die_with_parent,  # the guest dies with its VMM
            )
        finally:
            log.close()
        self.muxer = VsockMuxer(uds, {p: guest / name for p, name in GUEST_PORTS.items()})
        await self.muxer.start()
        self._watcher = asyncio.get_running_loop().create_task(
            self._watch_guest(self.guest), name="guest-watch"
        )

    async def _watch_guest(self, guest: subprocess.Popen[bytes]) -> None:
        """A guest whose lease ran out reboots, and Firecracker exits on a guest reboot."""
        exited = asyncio.Event()
        loop = asyncio.get_running_loop()
        pidfd = os.pidfd_open(guest.pid)
        loop.add_reader(pidfd, exited.set)
        try:
            await exited.wait()
        finally:
            loop.remove_reader(pidfd)
            os.close(pidfd)
        if guest.wait() == LEASE_EXPIRED_EXIT:
            self._stop.set()

    async def _stop_guest(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
        if self.muxer is not None:
            await self.muxer.close()
        if self.guest is not None and self.guest.poll() is None:
            self.guest.kill()
            self.guest.wait()


def _require_tap(name: Any) -> None:
    """Firecracker opens the tap in its own network namespace: it must exist there."""
    if not isinstance(name, str) or not Path("/sys/class/net", name).exists():
        raise Fault(f"Could not create the network device: open tap {name!r} failed")


def _fault(message: str) -> dict[str, Any]:
    return {"fault_message": message}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="firecracker_api_double", description=__doc__)
    parser.add_argument("--api-sock", type=Path, required=True)
    parser.add_argument("--id", default="anonymous-instance")
    parser.add_argument("--record", type=Path)
    args = parser.parse_args(argv)
    asyncio.run(FirecrackerDouble(args.api_sock, args.id, args.record).serve())


if __name__ == "__main__":
    main()
