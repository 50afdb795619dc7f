"""Build a guest image from Debian packages (mmdebstrap) into a content-addressed cache.

The key hashes the flavor, its package list, the kernel package, the guest agent's source
and this module's own source (and, for ``cli``, the Node.js binary and the vendor CLIs'
lockfile, see ``vendor_clis``): an image is rebuilt exactly when something in it would
change. A build runs in a temporary directory and is renamed into place at the end, under
a file lock, so a crashed or concurrent build never leaves a half image that looks done.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import airlock
from airlock.images import kernel as kernel_mod

SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
KERNEL_PACKAGE = "linux-image-cloud-amd64"
CMDLINE = "console=ttyS0 root=/dev/vda rw quiet panic=-1 random.trust_cpu=on"
BASE_PACKAGES = ("python3", "busybox-static")
FLAVORS: dict[str, tuple[str, ...]] = {
    "minimal": BASE_PACKAGES,
    "browser": (
        *BASE_PACKAGES,
        "ca-certificates",
        "chromium",
        "tigervnc-standalone-server",
        "xfonts-base",
        "fonts-liberation",
        "fonts-dejavu-core",
    ),
    # Plus the host's Node.js and vendor CLIs (``vendor_clis``): node links libstdc++; the
    # CLIs speak TLS to their vendors.
    "cli": (*BASE_PACKAGES, "ca-certificates", "libstdc++6"),
}
# Docs, manuals and translations are dead weight in a VM nobody logs into.
PATH_EXCLUDES = (
    "/usr/share/doc/*",
    "/usr/share/man/*",
    "/usr/share/info/*",
    "/usr/share/locale/*",
    "/usr/share/lintian/*",
)

# PID 1 of the guest: the basics, then the agent's guest launcher (``airlock.agent.guest``).
AIRLOCK_INIT = """#!/bin/sh
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
bb=/bin/busybox
$bb mount -t proc proc /proc
$bb mount -t sysfs sysfs /sys
$bb mkdir -p /dev/pts /dev/shm
$bb mount -t devpts -o gid=5,mode=620 devpts /dev/pts
$bb mount -t tmpfs -o mode=1777 tmpfs /dev/shm
$bb mount -t tmpfs -o mode=0755 tmpfs /run
$bb mount -t tmpfs -o mode=1777 tmpfs /tmp
$bb hostname airlock
$bb ip link set lo up
# No swap and a few hundred MiB: the default heuristic refuses Chromium's renderers their V8
# address-space reservation ("V8 process OOM ... CodeRange"), leaving a crashed tab.
echo 1 > /proc/sys/vm/overcommit_memory
export HOME=/root PYTHONPATH=/opt/airlock
exec python3 -m airlock.agent.guest
"""

Progress = Callable[[str, int, int], None]  # (what is happening, step, of steps)


class ImageBuildError(Exception):
    """The image could not be built; the message says why and what to do."""


@dataclass(frozen=True, slots=True)
class Image:
    """A built image directory and its files (see the package docstring)."""

    path: Path
    flavor: str
    key: str
    cmdline: str
    kernel_version: str

    @property
    def vmlinuz(self) -> Path:
        return self.path / "vmlinuz"

    @property
    def vmlinux(self) -> Path:
        return self.path / "vmlinux"

    @property
    def initrd(self) -> Path:
        return self.path / "initrd.img"

    @property
    def rootfs(self) -> Path:
        return self.path / "rootfs.ext4"

    @classmethod
    def load(cls, path: Path) -> Image:
        meta = json.loads((path / "manifest.json").read_text())
        return cls(path, meta["flavor"], meta["key"], meta["cmdline"], meta["kernel_version"])


def _packages(flavor: str) -> tuple[str, ...]:
    if flavor not in FLAVORS:
        raise ImageBuildError(f"unknown flavor {flavor!r}; one of {', '.join(FLAVORS)}")
    return FLAVORS[flavor]


def _agent_files() -> list[Path]:
    pkg = Path(airlock.__file__).parent
    return [pkg / "__init__.py", *sorted((pkg / "agent").glob("*.py"))]


def image_key(flavor: str) -> str:
    """The content address of ``flavor``'s image as this code would build it."""
    h = hashlib.sha256()
    h.update(json.dumps([flavor, _packages(flavor), KERNEL_PACKAGE, SUITE, MIRROR]).encode())
    for f in [*_agent_files(), Path(__file__), Path(kernel_mod.__file__)]:
        h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    if flavor == "cli":
        h.update(json.dumps(vendor_clis().key_parts()).encode())
    return h.hexdigest()[:16]


