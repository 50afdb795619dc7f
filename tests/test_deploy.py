"""``deploy/``: each file parses with a real parser of its format, every ``AIRLOCK_*`` setting
it names exists in ``settings.py``, and every ``airlock`` command it runs exists in the CLI
and accepts its arguments. Kubernetes (YAML, PyYAML), Nomad (HCL, python-hcl2), systemd (a
strict unit parser here, and ``systemd-analyze verify`` where systemd is installed)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import hcl2
import pytest
import typer.core
import typer.main
import yaml

from airlock.api.routes import ops
from airlock.cli import app as cli_app
from tests.conftest import _setting_env_names

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
UNIT = DEPLOY / "systemd" / "airlock.service"
NOMAD = DEPLOY / "nomad" / "airlock.nomad.hcl"
KUBERNETES = DEPLOY / "kubernetes"
SETTING = re.compile(r"\bAIRLOCK_[A-Z0-9_]+\b")
# What a cluster node must be told (README, "Deploying"): each deploy file sets all of them.
CLUSTER_SETTINGS = {
    "AIRLOCK_NODE_NAME",
    "AIRLOCK_PUBLIC_URL",
    "AIRLOCK_DATABASE_URL",
    "AIRLOCK_SECRET_KEY_FILE",
    "AIRLOCK_DATA_DIR",
}


def deploy_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.is_file())


def test_deploy_holds_the_three_kinds() -> None:
    assert UNIT.is_file() and NOMAD.is_file()
    assert {p.name for p in KUBERNETES.glob("*.yaml")} >= {
        "daemonset.yaml",
        "service.yaml",
        "secret.example.yaml",
    }


@pytest.mark.parametrize("path", deploy_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_setting_named_exists(path: Path) -> None:
    """Comments included: a setting the README or a comment tells an operator to set must
    exist too."""
    known = _setting_env_names()
    named = set(SETTING.findall(path.read_text()))
    unknown = sorted(named - known)
    assert not unknown, f"{path.name} names settings that settings.py does not have: {unknown}"


# --- the CLI ---------------------------------------------------------------------------------


def check_command(argv: list[str], where: str) -> None:
    """``argv`` (after the program) names an ``airlock`` command and its options parse.
    (Typer carries its own copy of click, so groups are told by their type there.)"""
    command: Any = typer.main.get_command(cli_app)
    rest = list(argv)
    while isinstance(command, typer.core.TyperGroup) and rest and not rest[0].startswith("-"):
        sub = command.get_command(
            command.make_context("airlock", [], resilient_parsing=True), rest[0]
        )
        assert sub is not None, f"{where}: airlock has no command {rest[0]!r} ({argv})"
        command, rest = sub, rest[1:]
    assert not isinstance(command, typer.core.TyperGroup), f"{where}: {argv} is not a command"
    try:
        command.make_context("airlock", rest)
    except Exception as exc:  # typer's click: UsageError, NoSuchOption, ...
        raise AssertionError(f"{where}: airlock {' '.join(argv)}: {exc}") from None


def airlock_argv(program: str, args: list[str], where: str) -> list[str]:
    assert Path(program).name == "airlock", f"{where}: runs {program}, not airlock"
    return args


def test_check_command_refuses_what_the_cli_does_not_have() -> None:
    check_command(["serve"], "self-test")
    check_command(["doctor", "--json"], "self-test")
    for bad in (["serv"], ["serve", "--no-such-flag"], ["tokens"]):
        with pytest.raises(AssertionError):
            check_command(bad, "self-test")


# --- systemd ---------------------------------------------------------------------------------

UNIT_KEYS = {
    "Unit": {"Description", "Documentation", "Wants", "After", "Requires", "Before"},
    "Service": {
        "Type",
        "User",
        "Group",
        "EnvironmentFile",
        "Environment",
        "StateDirectory",
        "StateDirectoryMode",
        "ExecStartPre",
        "ExecStart",
        "Restart",
        "RestartSec",
        "TimeoutStopSec",
        "KillMode",
        "Delegate",
        "LimitNOFILE",
        "TasksMax",
    },
    "Install": {"WantedBy"},
}


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """A systemd unit, strictly: sections and keys it knows, ``Key=value`` lines only (keys
    may repeat, as ``Environment=`` does), comments with ``#`` or ``;``."""
    unit: dict[str, dict[str, list[str]]] = {}
    section: str | None = None
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            assert section in UNIT_KEYS, f"line {number}: unknown section [{section}]"
            assert section not in unit, f"line {number}: [{section}] twice"
            unit[section] = {}
            continue
        assert section is not None, f"line {number}: a setting before any section"
        key, sep, value = line.partition("=")
        assert sep, f"line {number}: not Key=value: {raw!r}"
        assert not value.endswith("\\"), f"line {number}: no continuation lines here"
        key = key.strip()
        assert key in UNIT_KEYS[section], f"line {number}: unknown key {key} in [{section}]"
        unit[section].setdefault(key, []).append(value.strip())
    return unit


