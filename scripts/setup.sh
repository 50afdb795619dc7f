#!/usr/bin/env bash
# Makes this checkout runnable on Debian 12: installs the system packages Airlock needs
# (only the missing ones) and keeps .venv in step with pyproject.toml.
#
#   scripts/setup.sh [--with-postgres] [--with-qemu]
#
# Idempotent and quick when nothing is missing: it checks before it installs, runs
# `apt-get update` only when a package is missing, and reinstalls the Python packages
# only when pyproject.toml changed since the last successful install (a hash in .venv).
# Everything it says goes to standard error.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

started=$(date +%s%N)
say() { printf 'setup: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

with_postgres=0
with_qemu=0
for arg in "$@"; do
  case $arg in
    --with-postgres) with_postgres=1 ;;
    --with-qemu) with_qemu=1 ;;
    -h | --help) sed -n '2,10s/^# \{0,1\}//p' "$0"; exit 0 ;;
    *) die "unknown option $arg (try --help)" ;;
  esac
done

# Two checkouts (or two engineers) running set-up at once would fight over apt and pip.
exec 9>"${TMPDIR:-/tmp}/airlock-setup.lock"
flock 9

# --- system packages ----------------------------------------------------------------------
# Installed without Recommends (those pull in desktop services and a GUI for QEMU), so the
# recommended packages that matter are named: fonts for Chromium and Xvnc, CA certificates.
packages=(
  make python3 python3-venv python3-dev ca-certificates
  bubblewrap passt iproute2 procps
  tigervnc-standalone-server tigervnc-tools xfonts-base
  chromium fonts-liberation fonts-dejavu-core
)
((with_postgres)) && packages+=(postgresql)
((with_qemu)) && packages+=(qemu-system-x86 qemu-utils mmdebstrap lz4 e2fsprogs)

as_root() {
  if ((EUID == 0)); then
    "$@"
  elif command -v sudo >/dev/null; then
    sudo "$@"
  else
    die "root is needed to run: $*"
  fi
}

apt_install() {
  local log="${TMPDIR:-/tmp}/airlock-setup-apt.log"
  say "installing with apt-get: $* (log: $log)"
  if ! {
    as_root apt-get update -q &&
      as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
        --no-install-recommends -o DPkg::Lock::Timeout=120 "$@"
  } >"$log" 2>&1 9>&-; then
    tail -n 25 "$log" >&2
    die "apt-get failed (full log: $log)"
  fi
}