def find_image(image_dir: Path, flavor: str) -> Image | None:
    """The cached image for ``flavor`` at the current key, if built."""
    path = image_dir / f"{flavor}-{image_key(flavor)}"
    return Image.load(path) if (path / "manifest.json").is_file() else None


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def build_image(
    image_dir: Path, flavor: str, *, progress: Progress | None = None, force: bool = False
) -> Image:
    """The image for ``flavor``: from the cache, or built now (a few minutes)."""
    packages = _packages(flavor)
    report = progress or (lambda _what, _i, _n: None)
    missing = [t for t in ("mmdebstrap", "mke2fs", "apt-get", "dpkg-deb") if not shutil.which(t)]
    if missing:
        raise ImageBuildError(
            f"missing tools: {', '.join(missing)} (scripts/setup.sh --with-qemu installs them)"
        )
    key = image_key(flavor)  # the cli flavor's missing vendor CLIs fail here, changing nothing
    image_dir.mkdir(parents=True, exist_ok=True)
    final = image_dir / f"{flavor}-{key}"
    with _locked(image_dir / f".{flavor}-{key}.lock"):
        if (final / "manifest.json").is_file() and not force:
            report("cached", 1, 1)
            return Image.load(final)
        work = Path(tempfile.mkdtemp(prefix=f".build-{flavor}-", dir=image_dir))
        try:
            _build(work, flavor, key, packages, report)
            if final.exists():
                shutil.rmtree(final)
            work.rename(final)
            os.chmod(final, 0o755)
            _prune(image_dir, flavor, keep=final)
            return Image.load(final)
        finally:
            shutil.rmtree(work, ignore_errors=True)


KEEP_OLD = 1  # older images of a flavor kept besides the new one (a VM may still boot one)


