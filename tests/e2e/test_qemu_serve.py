"""A CLI VM on the qemu runtime, the way a new user meets it (issue 10): ``airlock serve``
with ``AIRLOCK_RUNTIME=qemu`` after the images are built, then ``POST /api/vms`` and
``DELETE``, with the default CLI flavor. It once answered 503 after a boot timeout every
time, while the guest's multiplexer spun."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from airlock.runtimes.qemu import QemuRuntime
from tests.e2e.conftest import Server
from tests.qemu_image import cli_image, image_dir

pytestmark = [pytest.mark.qemu, pytest.mark.timeout(900)]


async def test_a_cli_vm_boots_and_goes_through_the_api(server_factory: Any) -> None:
    cli_image()  # the default CLI flavor; make test builds it before pytest
    server: Server = server_factory(runtime="qemu", image_dir=str(image_dir()))
    server.start()
    vms_dir = server.data_dir / "vms"
    try:
        token = server.cli("tokens", "create", "--user", "alice")
        headers = {"Authorization": f"Bearer {token}"}
        async with httpx.AsyncClient(base_url=server.url, headers=headers, timeout=120) as api:
            created = await api.post("/api/vms", json={"role": "cli"})
            assert created.status_code == 201, created.text
            vm = created.json()
            assert (vm["role"], vm["runtime"], vm["state"]) == ("cli", "qemu", "running")
            found = await QemuRuntime(vms_dir, image_dir()).list()
            assert [v.vm_id for v in found] == [vm["vmId"]]
            meta = json.loads((found[0].state_dir / "meta.json").read_text())
            assert Path(meta["image"]).name.startswith("cli-")  # the vendor CLIs' image

            gone = await api.delete(f"/api/vms/{vm['vmId']}")
            assert gone.status_code == 200, gone.text
            tombstone = (await api.get(f"/api/vms/{vm['vmId']}")).json()
            assert tombstone["state"] == "destroyed", tombstone
            assert await QemuRuntime(vms_dir, image_dir()).list() == []
    finally:
        server.stop()
        runtime = QemuRuntime(vms_dir, image_dir())
        for left in await runtime.list():
            await runtime.destroy(left.vm_id)
