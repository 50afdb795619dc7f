"""A VM resumed from a shared snapshot: fresh entropy, machine id and secret (the
``restored`` op). Standard library only."""

from __future__ import annotations

import base64
import binascii
import contextlib
import fcntl
import logging
import secrets
import struct
from pathlib import Path
from typing import Any, Literal

from airlock.agent.files import write_atomic
from airlock.agent.oparg import OpError
from airlock.agent.protocol import RestoredResult

log = logging.getLogger("airlock.agent")

RNDADDENTROPY = 0x40085203  # _IOW('R', 0x03, int[2])
RNDRESEEDCRNG = 0x5207  # _IO('R', 0x07)


def reseed_kernel_rng(entropy: bytes) -> Literal["ioctl", "write"]:
    """Mix ``entropy`` into the kernel's pool, credited and with a CRNG reseed where we may
    (``RNDADDENTROPY`` + ``RNDRESEEDCRNG``, needs CAP_SYS_ADMIN: Firecracker's
    random-for-clones.md), else as a plain write (mixed, not credited). Returns which."""
    with open("/dev/urandom", "wb", buffering=0) as dev:
        try:
            info = struct.pack("ii", len(entropy) * 8, len(entropy)) + entropy
            fcntl.ioctl(dev.fileno(), RNDADDENTROPY, info)
            with contextlib.suppress(OSError):
                fcntl.ioctl(dev.fileno(), RNDRESEEDCRNG)
            return "ioctl"
        except OSError:
            dev.write(entropy)
            return "write"


def restore(message: dict[str, Any]) -> tuple[bytes, RestoredResult]:
    """The ``restored`` op: take fresh entropy from the host into the kernel's pool, write a
    new machine id; returns the new secret (the snapshot's is known to every clone) and the
    op's result. Firecracker's VMGenID already reseeds the kernel's CRNG on Linux >= 5.18;
    this covers what it does not (ids, our secret) and older kernels."""
    secret = message.get("secret")
    if not isinstance(secret, str) or len(secret) < 32 or not secret.isprintable():
        raise OpError("bad_request", "secret must be a printable string of >= 32 chars")
    try:
        entropy = base64.b64decode(str(message.get("entropy", "")), validate=True)
    except (binascii.Error, ValueError):
        raise OpError("bad_request", "entropy must be base64") from None
    if not 32 <= len(entropy) <= 512:
        raise OpError("bad_request", "entropy must be 32 to 512 bytes")
    reseeded = reseed_kernel_rng(entropy)
    machine_id = False
    with contextlib.suppress(OSError):  # read-only where /etc is the host's (sandbox)
        write_atomic(Path("/etc/machine-id"), secrets.token_hex(16).encode() + b"\n", 0o444)
        machine_id = True
    log.info("restored from a snapshot: rng %s, machine id %s", reseeded, machine_id)
    return secret.encode(), {"reseeded": reseeded, "machine_id": machine_id}