missing=()
if command -v dpkg-query >/dev/null; then
  installed=" $(dpkg-query -W -f='${Package}=${db:Status-Abbrev} ' "${packages[@]}" 2>/dev/null || true) "
  for p in "${packages[@]}"; do
    [[ $installed == *" $p=ii "* ]] || missing+=("$p")
  done
  if ((${#missing[@]})); then
    command -v apt-get >/dev/null || die "missing packages and no apt-get: ${missing[*]}"
    apt_install "${missing[@]}"
  fi
else
  say "warning: not a Debian system; make sure these are installed: ${packages[*]}"
fi

# --- the Python environment ---------------------------------------------------------------
is_new_enough() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; }

find_python() {
  # python3 on PATH first (a developer's pyenv, say), then Debian's own.
  local candidate
  for candidate in "${PYTHON:-}" python3 /usr/bin/python3; do
    if [[ -z $candidate ]] || ! command -v "$candidate" >/dev/null; then continue; fi
    if is_new_enough "$candidate"; then
      command -v "$candidate"
      return 0
    fi
    say "skipping $candidate: $("$candidate" -V 2>&1), Airlock needs Python >= 3.11"
  done
  return 1
}

venv=.venv
if ! is_new_enough "$venv/bin/python"; then
  python=$(find_python) || die "no Python >= 3.11 found (tried \$PYTHON, python3, /usr/bin/python3)"
  if [[ -e $venv ]]; then
    say "$venv is broken or older than Python 3.11: recreating it with $python"
    clear=--clear
  else
    say "creating $venv with $python ($("$python" -V 2>&1))"
    clear=
  fi
  if ! "$python" -m venv $clear "$venv" >&2; then
    rm -rf "$venv"
    die "'$python -m venv' failed; on Debian install python3-venv, elsewhere a Python with ensurepip"
  fi
  "$venv/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip >&2 ||
    say "warning: could not upgrade pip; going on with $("$venv/bin/python" -m pip -V)"
fi

stamp=$venv/.airlock-pyproject.sha256
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [[ $(cat "$stamp" 2>/dev/null) != "$want" || ! -x $venv/bin/airlock ]]; then
  say "installing Python packages: pip install -e '.[dev]'"
  pip_install() {
    PIP_NO_INPUT=1 "$venv/bin/python" -m pip install -q --disable-pip-version-check -e '.[dev]' >&2
  }
  if ! pip_install; then
    # Every dependency ships wheels for CPython 3.11 on x86_64 and arm64; a compiler is
    # only needed when one does not, so it is installed only then.
    command -v cc >/dev/null && die "pip install failed"
    say "pip install failed and there is no C compiler: installing build-essential, retrying"
    command -v apt-get >/dev/null || die "pip install failed; install a C compiler and retry"
    apt_install build-essential python3-dev
    pip_install || die "pip install failed"
  fi
  printf '%s\n' "$want" >"$stamp"
fi

# --- the viewer page's JavaScript ---------------------------------------------------------
# noVNC's ES modules, pinned by package-lock.json, served by the controller from node_modules
# (never committed). npm ci runs only when the lockfile changed since the last install.
if ! command -v npm >/dev/null; then
  command -v apt-get >/dev/null || die "npm is missing; install Node.js and npm"
  apt_install nodejs npm
fi
js_stamp=node_modules/.airlock-package-lock.sha256
js_want=$(sha256sum package-lock.json | cut -d' ' -f1)
if [[ $(cat "$js_stamp" 2>/dev/null) != "$js_want" || ! -f node_modules/@novnc/novnc/core/rfb.js ]]; then
  say "installing the viewer's JavaScript: npm ci"
  npm ci --ignore-scripts --no-audit --no-fund --loglevel=error >&2 || die "npm ci failed"
  printf '%s\n' "$js_want" >"$js_stamp"
fi

# --- the vendor CLIs (Claude Code, Codex, Gemini CLI) ---------------------------------------
# Pinned in vendor-clis/package-lock.json, installed with `npm ci` under /usr/local, which
# every sandbox VM sees read-only (with /usr): the browser VM logs in with the same binary
# the CLI VM is verified with. Skipped while the lockfile's hash is unchanged. Debian 12's
# own nodejs is 18: Claude Code and Codex run on it, Gemini CLI needs 20 and is then
# reported unavailable by GET /api/providers.
vendor_dir=/usr/local/lib/airlock/vendor-clis
if ! command -v npm >/dev/null; then
  command -v apt-get >/dev/null || die "npm is missing: install Node.js and npm"
  apt_install nodejs npm
fi
vendor_stamp=$vendor_dir/.airlock-lock.sha256
vendor_want=$(sha256sum vendor-clis/package-lock.json | cut -d' ' -f1)
if [[ $(cat "$vendor_stamp" 2>/dev/null) != "$vendor_want" ]]; then
  say "installing the vendor CLIs: npm ci in $vendor_dir (about 900 MB, once)"
  as_root mkdir -p "$vendor_dir"
  as_root cp vendor-clis/package.json vendor-clis/package-lock.json "$vendor_dir/"
  if ! (cd "$vendor_dir" && as_root npm ci --no-audit --no-fund --loglevel=error) >&2 9>&-; then
    die "npm ci of the vendor CLIs failed"
  fi
  printf '%s\n' "$vendor_want" | as_root tee "$vendor_stamp" >/dev/null
fi

elapsed_ms=$((($(date +%s%N) - started) / 1000000))
say "ready in ${elapsed_ms} ms ($("$venv/bin/python" -V), .venv up to date with pyproject.toml)"
