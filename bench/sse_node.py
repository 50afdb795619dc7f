"""One controller process for ``bench.sse_fanout``: the real app, API and loops, configured
from ``AIRLOCK_*`` like ``airlock serve``, with a runtime that runs no VM (the benchmark's
sessions are rows; what it measures is the controller's events, not VMs).

    python -m bench.sse_node PORT
"""

from __future__ import annotations

import sys

import uvicorn
from tests.api.conftest import NoVmRuntime

from airlock.api.app import create_app
from airlock.api.vnc_proxy import SERVER_OPTIONS
from airlock.logs import setup_logging
from airlock.providers.oauth2 import demo_oauth2_provider
from airlock.services.core import Core
from airlock.settings import Settings


def main(port: int) -> None:
    settings = Settings(port=port)
    setup_logging("WARNING")
    provider = demo_oauth2_provider(settings.demo_idp_port)
    core = Core(settings, runtime=NoVmRuntime(), providers={provider.id: provider})
    uvicorn.run(
        create_app(core=core),
        host="127.0.0.1",
        port=port,
        log_config=None,
        access_log=False,
        backlog=4096,
        **SERVER_OPTIONS,
    )


if __name__ == "__main__":
    main(int(sys.argv[1]))
