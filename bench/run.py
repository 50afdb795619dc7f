"""``make bench``: run every benchmark and print its figures."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import lifecycle, mux, qemu_boot, sse_fanout, vnc_proxy, warm_pool

if __name__ == "__main__":
    lifecycle.main()
    vnc_proxy.main()
    mux.main([])
    warm_pool.main()
    qemu_boot.main()
    sse_fanout.main()
