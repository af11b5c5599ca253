"""Switching a vLLM installation to shmcast's ``MessageQueue``: :func:`install` and the plugin.

vLLM loads the entry points of the group ``vllm.general_plugins`` in every process it starts
(the API server, the engine core, each worker), through ``vllm.plugins.load_general_plugins``.
shmcast's entry point, :func:`plugin`, calls :func:`install` there, which replaces vLLM's class
in the module that defines it and in every module that had already imported it, so that the
executor, the workers and the parallel-state groups all build shmcast's queues.

It refuses, and leaves vLLM exactly as it was, when vLLM's version is not one it was checked
against or when vLLM's class does not have the constructor and methods it replaces.

Turning it off: ``SHMCAST_VLLM=0`` (shmcast's switch), or vLLM's own ``VLLM_PLUGINS``, a
comma-separated allow-list of plugin names (the plugin's name is ``shmcast``).
"""

from __future__ import annotations

import importlib
import inspect
import logging
import os
import sys
from typing import Any

from ._vllm_queue import Handle, MessageQueue

SHM_BROADCAST = "vllm.distributed.device_communicators.shm_broadcast"
#: vLLM releases whose MessageQueue this drop-in was checked against (their own tests, run
#: against it: docs/vllm.md).
KNOWN_VERSIONS = ("0.33.0",)
#: The switch: 0, false, no or off leaves vLLM alone.
ENV_SWITCH = "SHMCAST_VLLM"
#: The constructor parameters of the class replaced, in order.
EXPECTED_PARAMETERS = (
    "self", "n_reader", "n_local_reader", "local_reader_ranks", "max_chunk_bytes",
    "max_chunks", "connect_ip", "enable_shm_tensor_arena",
)  # fmt: skip
EXPECTED_METHODS = (
    "export_handle", "create_from_handle", "wait_until_ready", "enqueue", "dequeue",
    "acquire_write", "acquire_read", "broadcast_object", "shutdown",
    "create_from_process_group", "create_from_process_group_single_reader",
)  # fmt: skip

# Under vLLM's logger, so that the line shows in vLLM's own log output.
log = logging.getLogger("vllm.shmcast")


class VllmVersionError(RuntimeError):
    """The installed vLLM's ``MessageQueue`` is not one this drop-in knows; nothing was
    changed."""


#: What install() replaced: (module, attribute, vLLM's object), to undo it.
_replaced: list[tuple[Any, str, Any]] = []


def _vllm_version() -> str | None:
    from importlib import metadata

    try:
        return metadata.version("vllm")
    except metadata.PackageNotFoundError:
        return None


def check_vllm(cls: Any, version: str | None, allow_unknown_version: bool = False) -> None:
    """VllmVersionError unless ``cls`` (vLLM's MessageQueue, of vLLM ``version``) is what
    :func:`install` knows how to replace."""
    if version is None:
        raise VllmVersionError("vLLM is not installed (no distribution named 'vllm')")
    base = version.split("+")[0]
    if base not in KNOWN_VERSIONS and not allow_unknown_version:
        raise VllmVersionError(
            f"vLLM {version} is not a version shmcast's MessageQueue was checked against "
            f"({', '.join(KNOWN_VERSIONS)}); install(allow_unknown_version=True) tries anyway "
            "if its MessageQueue has the same API"
        )
    try:
        params = tuple(inspect.signature(cls.__init__).parameters)
    except (TypeError, ValueError):
        params = ()
    if params != EXPECTED_PARAMETERS:
        raise VllmVersionError(
            f"vLLM {version}'s MessageQueue takes {params[1:]}, not the {EXPECTED_PARAMETERS[1:]}"
            " shmcast's drop-in implements"
        )
    missing = [name for name in EXPECTED_METHODS if not callable(getattr(cls, name, None))]
    if missing:
        raise VllmVersionError(f"vLLM {version}'s MessageQueue has no {', '.join(missing)}")


def installed() -> bool:
    """True when vLLM's ``shm_broadcast.MessageQueue`` is shmcast's in this process."""
    module = sys.modules.get(SHM_BROADCAST)
    return module is not None and getattr(module, "MessageQueue", None) is MessageQueue


def install(allow_unknown_version: bool = False) -> int:
    """Make vLLM use shmcast's MessageQueue in this process; return how many modules now
    refer to it (0 if it was already installed).

    Imports vLLM's ``shm_broadcast`` module (and with it torch), checks vLLM's version and
    class (VllmVersionError otherwise, vLLM untouched), then replaces ``MessageQueue`` and
    ``Handle`` in that module and in every loaded module that had imported vLLM's, and logs
    one line.  Call it before the program creates its queues (a queue created earlier stays
    vLLM's).  Idempotent; :func:`uninstall` undoes it.
    """
    if installed():
        return 0
    version = _vllm_version()
    if version is None:
        raise VllmVersionError("vLLM is not installed (no distribution named 'vllm')")
    module = importlib.import_module(SHM_BROADCAST)
    original, original_handle = module.MessageQueue, getattr(module, "Handle", None)
    check_vllm(original, version, allow_unknown_version)
    targets = [(module.__name__, module)] + [
        (name, m) for name, m in list(sys.modules.items())
        if m is not None and m is not module and _refers_to(m, original, original_handle)
    ]  # fmt: skip
    for _name, m in targets:
        for attr, old, new in (("MessageQueue", original, MessageQueue),
                               ("Handle", original_handle, Handle)):  # fmt: skip
            if old is not None and m.__dict__.get(attr) is old:
                setattr(m, attr, new)
                _replaced.append((m, attr, old))
    log.info(
        "shmcast: vLLM %s uses shmcast's MessageQueue in this process (pid %d; replaced in %s)",
        version, os.getpid(), ", ".join(name for name, _ in targets),
    )  # fmt: skip
    return len(targets)


def _refers_to(module: Any, cls: Any, handle: Any) -> bool:
    try:
        names = module.__dict__
    except AttributeError:
        return False
    return names.get("MessageQueue") is cls or (
        handle is not None and names.get("Handle") is handle
    )


def uninstall() -> None:
    """Put vLLM's own classes back where :func:`install` replaced them (idempotent)."""
    while _replaced:
        module, attr, old = _replaced.pop()
        setattr(module, attr, old)


def plugin() -> None:
    """The ``vllm.general_plugins`` entry point (name ``shmcast``): :func:`install`, unless
    ``SHMCAST_VLLM`` turns it off.  Never raises into vLLM: a version it does not know is
    logged and left alone."""
    if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
        log.info("shmcast: %s=0, vLLM keeps its own MessageQueue", ENV_SWITCH)
        return
    try:
        install()
    except VllmVersionError as exc:
        log.warning("shmcast: not installed, vLLM keeps its own MessageQueue: %s", exc)