def test_the_parser_is_strict() -> None:
    for bad in ("Description=x", "[Unit]\nDescrption=x", "[Unit]\njunk", "[Units]\n"):
        with pytest.raises(AssertionError):
            parse_unit(bad)


def test_systemd_unit() -> None:
    unit = parse_unit(UNIT.read_text())
    service = unit["Service"]
    env = dict(e.split("=", 1) for e in service["Environment"])
    # The secret part (database URL, public URL) comes from the env file, 0600.
    assert service["EnvironmentFile"] == ["/etc/airlock/airlock.env"]
    header = UNIT.read_text().split("[Unit]")[0]
    assert "AIRLOCK_DATABASE_URL=" in header and "AIRLOCK_PUBLIC_URL=" in header
    assert CLUSTER_SETTINGS - {"AIRLOCK_DATABASE_URL", "AIRLOCK_PUBLIC_URL"} <= set(env)
    assert env["AIRLOCK_NODE_NAME"] == "%H"  # the host's name
    for key in ("ExecStartPre", "ExecStart"):
        for line in service[key]:
            program, *args = line.split()
            check_command(airlock_argv(program, args, key), f"{UNIT.name} {key}")
    assert service["ExecStart"][0].split()[1:] == ["serve"]
    # VMs outlive a controller restart: only the controller is stopped.
    assert service["KillMode"] == ["process"] and service["User"] == ["root"]
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd is not installed")
def test_systemd_analyze_verifies_the_unit(tmp_path: Path) -> None:
    """systemd's own parser: with the program pointed at this checkout's ``airlock`` (verify
    wants it to exist), it must not complain about anything."""
    airlock = Path(sys.executable).parent / "airlock"
    copy = tmp_path / "airlock.service"
    copy.write_text(UNIT.read_text().replace("/opt/airlock/.venv/bin/airlock", str(airlock)))
    result = subprocess.run(
        ["systemd-analyze", "verify", str(copy)], capture_output=True, text=True, timeout=60
    )
    complaints = [
        line for line in (result.stdout + result.stderr).splitlines() if copy.name in line
    ]
    assert result.returncode == 0 and not complaints, complaints


# --- Nomad -----------------------------------------------------------------------------------


def plain(value: Any) -> Any:
    """python-hcl2's tree without its bookkeeping: strings unquoted, blocks as dicts."""
    if isinstance(value, dict):
        return {
            plain(k): plain(v)
            for k, v in value.items()
            if k not in ("__is_block__", "__comments__")
        }
    if isinstance(value, list):
        return [plain(v) for v in value]
    if isinstance(value, str) and len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1]
    return value


def one(blocks: list[dict[str, Any]], label: str | None = None) -> dict[str, Any]:
    assert len(blocks) == 1, blocks
    block = blocks[0]
    if label is None:
        return block
    assert list(block) == [label], block
    inner: dict[str, Any] = block[label]
    return inner


