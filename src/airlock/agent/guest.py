"""PID 1 of a guest image (after ``/sbin/airlock-init`` mounted the basics): read this VM's
config, start the guest agent and the channel multiplexer, keep them running, reap orphans.

The config is the second disk (``/dev/vdb``): JSON padded with NUL bytes, written by the
runtime into the VM's state dir. A disk rather than the kernel command line, which any host
user can read in ``ps``. Standard library only.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

CONFIG_DISK = "/dev/vdb"
STATE = Path("/run/airlock")
MUX_PORT = "org.airlock.mux"
RESTART_PAUSE_S = 1.0
LEASE_EXPIRED_EXIT = 75  # agent.protocol.LEASE_EXPIRED_EXIT (this file imports nothing of ours)
# reboot(2): QEMU runs with -no-reboot and Firecracker exits on a guest reboot, so a reboot
# ends the VM on both (Firecracker has no ACPI power-off).
RB_AUTOBOOT = 0x01234567  # <sys/reboot.h>


def _say(message: str) -> None:
    print(f"airlock-guest: {message}", file=sys.stderr, flush=True)


def read_config(path: str = CONFIG_DISK) -> dict[str, str]:
    with open(path, "rb") as fh:
        raw = fh.read(64 * 1024).rstrip(b"\0")
    value = json.loads(raw)
    if not isinstance(value, dict):
        raise ValueError("config is not an object")
    return {str(k): str(v) for k, v in value.items()}


def _commands(config: dict[str, str]) -> dict[str, list[str]]:
    py = [sys.executable, "-m"]
    agent = [
        *py,
        "airlock.agent.server",
        "--state-dir",
        str(STATE),
        "--role",
        config.get("role", "cli"),
        "--screen",
        config.get("screen", "1280x800"),
        "--browser-processes",
        config.get("browser_processes", "single"),
        "--egress-socket",
        str(STATE / "egress.sock"),
        "--run-dir",
        "/run/airlock-run",
    ]
    mux = [
        *py,
        "airlock.agent.mux",
        "--port-name",
        MUX_PORT,
        "--target",
        f"agent={STATE / 'agent.sock'}",
        "--target",
        f"vnc={STATE / 'vnc.sock'}",
        "--listen",
        f"egress={STATE / 'egress.sock'}",
    ]
    if _firecracker():
        # No virtio-serial port for the mux: the streams go over vsock (agent.vsock).
        return {"agent": agent, "vsock": [*py, "airlock.agent.vsock", "--state-dir", str(STATE)]}
    return {"agent": agent, "mux": mux}


def write_boot_lease(config: dict[str, str], state: Path = STATE) -> None:
    """The boot lease for the agent (``agent.lease``), from the config disk's ``lease_ms`` and
    ``lease_margin_ms``; none for a VM without a lease (a CLI VM)."""
    if "lease_ms" not in config:
        return
    lease = {"for_ms": int(config["lease_ms"]), "margin_ms": int(config.get("lease_margin_ms", 0))}
    (state / "agent.lease").write_text(json.dumps(lease))


def end_vm() -> None:
    """The lease ran out: end the VM now. Nothing in it is worth keeping (a browser VM's disk
    is its image plus a throwaway overlay), so no clean shutdown."""
    os.sync()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.reboot(RB_AUTOBOOT)
    _say(f"reboot(2) failed: errno {ctypes.get_errno()}")  # only returns when it failed
    os._exit(1)  # PID 1 exiting panics the kernel, which with panic=-1 also ends the VM


def _firecracker() -> bool:
    """A vsock device and no virtio-serial port: a Firecracker VM (QEMU gives us the port)."""
    ports = Path("/sys/class/virtio-ports")
    return Path("/dev/vsock").exists() and not (ports.is_dir() and any(ports.iterdir()))


def main() -> None:
    STATE.mkdir(mode=0o700, parents=True, exist_ok=True)
    Path("/run/airlock-run").mkdir(mode=0o700, exist_ok=True)
    try:
        config = read_config()
    except (OSError, ValueError) as exc:
        _say(f"no usable config on {CONFIG_DISK}: {exc}")
        config = {}
    secret = config.pop("secret", "")
    if secret:
        fd = os.open(STATE / "agent.secret", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secret)
    try:
        write_boot_lease(config)
    except (OSError, ValueError) as exc:
        _say(f"the config's lease is unusable ({exc}): ending the VM")
        end_vm()
    if config.get("role") == "browser" and shutil.which("Xvnc") is None:
        # The minimal image has no screen: its agent runs the login headless (for tests).
        _say("no Xvnc in this image: the browser VM runs headless")
        config["role"] = "cli"
    commands = _commands(config)
    children: dict[int, str] = {}

    def start(name: str) -> None:
        proc = subprocess.Popen(commands[name], stdin=subprocess.DEVNULL)
        children[proc.pid] = name

    for name in commands:
        start(name)
    _say("agent and mux started")
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            time.sleep(RESTART_PAUSE_S)
            continue
        exited = children.pop(pid) if pid in children else None
        if exited == "agent" and os.waitstatus_to_exitcode(status) == LEASE_EXPIRED_EXIT:
            _say("the agent's lease ran out: ending the VM")
            end_vm()
        if exited is not None:  # not an orphan we merely reaped
            _say(f"{exited} exited ({status}); restarting")
            time.sleep(RESTART_PAUSE_S)
            start(exited)


if __name__ == "__main__":
    main()
