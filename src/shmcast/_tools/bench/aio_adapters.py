"""Readers on an asyncio event loop: shmcast's ``get_async`` against the thread-pool way.

Both adapters are ``shmcast-futex`` on the writer's side; only the reader differs, and it runs
the whole workload inside one event loop (``asyncio.run``), as an API server's coroutine
would, so that each receive is one ``await`` in a running loop:

- ``shmcast-async``: ``await queue.get_async(timeout)``;
- ``shmcast-executor``: ``await loop.run_in_executor(None, queue.get, timeout)``, the usual
  way to call a blocking ``get`` from a coroutine (a thread of the loop's default pool per
  call in flight).

Run them with the sync reader in the same run, for instance::

    shmcast bench --impl shmcast-futex,shmcast-async,shmcast-executor \\
        --workload latency:dict,idle_cpu --readers 1
"""

from __future__ import annotations

import asyncio
from array import array
from typing import Any, ClassVar

from .adapters import Reader, ReplySender, ShmcastAdapter, _ShmcastReader
from .workloads import CaseSpec, IdleWindow, _payloads, _Receiver


async def _read_latency(spec: CaseSpec, rx: _Receiver, first: int) -> dict:
    """The latency (``first=spec.warmup``) and wake-up (``first=1``) reader loop, awaiting."""
    lat = array("q")
    while (got := await rx.anext(spec.stall_s + spec.idle_s)) is not None:
        seq, sent, now, _ = got
        if seq >= first:
            lat.append(now - sent)
    return rx.result(latencies_ns=lat.tolist())


async def _read_idle_cpu(spec: CaseSpec, rx: _Receiver) -> dict:
    window = IdleWindow(spec)
    while (got := await rx.anext(spec.idle_s + spec.stall_s)) is not None:
        window.see(got[0], got[2])
    return window.result(rx)


class _AsyncReader(_ShmcastReader):
    """A shmcast reader whose workload runs in an event loop; ``recv_async`` is the receive."""

    async def recv_async(self, timeout: float) -> Any:
        try:
            return await self.queue.get_async(timeout=timeout)
        except self._timeout_error:
            return None

    def run_workload(self, spec: CaseSpec, sender: ReplySender | None, index: int) -> dict:
        rx = _Receiver(self, _payloads(spec), spec.messages)
        if spec.workload == "latency":
            job = _read_latency(spec, rx, spec.warmup)
        elif spec.workload == "wakeup":
            job = _read_latency(spec, rx, 1)
        elif spec.workload == "idle_cpu":
            job = _read_idle_cpu(spec, rx)
        else:
            raise ValueError(f"no asyncio reader for the {spec.workload} workload")
        return asyncio.run(job)


class _ExecutorReader(_AsyncReader):
    async def recv_async(self, timeout: float) -> Any:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(None, self.queue.get, timeout)
        except self._timeout_error:
            return None


class ShmcastAsyncAdapter(ShmcastAdapter):
    """``shmcast-futex`` with readers that ``await queue.get_async()`` in an event loop."""

    name = "shmcast-async"
    workloads: ClassVar[tuple[str, ...] | None] = ("latency", "wakeup", "idle_cpu")
    reader_class: ClassVar[type[_AsyncReader]] = _AsyncReader

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "reader": "await queue.get_async(timeout)"}

    def open_reader(self, handle: Any, index: int) -> Reader:
        return self.reader_class(handle, index, self.wait)


class ShmcastExecutorAdapter(ShmcastAsyncAdapter):
    """The same, with readers that await the blocking ``get`` in the loop's thread pool."""

    name = "shmcast-executor"
    reader_class = _ExecutorReader

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "reader": "await loop.run_in_executor(None, queue.get, timeout)",
        }


AIO_ADAPTERS = (ShmcastAsyncAdapter, ShmcastExecutorAdapter)
