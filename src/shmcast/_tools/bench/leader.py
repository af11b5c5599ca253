"""The leader: one process per implementation that runs its cases one after another.

Started by the harness (``runner.py``) as ``python -m shmcast._tools.bench.leader CMD_FD EVENT_FD
CONFIG_JSON`` in a new session, so that the harness can kill it together with everything it
started (the forkserver, reader processes, helper threads' processes) with one ``killpg``.

It imports the implementation once (its own import, then the forkserver's preload), reports
``{"event": "ready"}`` (or ``"unavailable"`` when an import fails), then reads one JSON command
per line from CMD_FD -- ``{"cmd": "case", "case": {...}}`` or ``{"cmd": "exit"}`` -- and writes
one JSON event per line to EVENT_FD: progress (``"phase"``) and one ``"result"`` per case.
Its stdout and stderr go to a log file chosen by the harness (libraries log there).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import multiprocessing
import os
import sys
import traceback
from typing import Any

from . import adapters
from .case import run_case
from .workloads import CaseSpec


def _versions(names: tuple[str, ...]) -> dict[str, str]:
    from importlib import metadata

    found = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "?"
    return found


def main(argv: list[str]) -> int:
    from .remote_adapters import enter_case_netns

    enter_case_netns("writer")  # remote cases across namespaces: before any socket exists
    cmd_fd, event_fd, config = int(argv[1]), int(argv[2]), json.loads(argv[3])
    events = os.fdopen(event_fd, "w", buffering=1)
    commands = os.fdopen(cmd_fd, "r")

    def emit(event: dict[str, Any]) -> None:
        events.write(json.dumps(event) + "\n")
        events.flush()

    try:
        adapter_cls = adapters.resolve(config["impl"])
        # numpy for every implementation where it is installed, so that no reader imports it
        # on its first array inside the timed window (vLLM's readers have it through torch).
        common = ("numpy",) if importlib.util.find_spec("numpy") is not None else ()
        preload = (*adapter_cls.preload, *common)
        for module in (*adapter_cls.requires, *preload):
            importlib.import_module(module)
    except Exception as exc:
        emit({"event": "unavailable", "reason": f"{type(exc).__name__}: {exc}"})
        return 0
    method = config.get("start_method", "forkserver")
    os.environ["SHMCAST_BENCH_START_METHOD"] = method
    ctx = multiprocessing.get_context(method)
    if method == "forkserver":
        ctx.set_forkserver_preload([*preload, adapter_cls.__module__, "shmcast._tools.bench.case"])
        from multiprocessing import forkserver

        forkserver.ensure_running()
    options = config.get("options", {})
    try:
        description = adapter_cls(**options).describe()
    except Exception as exc:
        description = {"describe_error": repr(exc)}
    emit(
        {
            "event": "ready",
            "versions": _versions(adapter_cls.distributions),
            "config": description,
        }
    )
    for line in commands:
        command = json.loads(line)
        if command.get("cmd") != "case":
            break
        spec = CaseSpec.from_dict(command["case"])
        try:
            result = run_case(adapter_cls, options, spec, ctx, emit)
        except BaseException:
            result = {
                "status": "error",
                "detail": traceback.format_exc(),
                "verification": {},
                "metrics": {},
            }
        emit({"event": "result", "result": result})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
