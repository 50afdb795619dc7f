"""AES-GCM envelope for captured credentials.

The key file holds one or more 256-bit keys as JSON (``{"current": id, "keys": {id:
base64}}``), created 0600 on first start. A file readable by group or others is refused,
not silently used. Each ciphertext records its key id, so older keys stay readable while
``airlock vault rotate`` re-encrypts under a new one (``services.keys``). The associated data
binds a ciphertext to its session and provider: a row copied elsewhere does not decrypt.

A vault opened from a file follows it: when the file changes (a rotation in another process
added a key and made it current), the next ``seal`` or ``open_sealed`` reloads it, so a
running controller seals under the new key and reads rows already re-encrypted, without a
restart. The file is only ever replaced whole (temp file + rename), never edited in place.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import secrets
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from airlock.errors import AirlockError


class VaultError(AirlockError):
    code = "vault_error"


@dataclass(frozen=True, slots=True)
class Sealed:
    key_id: str
    nonce: bytes
    ciphertext: bytes


class Vault:
    def __init__(
        self,
        keys: dict[str, bytes],
        current: str,
        *,
        path: Path | None = None,
        stamp: tuple[int, int, int] | None = None,
    ) -> None:
        if current not in keys:
            raise VaultError(f"current key {current!r} is not in the key file")
        self._keys = keys
        self.current = current
        self.path = path
        self._stamp = stamp

    @property
    def key_ids(self) -> list[str]:
        return sorted(self._keys)

    def _refresh(self) -> None:
        """Reload when the key file was replaced since we read it (one stat per call)."""
        if self.path is None:
            return
        try:
            stamp = _stamp(self.path)
        except OSError:
            return  # keep the keys we have; a missing file is reported at the next open
        if stamp != self._stamp:
            fresh = Vault.open(self.path)
            self._keys, self.current, self._stamp = fresh._keys, fresh.current, fresh._stamp

    def add_key(self) -> str:
        """A new key becomes current; every old key stays readable. Written atomically."""
        self._refresh()
        key_id = secrets.token_hex(4)
        while key_id in self._keys:
            key_id = secrets.token_hex(4)
        keys = {**self._keys, key_id: AESGCM.generate_key(256)}
        self._write(keys, key_id)
        return key_id

    def drop_keys(self, keep: set[str]) -> list[str]:
        """Forget every key not in ``keep`` (the current one is always kept)."""
        self._refresh()
        keep = keep | {self.current}
        dropped = sorted(set(self._keys) - keep)
        if dropped:
            self._write({k: v for k, v in self._keys.items() if k in keep}, self.current)
        return dropped

    def _write(self, keys: dict[str, bytes], current: str) -> None:
        if self.path is None:
            self._keys, self.current = keys, current
            return
        body = {"current": current, "keys": {k: _b64(v) for k, v in keys.items()}}
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.")
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(body, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        self._keys, self.current, self._stamp = keys, current, _stamp(self.path)

    @classmethod
    def open(cls, path: Path) -> Vault:
        """Load the key file, creating it (0600) with a fresh key when it does not exist."""
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            key_id = secrets.token_hex(4)
            body = {"current": key_id, "keys": {key_id: _b64(AESGCM.generate_key(256))}}
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(body, f)
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            raise VaultError(
                f"key file {path} has mode {mode:04o}; it must be readable by its owner only "
                f"(chmod 600 {path})"
            )
        try:
            body = json.loads(path.read_text())
            keys = {k: base64.b64decode(v) for k, v in body["keys"].items()}
            current = body["current"]
        except (ValueError, KeyError, TypeError) as exc:
            raise VaultError(f"key file {path} is not a valid Airlock key file: {exc}") from None
        if any(len(k) != 32 for k in keys.values()):
            raise VaultError(f"key file {path} holds a key that is not 256 bits")
        return cls(keys, current, path=path, stamp=_stamp(path))

    def derive(self, label: str) -> list[bytes]:
        """A 256-bit key per vault key for another purpose (HKDF-SHA256, ``label`` as info),
        the current key's first: controllers sharing one key file derive the same keys, and
        the credential keys themselves never serve two purposes. Reloads a replaced key
        file first, so a rotation reaches what is derived here without a restart."""
        self._refresh()
        order = [self.current, *sorted(k for k in self._keys if k != self.current)]
        return [
            HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=label.encode()).derive(
                self._keys[key_id]
            )
            for key_id in order
        ]

    def fingerprints(self) -> dict[str, str]:
        """A fingerprint of each key (HKDF-SHA256 under its own label, hex, 128 bits):
        enough to tell two key files apart, useless for recovering a key. The controllers
        of one database compare theirs at start-up (``services.nodes``)."""
        self._refresh()
        return {
            key_id: HKDF(
                algorithm=hashes.SHA256(), length=16, salt=None, info=b"airlock key fingerprint v1"
            )
            .derive(key)
            .hex()
            for key_id, key in self._keys.items()
        }

    def seal(self, plaintext: bytes, *, context: str) -> Sealed:
        self._refresh()
        nonce = secrets.token_bytes(12)
        ct = AESGCM(self._keys[self.current]).encrypt(nonce, plaintext, context.encode())
        return Sealed(self.current, nonce, ct)

    def open_sealed(self, sealed: Sealed, *, context: str) -> bytes:
        if sealed.key_id not in self._keys:
            self._refresh()
        key = self._keys.get(sealed.key_id)
        if key is None:
            raise VaultError(f"credential sealed with unknown key {sealed.key_id!r}")
        try:
            return AESGCM(key).decrypt(sealed.nonce, sealed.ciphertext, context.encode())
        except InvalidTag:
            raise VaultError("credential does not decrypt: wrong key or tampered row") from None


def _stamp(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return st.st_ino, st.st_mtime_ns, st.st_size


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