def test_nomad_system_job() -> None:
    job = one(plain(hcl2.loads(NOMAD.read_text()))["job"], "airlock")
    assert job["type"] == "system"  # one controller on every client node
    assert one(job["update"])["max_parallel"] == 1
    group = one(job["group"], "controller")
    port = one(one(group["network"])["port"], "http")
    check = one(one(group["service"])["check"])
    assert check["path"] in {r.path for r in ops.router.routes}  # type: ignore[attr-defined]
    task = one(group["task"], "airlock")
    assert task["driver"] == "raw_exec"  # on the host: /dev/kvm, user namespaces, cgroups
    config = one(task["config"])
    check_command(airlock_argv(config["command"], config["args"], "config"), NOMAD.name)
    env = one(task["env"])
    assert CLUSTER_SETTINGS - {"AIRLOCK_DATABASE_URL"} <= set(env)
    assert env["AIRLOCK_PORT"] == "${NOMAD_PORT_http}" and port["static"] == 4000
    templates = {t["destination"]: t for t in task["template"]}
    # The database URL as environment, the key as a 0600 file, both from Nomad Variables.
    database = templates["secrets/database.env"]
    assert database["env"] is True and "AIRLOCK_DATABASE_URL=" in database["data"]
    key = templates["secrets/cluster.key"]
    assert key["perms"] == "0600" and "cluster_key" in key["data"]
    assert env["AIRLOCK_SECRET_KEY_FILE"] == "${NOMAD_SECRETS_DIR}/cluster.key"


# --- Kubernetes ------------------------------------------------------------------------------


def manifests() -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(KUBERNETES.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            assert isinstance(doc, dict) and {"apiVersion", "kind", "metadata"} <= set(doc), path
            found[doc["kind"]] = doc
    return found


def test_kubernetes_daemonset_service_and_secret() -> None:
    docs = manifests()
    assert {"Namespace", "Secret", "DaemonSet", "Service"} <= set(docs)
    namespace = docs["Namespace"]["metadata"]["name"]
    for kind in ("Secret", "DaemonSet", "Service"):
        assert docs[kind]["metadata"]["namespace"] == namespace, kind
    daemonset, service, secret = docs["DaemonSet"], docs["Service"], docs["Secret"]
    assert daemonset["apiVersion"] == "apps/v1"
    pod = daemonset["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert daemonset["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()

    spec = pod["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    routes = {r.path for r in ops.router.routes}  # type: ignore[attr-defined]
    for container in spec["initContainers"] + spec["containers"]:
        where = f"container {container['name']}"
        assert Path(container["command"][0]).name == "airlock", where
        check_command(container["command"][1:] + container["args"], where)
        security = container["securityContext"]
        assert security["privileged"] is True and security["runAsUser"] == 0, where
        env = {e["name"]: e for e in container["env"]}
        assert set(env) >= CLUSTER_SETTINGS, where
        assert env["AIRLOCK_NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
        # The database URL and the cluster key from the Secret.
        ref = env["AIRLOCK_DATABASE_URL"]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"]
        mounts = {m["name"]: m for m in container["volumeMounts"]}
        key_file = Path(env["AIRLOCK_SECRET_KEY_FILE"]["value"])
        key_volume = next(
            name for name, m in mounts.items() if Path(m["mountPath"]) == key_file.parent
        )
        source = volumes[key_volume]["secret"]
        assert source["secretName"] == secret["metadata"]["name"]
        item = next(i for i in source["items"] if i["path"] == key_file.name)
        assert item["key"] in secret["stringData"]
        assert source["defaultMode"] & 0o077 == 0  # the vault refuses a key others can read
        # VM state dirs on the node (adopted after a restart), the host's cgroups.
        data = Path(env["AIRLOCK_DATA_DIR"]["value"])
        assert any(Path(m["mountPath"]) == data for m in mounts.values()), where
        assert volumes[next(n for n, m in mounts.items() if m["mountPath"] == str(data))][
            "hostPath"
        ]["path"]
        assert mounts["cgroup"]["mountPath"] == "/sys/fs/cgroup"
        assert volumes["cgroup"]["hostPath"]["path"] == "/sys/fs/cgroup"

    (controller,) = spec["containers"]
    assert controller["args"] == ["serve"]
    assert {controller["readinessProbe"]["httpGet"]["path"]} <= routes
    assert {controller["livenessProbe"]["httpGet"]["path"]} <= routes
    (port,) = controller["ports"]
    env = {e["name"]: e.get("value") for e in controller["env"]}
    assert env["AIRLOCK_PORT"] == str(port["containerPort"])
    assert [p["targetPort"] for p in service["spec"]["ports"]] == [port["name"]]
