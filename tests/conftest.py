"""Fixtures every test may use; sub-folders add their own in their own ``conftest.py``.

- ``_no_orphan_tasks`` (autouse): an async test that leaves asyncio tasks running fails.
- ``db_url``: a fresh, empty database, once on SQLite and once on PostgreSQL.
- ``settings_factory``: ``Settings`` that read neither ``.env`` nor the developer's
  ``AIRLOCK_*`` environment, with the data dir in the test's ``tmp_path``.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, Literal, TypeVar

import asyncpg
import pytest
import pytest_asyncio
from pydantic import AliasChoices
from sqlalchemy.engine import URL, make_url

from airlock.settings import Settings

T = TypeVar("T")
LoopScope = Literal["function", "class", "module", "package", "session"]

POSTGRES_URL_VAR = "AIRLOCK_TEST_POSTGRES_URL"


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


# --- no orphan tasks (style.md, habit 6) ------------------------------------------------------
# The check runs inside the test's own event loop, so there is one guard per loop scope;
# the autouse fixture picks the one the test runs in.


def _task_guard(loop_scope: LoopScope) -> Any:
    @pytest_asyncio.fixture(loop_scope=loop_scope, name=f"_no_orphan_tasks_{loop_scope}")
    async def guard() -> AsyncIterator[None]:
        before = asyncio.all_tasks() - {asyncio.current_task()}
        yield
        # A few loop turns, so tasks that were cancelled just now can finish.
        for _ in range(3):
            await asyncio.sleep(0)
        left = asyncio.all_tasks() - {asyncio.current_task()} - before
        if left:
            for task in left:
                task.cancel()
            await asyncio.wait(left, timeout=5)  # so they do not leak into the next test
            names = "\n".join(f"  {task.get_name()}: {task.get_coro()!r}" for task in left)
            pytest.fail(
                f"the test left {len(left)} asyncio task(s) running (cancelled now):\n{names}",
                pytrace=False,
            )

    return guard


_no_orphan_tasks_function = _task_guard("function")
_no_orphan_tasks_class = _task_guard("class")
_no_orphan_tasks_module = _task_guard("module")
_no_orphan_tasks_package = _task_guard("package")
_no_orphan_tasks_session = _task_guard("session")


@pytest.fixture(autouse=True)
def _no_orphan_tasks(request: pytest.FixtureRequest) -> None:
    """Fail an async test that leaves asyncio tasks running (set up first, checked last)."""
    if not pytest_asyncio.is_async_test(request.node):
        return
    marker = request.node.get_closest_marker("asyncio")
    scope = marker and (marker.kwargs.get("loop_scope") or marker.kwargs.get("scope"))
    if not scope:
        try:
            scope = request.config.getini("asyncio_default_test_loop_scope") or "function"
        except ValueError:  # a pytest-asyncio without that option
            scope = "function"
    request.getfixturevalue(f"_no_orphan_tasks_{scope}")


# --- databases --------------------------------------------------------------------------------


def _run_in_thread(make: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine to completion on a loop of its own, whatever loop the caller is in."""
    result: list[T] = []
    error: list[BaseException] = []

    def target() -> None:
        async def main() -> T:
            return await make()

        try:
            result.append(asyncio.run(main()))
        except BaseException as exc:
            error.append(exc)

    thread = threading.Thread(target=target, name="db_url-admin")
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


async def _admin(server: URL, sql: str) -> None:
    conn = await asyncpg.connect(
        host=server.host,
        port=server.port,
        user=server.username,
        password=server.password,
        database=server.database,
        timeout=10,
    )
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture
def postgres_server_url() -> URL:
    """``AIRLOCK_TEST_POSTGRES_URL`` parsed; skips the test without it, fails it in CI."""
    raw = os.environ.get(POSTGRES_URL_VAR)
    if not raw:
        reason = f"{POSTGRES_URL_VAR} is not set (`make test` starts a server and sets it)"
        if in_ci():
            pytest.fail(f"{reason}; CI must not skip the PostgreSQL tests", pytrace=False)
        pytest.skip(reason)
    return make_url(raw)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A SQLAlchemy async URL of a fresh, empty database (no tables: run the migrations).

    ``sqlite``: a file in ``tmp_path``. ``postgres``: a database of its own, created on the
    server ``AIRLOCK_TEST_POSTGRES_URL`` names and dropped (forcibly) after the test.
    """
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'airlock.db'}"
        return
    server: URL = request.getfixturevalue("postgres_server_url")
    name = f"t_{secrets.token_hex(6)}"
    try:
        _run_in_thread(lambda: _admin(server, f'CREATE DATABASE "{name}"'))
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        pytest.fail(f"cannot create a database on {server!r}: {exc!r}", pytrace=False)
    try:
        yield server.set(drivername="postgresql+asyncpg", database=name).render_as_string(
            hide_password=False
        )
    finally:
        _run_in_thread(lambda: _admin(server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


# --- settings ---------------------------------------------------------------------------------


def _setting_env_names() -> set[str]:
    """Upper-cased names of every environment variable ``Settings`` reads."""
    names = set()
    for field_name, field in Settings.model_fields.items():
        names.add(f"AIRLOCK_{field_name}".upper())
        alias = field.validation_alias
        choices = alias.choices if isinstance(alias, AliasChoices) else [alias]
        names.update(c.upper() for c in choices if isinstance(c, str))
    return names


@pytest.fixture
def settings_factory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., Settings]:
    """``settings_factory(**overrides) -> Settings`` with ``data_dir=tmp_path / "data"``.

    Neither a ``.env`` file nor the developer's ``AIRLOCK_*`` variables reach it; a test that
    wants to exercise the environment sets variables with ``monkeypatch`` itself.
    """
    names = _setting_env_names()
    for name in list(os.environ):
        if name.upper() in names:  # pydantic-settings matches names case-insensitively
            monkeypatch.delenv(name)

    def make(**overrides: Any) -> Settings:
        overrides.setdefault("data_dir", tmp_path / "data")
        return Settings(_env_file=None, **overrides)

    return make
