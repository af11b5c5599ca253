"""The vLLM plugin and shmcast.compat.vllm.install(): which modules switch, when it refuses,
how it is turned off.

Most of it runs against a stand-in for vLLM's module (so it runs everywhere); the tests marked
``real vLLM`` load vLLM's own plugin machinery in a child interpreter and skip where vLLM is not
installed (``make test-vllm`` has it).
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import subprocess
import sys
import types
from collections.abc import Iterator
from typing import Any

import pytest

from shmcast.compat import _vllm_plugin as plugin_module
from shmcast.compat.vllm import (
    Handle,
    MessageQueue,
    VllmVersionError,
    install,
    installed,
    plugin,
    uninstall,
)

SHM_BROADCAST = plugin_module.SHM_BROADCAST


class FakeQueue:
    """Has vLLM 0.33.0's constructor and methods (bodies irrelevant: never called)."""

    def __init__(self, n_reader, n_local_reader, local_reader_ranks=None,
                 max_chunk_bytes=0, max_chunks=0, connect_ip=None,
                 enable_shm_tensor_arena=False) -> None:  # fmt: skip
        raise AssertionError("the stand-in is never constructed")


for _name in plugin_module.EXPECTED_METHODS:
    setattr(FakeQueue, _name, lambda *a, **k: None)


class FakeHandle:
    pass


@pytest.fixture
def fake_vllm(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, types.ModuleType]]:
    """A stand-in ``shm_broadcast`` module, and two modules that imported its classes, in
    ``sys.modules``; vLLM's version reads as 0.33.0.  Everything is put back afterwards."""
    defining = types.ModuleType(SHM_BROADCAST)
    defining.MessageQueue = FakeQueue  # type: ignore[attr-defined]
    defining.Handle = FakeHandle  # type: ignore[attr-defined]
    executor = types.ModuleType("fake_vllm_executor")
    executor.MessageQueue = FakeQueue  # type: ignore[attr-defined]
    executor.Handle = FakeHandle  # type: ignore[attr-defined]
    unrelated = types.ModuleType("fake_unrelated")
    unrelated.MessageQueue = object  # type: ignore[attr-defined]
    modules = {SHM_BROADCAST: defining, "fake_vllm_executor": executor, "fake_unrelated": unrelated}
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(plugin_module, "_vllm_version", lambda: "0.33.0")
    try:
        yield modules
    finally:
        uninstall()


def test_the_entry_point_is_registered() -> None:
    points = importlib.metadata.entry_points(group="vllm.general_plugins")
    ours = [p for p in points if p.name == "shmcast"]
    assert len(ours) == 1 and ours[0].value == "shmcast.compat.vllm:plugin"
    assert ours[0].load() is plugin


def test_install_replaces_the_class_everywhere_it_was_imported(
    fake_vllm: dict[str, types.ModuleType], caplog: pytest.LogCaptureFixture
) -> None:
    assert not installed()
    with caplog.at_level(logging.INFO, logger="vllm.shmcast"):
        assert install() == 2
    for name in (SHM_BROADCAST, "fake_vllm_executor"):
        assert fake_vllm[name].MessageQueue is MessageQueue
        assert fake_vllm[name].Handle is Handle
    assert fake_vllm["fake_unrelated"].MessageQueue is object
    assert installed()
    lines = [r.getMessage() for r in caplog.records if r.name == "vllm.shmcast"]
    assert len(lines) == 1 and "fake_vllm_executor" in lines[0] and "0.33.0" in lines[0]
    assert install() == 0  # idempotent
    uninstall()
    assert fake_vllm[SHM_BROADCAST].MessageQueue is FakeQueue
    assert fake_vllm["fake_vllm_executor"].Handle is FakeHandle
    assert not installed()


