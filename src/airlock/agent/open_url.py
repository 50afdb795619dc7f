"""The VM's ``$BROWSER``: hands a URL to the guest agent, which opens it in Chromium.

Standard library only. A vendor CLI runs ``$BROWSER <url>`` and expects it to return soon;
so this only delivers the URL over the agent's VM-local socket and exits. The agent then
retries until Chromium's DevTools answers, so it works even before Chromium is up.
"""

from __future__ import annotations

import os
import socket
import sys

ENV_SOCKET = "AIRLOCK_OPEN_SOCKET"


def main(argv: list[str], socket_path: str | None = None) -> int:
    urls = [a for a in argv if not a.startswith("-")]
    if not urls:
        print("usage: browser URL", file=sys.stderr)
        return 2
    path = socket_path or os.environ.get(ENV_SOCKET, "")
    if not path:
        print("browser: no agent socket", file=sys.stderr)
        return 1
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(path)
            sock.sendall(urls[0].encode() + b"\n")
            answer = sock.makefile("rb").readline().decode("utf-8", "replace").strip()
    except OSError as exc:
        print(f"browser: cannot reach the agent: {exc}", file=sys.stderr)
        return 1
    if answer != "ok":
        print(f"browser: {answer or 'no answer'}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