def _prune(image_dir: Path, flavor: str, keep: Path) -> None:
    """Remove all but the newest older images of ``flavor``: every agent change builds a new
    image, and each is a few hundred MB. Running VMs are unaffected (QEMU holds its base
    image open)."""
    old = sorted(
        (p for p in image_dir.glob(f"{flavor}-*") if p.is_dir() and p != keep),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    for path in old[KEEP_OLD:]:
        shutil.rmtree(path, ignore_errors=True)
        with contextlib.suppress(OSError):
            (image_dir / f".{path.name}.lock").unlink()


STEPS = 6


def _build(work: Path, flavor: str, key: str, packages: tuple[str, ...], report: Progress) -> Image:
    started = time.monotonic()
    root = work / "root"
    clis = vendor_clis() if flavor == "cli" else None  # before minutes of mmdebstrap
    report(f"mmdebstrap {SUITE}: {' '.join(packages)}", 0, STEPS)
    _check_packages(packages)
    _bootstrap(root, packages)

    report(f"kernel: {KERNEL_PACKAGE}", 1, STEPS)
    kdir = work / "kernel"
    version = _fetch_kernel(kdir)
    shutil.copyfile(kdir / "boot" / f"vmlinuz-{version}", work / "vmlinuz")

    report("guest agent and init" + (", Node.js and the vendor CLIs" if clis else ""), 2, STEPS)
    _install_agent(root)
    if clis is not None:
        _install_vendor_clis(root, clis)

    report("initramfs (busybox + virtio modules)", 3, STEPS)
    modules = kernel_mod.build_initramfs(
        root / "bin" / "busybox", kdir / "lib" / "modules" / version, work / "initrd.img"
    )

    report("root filesystem (ext4)", 4, STEPS)
    _mke2fs(root, work / "rootfs.ext4")
    shutil.rmtree(root)

    report("vmlinux (uncompressed kernel for Firecracker)", 5, STEPS)
    vmlinux = kernel_mod.extract_vmlinux((work / "vmlinuz").read_bytes())
    (work / "vmlinux").write_bytes(vmlinux)
    shutil.rmtree(kdir)

    manifest = {
        "flavor": flavor,
        "key": key,
        "kernel_version": version,
        "kernel_package": KERNEL_PACKAGE,
        "suite": SUITE,
        "packages": list(packages),
        "initramfs_modules": modules,
        "cmdline": CMDLINE,
        "build_seconds": round(time.monotonic() - started, 1),
        "sizes": {
            f.name: f.stat().st_size
            for f in sorted(work.iterdir())
            if f.is_file() and f.name != "manifest.json"
        },
    }
    if clis is not None:
        manifest["vendor_clis"] = clis.manifest()
    (work / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    report("done", STEPS, STEPS)
    return Image.load(work)


def _run(cmd: list[str], what: str, *, cwd: Path | None = None, timeout: float = 1200) -> str:
    try:
        proc = subprocess.run(
            cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        raise ImageBuildError(f"{what}: timed out after {timeout:.0f} s") from None
    if proc.returncode != 0:
        raise ImageBuildError(f"{what} failed: {_explain(proc.stderr + proc.stdout)}")
    return proc.stdout


_UNREACHABLE = (
    re.compile(r"Unable to locate package (\S+)"),
    re.compile(r"Package '?(\S+?)'? has no installation candidate"),
    re.compile(r"Failed to fetch (\S+)"),
    re.compile(r"Could not resolve '([^']+)'"),
    re.compile(r"Unable to connect to (\S+)"),
)


def _explain(output: str) -> str:
    """The line that says which package or mirror was unreachable, else the last lines."""
    for pattern in _UNREACHABLE:
        m = pattern.search(output)
        if m:
            line = next(ln for ln in output.splitlines() if m.group(0) in ln)
            return f"package or mirror unreachable: {m.group(1)} ({line.strip()})"
    tail = [ln for ln in output.strip().splitlines() if ln.strip()][-5:]
    return " | ".join(tail) or "no output"


def _check_packages(packages: tuple[str, ...]) -> None:
    """Fail in a second, naming the package, rather than minutes into mmdebstrap: ask the
    host's apt lists (the same Debian mirror) whether each package exists."""
    missing = []
    for package in (*packages, KERNEL_PACKAGE):
        done = subprocess.run(
            ["apt-cache", "show", "--no-all-versions", package],
            capture_output=True,
            timeout=60,
            check=False,
        )
        if done.returncode != 0 or not done.stdout.strip():
            missing.append(package)
    if missing:
        raise ImageBuildError(
            f"package unreachable: {', '.join(missing)} (not in this host's apt lists for "
            f"{SUITE}; check the name, or run apt-get update)"
        )


def _bootstrap(root: Path, packages: tuple[str, ...]) -> None:
    cmd = [
        "mmdebstrap",
        "--quiet",
        "--mode=root",
        "--variant=essential",
        f"--include={','.join(packages)}",
        *(f"--dpkgopt=path-exclude={p}" for p in PATH_EXCLUDES),
        SUITE,
        str(root),
        MIRROR,
    ]
    _run(cmd, "mmdebstrap")


def _fetch_kernel(dest: Path) -> str:
    """Download the cloud kernel package with the host's apt (same Debian mirror) and unpack
    it; not installed into the root filesystem, which keeps initramfs-tools out of it."""
    deps = _run(["apt-cache", "depends", KERNEL_PACKAGE], "apt-cache depends")
    m = re.search(r"Depends: (linux-image-(\S+))", deps)
    if not m:
        raise ImageBuildError(
            f"package unreachable: {KERNEL_PACKAGE} has no kernel dependency in the apt lists "
            "(run apt-get update)"
        )
    package, version = m.group(1), m.group(2)
    dl = dest.parent / "kernel-deb"
    dl.mkdir()
    os.chmod(dl, 0o777)  # apt-get download drops to the _apt user
    _run(["apt-get", "download", "-q", package], f"apt-get download {package}", cwd=dl)
    debs = list(dl.glob("*.deb"))
    if not debs:
        raise ImageBuildError(f"package unreachable: {package} (apt-get download got nothing)")
    _run(["dpkg-deb", "-x", str(debs[0]), str(dest)], "dpkg-deb -x")
    shutil.rmtree(dl)
    return version


def _install_agent(root: Path) -> None:
    opt = root / "opt" / "airlock" / "airlock"
    (opt / "agent").mkdir(parents=True)
    for f in _agent_files():
        target = opt / f.name if f.name == "__init__.py" and f.parent.name != "agent" else None
        shutil.copyfile(f, target or opt / "agent" / f.name)
    init = root / "sbin" / "airlock-init"
    init.write_text(AIRLOCK_INIT)
    init.chmod(0o755)
    # Compiled once here: under TCG, compiling at every boot costs seconds.
    _run(
        ["chroot", str(root), "python3", "-m", "compileall", "-q", "/opt/airlock"],
        "compileall in the image",
    )


# -- the cli flavor: Node.js and the vendor CLIs --------------------------------------------
# Where scripts/setup.sh installs the CLIs, and where the providers run them (the same path as
# ``airlock.providers.vendor.VENDOR_CLI_DIR``, which images, a lower layer, cannot import).
VENDOR_CLI_DIR = Path("/usr/local/lib/airlock/vendor-clis")
VENDOR_CLIS = ("claude", "codex", "gemini")  # node_modules/.bin names
NODE_MAJOR = 20  # gemini-cli's engines; Debian bookworm's nodejs is 18
GUEST_NODE = Path("/usr/bin/node")
SETUP_HINT = "run scripts/setup.sh, which installs them pinned by vendor-clis/package-lock.json"


@dataclass(frozen=True, slots=True)
class VendorClis:
    """The host's install that the cli flavor copies, and what the image key hashes of it."""

    directory: Path
    node: Path
    node_version: str
    node_sha256: str
    lock_sha256: str
    pins: dict[str, str]

    def key_parts(self) -> list[str]:
        return [self.node_version, self.node_sha256, self.lock_sha256]

    def manifest(self) -> dict[str, object]:
        return {
            "directory": str(VENDOR_CLI_DIR),
            "node": self.node_version,
            "node_sha256": self.node_sha256,
            "package_lock_sha256": self.lock_sha256,
            "packages": self.pins,
        }


def vendor_clis(directory: Path | None = None, node: Path | None = None) -> VendorClis:
    """The Node.js runtime and vendor CLIs for the cli flavor: the host's, as set-up
    installed them, copied into the image at the same paths.

    Why not from Debian packages like the rest: bookworm's nodejs is 18 and Gemini CLI needs
    20; the host's Node 20 is a repackaged NodeSource .deb that no apt source here serves
    (``apt-get download`` cannot fetch it again), and the CLIs are npm packages, not Debian
    ones. ``scripts/setup.sh`` already installed both, the CLIs by ``npm ci`` from the pinned
    lockfile; copying them gives the guest the very bytes the sandbox runtime runs and the
    providers check, with no second 900 MB download and no network during the build. The
    key hashes node's version and bytes and the installed lockfile: a changed pin (once
    set-up installed it) or another node builds a new image."""
    directory = directory or VENDOR_CLI_DIR
    bins = directory / "node_modules" / ".bin"
    missing = [n for n in VENDOR_CLIS if not os.access(bins / n, os.X_OK)]
    if missing:
        raise ImageBuildError(
            f"the cli image needs the vendor CLIs; {', '.join(missing)} not installed in "
            f"{bins}: {SETUP_HINT}"
        )
    lock = directory / "package-lock.json"
    lock_sha = hashlib.sha256(lock.read_bytes()).hexdigest()
    stamp = directory / ".airlock-lock.sha256"
    if not stamp.is_file() or stamp.read_text().strip() != lock_sha:
        raise ImageBuildError(f"the vendor CLIs in {directory} are half installed: {SETUP_HINT}")
    pinned = Path(airlock.__file__).resolve().parents[2] / "vendor-clis" / "package-lock.json"
    if pinned.is_file() and hashlib.sha256(pinned.read_bytes()).hexdigest() != lock_sha:
        raise ImageBuildError(
            f"the vendor CLIs in {directory} are not the ones {pinned} pins: {SETUP_HINT}"
        )
    found = node or (Path(w) if (w := shutil.which("node")) else None)
    if found is None:
        raise ImageBuildError(f"the cli image needs Node.js >= {NODE_MAJOR}; no node on PATH")
    found = found.resolve()
    st = found.stat()
    version = _node_version(found, st.st_size, st.st_mtime_ns)
    if int(version.lstrip("v").split(".")[0]) < NODE_MAJOR:
        raise ImageBuildError(
            f"the cli image needs Node.js >= {NODE_MAJOR} (Gemini CLI); {found} is {version}"
        )
    pins = json.loads((directory / "package.json").read_text()).get("dependencies", {})
    return VendorClis(
        directory, found, version, _sha256_file(found, st.st_size, st.st_mtime_ns), lock_sha, pins
    )


@functools.cache
def _node_version(node: Path, _size: int, _mtime_ns: int) -> str:
    """Once per process per node binary, like ``_sha256_file``: not a subprocess per key."""
    try:
        out = subprocess.run(
            [str(node), "--version"], capture_output=True, text=True, timeout=30, check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        raise ImageBuildError(f"{node} --version failed: {exc}") from None
    if not re.fullmatch(r"v\d+\.\d+\.\d+", out):
        raise ImageBuildError(f"{node} --version said {out!r}, not a Node.js version")
    return out


@functools.cache
def _sha256_file(path: Path, _size: int, _mtime_ns: int) -> str:
    """Once per process per file version: ``find_image`` runs at every VM create."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _install_vendor_clis(root: Path, clis: VendorClis) -> None:
    """The tree where the providers look for it, node on PATH (the CLIs' ``#!/usr/bin/env
    node``), and each CLI in /usr/local/bin for a person at the guest's shell."""
    dest = root / VENDOR_CLI_DIR.relative_to("/")
    shutil.copytree(clis.directory, dest, symlinks=True)
    if hashlib.sha256((dest / "package-lock.json").read_bytes()).hexdigest() != clis.lock_sha256:
        raise ImageBuildError(f"{clis.directory} changed during the build: build again")
    shutil.copy2(clis.node, root / GUEST_NODE.relative_to("/"))
    local_bin = root / "usr" / "local" / "bin"
    local_bin.mkdir(parents=True, exist_ok=True)
    for name in VENDOR_CLIS:
        (local_bin / name).symlink_to(VENDOR_CLI_DIR / "node_modules" / ".bin" / name)
    # Fails here, not in a VM, when node lacks a shared library in the image.
    out = _run(["chroot", str(root), str(GUEST_NODE), "--version"], "node --version in the image")
    if out.strip() != clis.node_version:
        raise ImageBuildError(f"node in the image says {out.strip()}, not {clis.node_version}")


def _mke2fs(root: Path, dest: Path) -> None:
    used = int(_run(["du", "-sb", str(root)], "du").split()[0])
    size_mb = int(used * 1.3 / 2**20) + 128  # room for the agent's files and logs
    _run(
        [
            "mke2fs",
            "-q",
            "-t",
            "ext4",
            "-L",
            "airlock-root",
            "-E",
            "root_owner=0:0",
            "-d",
            str(root),
            str(dest),
            f"{size_mb}M",
        ],
        "mke2fs",
    )
