"""``make bench``: run every benchmark and print its figures; ``make bench BENCH=fleet``
(names separated by spaces: lifecycle vnc_proxy mux warm_pool qemu_boot fleet) runs only
those."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import fleet, lifecycle, mux, qemu_boot, sse_fanout, vnc_proxy, warm_pool

BENCHMARKS: dict[str, Callable[[], None]] = {
    "lifecycle": lifecycle.main,
    "vnc_proxy": vnc_proxy.main,
    "mux": lambda: mux.main([]),
    "warm_pool": warm_pool.main,
    "qemu_boot": qemu_boot.main,
    "fleet": fleet.main,
    "sse_fanout": sse_fanout.main,
}

if __name__ == "__main__":
    # Leading names choose benchmarks (``make bench BENCH=fleet``); what follows is left in
    # sys.argv for the benchmarks that parse it, as before (``BENCH_ARGS``).
    args = sys.argv[1:]
    chosen = []
    while args and args[0] in BENCHMARKS:
        chosen.append(args.pop(0))
    sys.argv = [sys.argv[0], *args]
    for name in chosen or list(BENCHMARKS):
        BENCHMARKS[name]()