def test_an_unknown_version_is_refused_and_nothing_changes(
    fake_vllm: dict[str, types.ModuleType], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(plugin_module, "_vllm_version", lambda: "0.34.0")
    with pytest.raises(VllmVersionError, match=r"0\.34\.0 is not a version"):
        install()
    assert fake_vllm[SHM_BROADCAST].MessageQueue is FakeQueue
    assert install(allow_unknown_version=True) == 2  # same API: it may try
    assert fake_vllm[SHM_BROADCAST].MessageQueue is MessageQueue


def test_another_signature_is_refused_even_when_asked_to_try(
    fake_vllm: dict[str, types.ModuleType],
) -> None:
    class Other(FakeQueue):
        def __init__(self, n_reader, n_local_reader, max_chunk_bytes=0) -> None:
            pass

    fake_vllm[SHM_BROADCAST].MessageQueue = Other  # type: ignore[attr-defined]
    with pytest.raises(VllmVersionError, match="takes"):
        install(allow_unknown_version=True)
    assert fake_vllm[SHM_BROADCAST].MessageQueue is Other


def test_a_missing_method_is_refused(fake_vllm: dict[str, types.ModuleType]) -> None:
    class Partial(FakeQueue):
        acquire_read = None

    fake_vllm[SHM_BROADCAST].MessageQueue = Partial  # type: ignore[attr-defined]
    with pytest.raises(VllmVersionError, match="acquire_read"):
        install()


def test_install_without_vllm_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(plugin_module, "_vllm_version", lambda: None)
    with pytest.raises(VllmVersionError, match="not installed"):
        install()


@pytest.mark.parametrize("value", ["0", "off", "False"])
def test_the_plugin_is_turned_off_by_shmcast_vllm(
    fake_vllm: dict[str, types.ModuleType], monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("SHMCAST_VLLM", value)
    plugin()
    assert fake_vllm[SHM_BROADCAST].MessageQueue is FakeQueue


def test_the_plugin_never_raises_into_vllm(
    fake_vllm: dict[str, types.ModuleType],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.delenv("SHMCAST_VLLM", raising=False)
    monkeypatch.setattr(plugin_module, "_vllm_version", lambda: "9.9.9")
    with caplog.at_level(logging.WARNING, logger="vllm.shmcast"):
        plugin()
    assert fake_vllm[SHM_BROADCAST].MessageQueue is FakeQueue
    assert any("keeps its own MessageQueue" in r.getMessage() for r in caplog.records)
    monkeypatch.setattr(plugin_module, "_vllm_version", lambda: "0.33.0")
    plugin()
    assert fake_vllm[SHM_BROADCAST].MessageQueue is MessageQueue


# -- real vLLM ------------------------------------------------------------------------------------

CHILD = """
import sys, types
from vllm.distributed.device_communicators import shm_broadcast
early = types.ModuleType("early")  # a module that took vLLM's class before the plugins ran
early.MessageQueue = shm_broadcast.MessageQueue
sys.modules["early"] = early
from vllm.plugins import load_general_plugins
load_general_plugins()
print(shm_broadcast.MessageQueue.__module__, early.MessageQueue.__module__)
"""


def run_vllm_plugins(**env: str) -> list[str]:
    pytest.importorskip("vllm", reason="vLLM is not installed here (make test-vllm has it)")
    environ = {k: v for k, v in os.environ.items() if k not in ("VLLM_PLUGINS", "SHMCAST_VLLM")}
    environ.update(env)
    done = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True,
                          env=environ, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.split()


def test_real_vllm_loads_the_plugin() -> None:
    owners = run_vllm_plugins(VLLM_PLUGINS="shmcast")
    assert owners == ["shmcast.compat._vllm_queue"] * 2


@pytest.mark.parametrize("env", [{"VLLM_PLUGINS": "some_other_plugin"}, {"SHMCAST_VLLM": "0"}])
def test_real_vllm_without_the_plugin(env: dict[str, str]) -> None:
    environ: dict[str, Any] = {"VLLM_PLUGINS": "shmcast", **env}
    owners = run_vllm_plugins(**environ)
    assert owners == [SHM_BROADCAST] * 2


def test_real_vllm_class_is_the_one_the_drop_in_knows() -> None:
    pytest.importorskip("vllm", reason="vLLM is not installed here (make test-vllm has it)")
    from vllm.distributed.device_communicators import shm_broadcast

    original = shm_broadcast.MessageQueue
    if original is MessageQueue:
        pytest.skip("the plugin is already active in this process")
    plugin_module.check_vllm(original, plugin_module._vllm_version())
