"""Running one case: the writer (in the leader process) and its reader processes.

Sequence (every step before "go" is excluded from timing):

1. the writer opens its channel (and, for the engine and executor workloads, prepares the
   reply path);
2. the readers start (from the forkserver, so nothing is imported per reader), open their ends
   and report "attached" on their control pipe (with a reply handle for the engine workload);
3. the writer connects the reply path, both sides run the implementation's collective start
   (``wait_ready``), the readers report "ready";
4. the writer sends "go" to every reader (the start barrier) and runs the workload; each reader
   runs its side, closes its ends and reports its result.

A reader that raises reports the traceback; one that dies is noticed through its process
sentinel.  This module enforces no time limit itself: the harness kills the whole process group
of a case that runs past its limit (see ``runner.py``).
"""

from __future__ import annotations

import contextlib
import ctypes
import traceback
from multiprocessing.connection import Connection, wait
from typing import Any

from .adapters import Adapter, ReplyCollector
from .remote_adapters import enter_case_netns
from .workloads import CREDITED, READERS, REPLYING, WRITERS, CaseSpec, Credits, summarize


class CaseFailed(Exception):
    """A reader failed or died; the message says which and why."""


def reader_main(
    adapter_cls: type[Adapter],
    options: dict[str, Any],
    handle: Any,
    forward: Any,
    index: int,
    spec_data: dict[str, Any],
    control: Connection,
    counters: Any = None,
) -> None:
    """Body of reader process ``index`` (a multiprocessing target).  ``counters``: the
    credit counters of a credited workload (``workloads.Credits``).  Never raises: a failure
    is reported on ``control`` as ``("error", traceback)``."""
    try:
        enter_case_netns("reader")  # remote cases across namespaces: the reader's side
        spec = CaseSpec.from_dict(spec_data)
        adapter = adapter_cls(**options)
        reader = adapter.open_reader(handle, index)
        sender = None
        if spec.workload in REPLYING:
            sender = adapter.reply_path().worker_open(forward, index)
        control.send(("attached", None if sender is None else sender.back_handle))
        reader.wait_ready(spec.time_limit)
        if sender is not None:
            sender.wait_ready(spec.time_limit)
        control.send(("ready", None))
        control.recv()  # the start barrier: "go"
        run = getattr(reader, "run_workload", None)  # a reader with a loop of its own
        if run is not None:
            result = run(spec, sender, index)
        else:
            result = READERS[spec.workload](spec, reader, sender, index, **_credits(spec, counters))
        reader.close()
        if sender is not None:
            sender.close()
        control.send(("result", result))
    except BaseException:
        with contextlib.suppress(Exception):
            control.send(("error", traceback.format_exc()))
    finally:
        with contextlib.suppress(Exception):
            control.close()


def _credits(spec: CaseSpec, counters: Any) -> dict[str, Any]:
    """The keyword arguments that give a credited workload's functions its credits."""
    if spec.workload not in CREDITED:
        return {}
    return {"credits": Credits(counters, int(spec.extra["window"]))}


def _collect(kind: str, controls: list[Connection], procs: list[Any]) -> list[Any]:
    """Wait for message ``kind`` from every reader; CaseFailed if one reports an error or
    dies first."""
    pending = dict(enumerate(controls))
    got: list[Any] = [None] * len(controls)
    sentinels = {p.sentinel: i for i, p in enumerate(procs)}
    while pending:
        ready = wait([*pending.values(), *(s for s, i in sentinels.items() if i in pending)])
        for obj in ready:
            if isinstance(obj, Connection):
                i = controls.index(obj)
                try:
                    what, data = obj.recv()
                except EOFError:
                    procs[i].join(1.0)
                    code = procs[i].exitcode
                    state = (
                        "closed its control pipe" if code is None else f"died (exit code {code})"
                    )
                    raise CaseFailed(f"reader {i} {state} before {kind!r}") from None
                if what == "error":
                    raise CaseFailed(f"reader {i} failed:\n{data}")
                if what != kind:
                    raise CaseFailed(f"reader {i} sent {what!r}, expected {kind!r}")
                got[i] = data
                del pending[i]
            else:
                i = sentinels[obj]
                if i in pending and not controls[i].poll():
                    code = procs[i].exitcode
                    raise CaseFailed(f"reader {i} died (exit code {code}) before {kind!r}")
    return got


def run_case(
    adapter_cls: type[Adapter], options: dict[str, Any], spec: CaseSpec, ctx: Any, emit: Any
) -> dict[str, Any]:
    """Run ``spec`` with the implementation ``adapter_cls``; return the case's summary
    (status, detail, verification, metrics).  ``emit(dict)`` reports progress events.
    Blocks for as long as the implementation does: the caller's time limit applies."""
    adapter = adapter_cls(**options)
    writer = adapter.open_writer(spec.readers, spec.max_message_bytes())
    collector: ReplyCollector | None = None
    procs: list[Any] = []
    controls: list[Connection] = []
    # Shared with the readers (inherited through the process arguments), for credited ones.
    counters = ctx.RawArray(ctypes.c_uint64, spec.readers) if spec.workload in CREDITED else None
    try:
        reply = adapter.reply_path() if spec.workload in REPLYING else None
        forward = reply.engine_prepare(spec.readers) if reply else [None] * spec.readers
        for i in range(spec.readers):
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(
                target=reader_main,
                args=(
                    adapter_cls,
                    options,
                    writer.reader_handle(i),
                    forward[i],
                    i,
                    spec.as_dict(),
                    theirs,
                    counters,
                ),
                name=f"bench-reader-{i}",
                daemon=True,
            )
            proc.start()
            theirs.close()
            procs.append(proc)
            controls.append(ours)
        emit({"event": "phase", "phase": "attaching"})
        back = _collect("attached", controls, procs)
        if reply is not None:
            collector = reply.engine_connect(back)
        emit({"event": "phase", "phase": "collective start"})
        writer.wait_ready(spec.time_limit)
        if collector is not None:
            collector.wait_ready(spec.time_limit)
        _collect("ready", controls, procs)
        for control in controls:
            control.send("go")
        emit({"event": "phase", "phase": "running"})
        writer_result = WRITERS[spec.workload](spec, writer, collector, **_credits(spec, counters))
        emit({"event": "phase", "phase": "collecting results"})
        reader_results = _collect("result", controls, procs)
        for proc in procs:
            proc.join(10)
        return summarize(spec, writer_result, reader_results)
    except CaseFailed as exc:
        return {"status": "error", "detail": str(exc), "verification": {}, "metrics": {}}
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        for control in controls:
            control.close()
        if collector is not None:
            collector.close()
        writer.close()
