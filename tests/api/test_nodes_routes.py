"""``GET /api/nodes`` (service tokens only) and the internal link's destroy, attacked from
the other side: a user's token, a viewer-style junk value, a forged node credential, one
for another VM or purpose, one from an unregistered node are all refused with 401 and
change nothing; a real node credential destroys the VM."""

from __future__ import annotations

import base64
import hashlib
import hmac

from airlock.domain.vms import VmState
from airlock.services.node_link import NodeCredentials
from tests.api.conftest import Api, ApiFactory


async def test_nodes_list_is_for_service_tokens(api: Api) -> None:
    r = await api.client.get("/api/nodes", headers=api.auth("service"))
    assert r.status_code == 200, r.text
    (node,) = r.json()
    assert node["name"] == api.core.settings.node_name
    assert node["state"] == "active" and node["ready"] is True
    assert node["browserCapacity"] == api.core.settings.max_concurrent_vms
    assert node["internalURL"] == api.core.settings.internal_url
    r = await api.client.get("/api/nodes", headers=api.auth("alice"))
    assert r.status_code == 403 and r.json()["error"]["code"] == "service_only"
    r = await api.client.get("/api/nodes")
    assert r.status_code == 401


def _forged(node: str, purpose: str, expiry: int) -> str:
    mac = hmac.new(b"\x00" * 32, f"node-link:{node}:{purpose}:{expiry}".encode(), hashlib.sha256)
    return f"{node}.{expiry}.{base64.urlsafe_b64encode(mac.digest()).rstrip(b'=').decode()}"


async def test_internal_destroy_refuses_everything_but_a_node_credential(api: Api) -> None:
    vm = await api.add_vm("alice")
    path = f"/internal/vms/{vm.id}/destroy"
    body = {"reason": "owner_delete", "actor": "node:x"}
    creds = api.core.node_credentials
    node = api.core.settings.node_name
    refused = [
        {},
        api.auth("alice"),
        api.auth("service"),
        {"Authorization": "Bearer junk"},
        {"Authorization": f"Bearer {_forged(node, f'destroy:{vm.id}', 99_999_999_999_999)}"},
        {"Authorization": f"Bearer {creds.mint(f'vnc:{vm.id}')}"},  # another purpose
        {"Authorization": f"Bearer {creds.mint('destroy:vm-other')}"},  # another VM
    ]
    for headers in refused:
        r = await api.client.post(path, json=body, headers=headers)
        assert r.status_code == 401, (headers, r.text)
        assert r.json()["error"]["code"] == "invalid_node_credential"
    # A genuine credential of a node that never registered: refused too.
    stranger = NodeCredentials(api.core.vault, "node-stranger", api.core.clock)  # type: ignore[arg-type]
    r = await api.client.post(
        path,
        json=body,
        headers={"Authorization": f"Bearer {stranger.mint(f'destroy:{vm.id}')}"},
    )
    assert r.status_code == 401 and "not registered" in r.json()["error"]["message"]
    assert (await api.core.vms.get(vm.id, None)).state == VmState.RUNNING.value
    assert api.runtime.destroyed == []

    r = await api.client.post(
        path, json=body, headers={"Authorization": f"Bearer {creds.mint(f'destroy:{vm.id}')}"}
    )
    assert r.status_code == 200, r.text
    assert r.json() == {"vmId": vm.id, "destroyed": True}
    assert (await api.core.vms.get(vm.id, None)).state == VmState.DESTROYED.value


async def test_internal_destroy_of_junk_is_a_clear_4xx(api: Api) -> None:
    vm = await api.add_vm("alice")
    token = api.core.node_credentials.mint(f"destroy:{vm.id}")
    headers = {"Authorization": f"Bearer {token}"}
    r = await api.client.post(
        f"/internal/vms/{vm.id}/destroy", json={"reason": "because", "actor": "x"}, headers=headers
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "bad_request"
    r = await api.client.post(f"/internal/vms/{vm.id}/destroy", json=[1], headers=headers)
    assert r.status_code == 422
    junk_id = {"reason": "completed", "actor": "x"}
    r = await api.client.post("/internal/vms/not-a-vm/destroy", json=junk_id, headers=headers)
    assert r.status_code in (400, 401)
    assert (await api.core.vms.get(vm.id, None)).state == VmState.RUNNING.value


async def test_peers_with_node_credentials_are_not_rate_limited_forgers_are(
    make_api: ApiFactory,
) -> None:
    api = await make_api(client_requests_per_minute=3)
    creds = api.core.node_credentials
    for _ in range(5):  # more than the limit, each with a valid node credential
        vm = await api.add_vm("alice")
        token = creds.mint(f"destroy:{vm.id}")
        r = await api.client.post(
            f"/internal/vms/{vm.id}/destroy",
            json={"reason": "owner_delete", "actor": "node:peer"},
            headers={"Authorization": f"Bearer {token}"},
        )
        assert r.status_code == 200, r.text
    assert (await api.client.get("/healthz")).status_code == 200  # the bucket is still full
    for _ in range(3):  # forged credentials: each refusal is charged
        r = await api.client.post(
            "/internal/boots", headers={"Authorization": "Bearer node-x.1.forged"}
        )
        assert r.status_code == 401
    assert (await api.client.get("/healthz")).status_code == 429
