"""The remote cases of ``shmcast bench``: readers that receive over TCP instead of shared memory.

Three implementations, each on two networks:

- ``shmcast-remote``: a :class:`~shmcast.BroadcastQueue` with :class:`~shmcast.RemoteOptions`
  (no CURVE; readers attach with ``allow_pickle=True``, the trusted-network opt-in, since the
  workloads send pickled dicts);
- ``zmq-tcp``: plain pyzmq PUB (XPUB) / SUB over TCP, as the ``zmq-pubsub`` adapter does over
  ``ipc://`` (high-water marks at 1,000,000: a drop would show as lost messages);
- ``vllm-mq-remote``: vLLM's ``MessageQueue`` with every reader remote (``n_local_reader=0``,
  ``connect_ip``): its XPUB socket with vLLM's own settings.

The plain names run over loopback (127.0.0.1); the ``-netns`` ones across two network
namespaces joined by a veth pair: the harness creates the pair for the run, the leader (the
writer, and its forkserver) enters the writer's namespace and each reader the reader's (see
:func:`enter_case_netns`), so every byte crosses a real network device.
"""

from __future__ import annotations

import os
from typing import Any, ClassVar

from .adapters import (
    _VLLM_MAX_CHUNK_BYTES,
    _VLLM_MAX_CHUNKS,
    _VLLM_MODULE,
    Adapter,
    Reader,
    ReplyPath,
    VllmMessageQueueAdapter,
    Writer,
    _ShmcastReader,
    _ShmcastWriter,
    _VllmReader,
    _VllmWriter,
    _ZmqReader,
    _ZmqWriter,
)

#: The writer's address for the case (set by the harness; loopback when unset).
BIND_HOST_ENV = "SHMCAST_BENCH_BIND_HOST"
#: The namespaces of a ``-netns`` implementation (set by the harness for its leader).
WRITER_NETNS_ENV = "SHMCAST_BENCH_WRITER_NETNS"
READER_NETNS_ENV = "SHMCAST_BENCH_READER_NETNS"


def enter_case_netns(role: str) -> None:
    """Enter the writer's or the reader's namespace if this run asks for one (a no-op for
    every implementation but the ``-netns`` ones).  Called first thing by the leader and by
    each reader process."""
    name = os.environ.get(WRITER_NETNS_ENV if role == "writer" else READER_NETNS_ENV)
    if name:
        from ..._remote._netns import enter_netns

        enter_netns(name)


def _host() -> str:
    return os.environ.get(BIND_HOST_ENV, "127.0.0.1")


class _RemoteMixin:
    """The network the adapter's readers are on, for the results."""

    net: ClassVar[str] = "loopback"
    workloads: ClassVar[tuple[str, ...] | None] = ("latency", "throughput", "wakeup", "idle_cpu")

    def _network(self) -> dict[str, Any]:
        return {"network": self.net, "writer_address": _host()}


# -- shmcast ---------------------------------------------------------------------------------


class _ShmcastRemoteWriter(_ShmcastWriter):
    def __init__(self, n_readers: int, wait: str) -> None:
        import shmcast

        self.queue = shmcast.BroadcastQueue(
            n_readers, wait=wait, remote=shmcast.RemoteOptions(bind=f"tcp://{_host()}:0")
        )
        from .adapters import record_resource

        record_resource(os.path.join("/dev/shm", self.queue.name))


class _ShmcastRemoteReader(_ShmcastReader):
    def __init__(self, handle: Any, index: int, wait: str, network: bool | None) -> None:
        import shmcast

        self._timeout_error = shmcast.QueueTimeout
        self.queue = shmcast.BroadcastQueue.attach(
            handle, reader=index, wait=wait, network=network, allow_pickle=True
        )
        if not getattr(self.queue, "remote", False):
            raise RuntimeError("the reader did not take the network path")


class ShmcastRemoteAdapter(_RemoteMixin, Adapter):
    """``shmcast.BroadcastQueue`` with remote reader slots; every reader remote."""

    name = "shmcast-remote"
    requires = ("shmcast", "zmq")
    preload = ("shmcast", "shmcast._remote._reader", "shmcast._remote._publisher")
    distributions = ("shmcast", "pyzmq")

    def describe(self) -> dict[str, Any]:
        from shmcast import RemoteOptions

        o = RemoteOptions(bind="tcp://127.0.0.1:0")
        return {
            **self._network(),
            "window_messages": o.window_messages,
            "window_bytes": o.window_bytes,
            "curve": False,
            "allow_pickle": True,
        }

    def open_writer(self, n_readers: int, max_message_bytes: int) -> Writer:
        return _ShmcastRemoteWriter(n_readers, "futex")

    def open_reader(self, handle: Any, index: int) -> Reader:
        # Over loopback the reader is on the writer's host: ask for the network path.  Across
        # namespaces the handle's host identity sends it there by itself.
        return _ShmcastRemoteReader(
            handle, index, "futex", True if self.net == "loopback" else None
        )

    def reply_path(self) -> ReplyPath:
        raise NotImplementedError("the remote cases have no engine workload")


class ShmcastRemoteNetnsAdapter(ShmcastRemoteAdapter):
    name = "shmcast-remote-netns"
    net = "netns"


# -- pyzmq PUB/SUB over TCP ------------------------------------------------------------------


class _ZmqTcpWriter(_ZmqWriter):
    def __init__(self, n_readers: int) -> None:
        super().__init__(n_readers, f"tcp://{_host()}:*")


class ZmqTcpAdapter(_RemoteMixin, Adapter):
    """pyzmq XPUB/SUB over TCP; objects pickled (protocol 5, buffers as frames)."""

    name = "zmq-tcp"
    requires = ("zmq",)
    preload = ("zmq",)
    distributions = ("pyzmq",)

    def describe(self) -> dict[str, Any]:
        from .adapters import _ZMQ_HWM

        return {**self._network(), "hwm": _ZMQ_HWM}

    def open_writer(self, n_readers: int, max_message_bytes: int) -> Writer:
        return _ZmqTcpWriter(n_readers)

    def open_reader(self, handle: Any, index: int) -> Reader:
        return _ZmqReader(handle)

    def reply_path(self) -> ReplyPath:
        raise NotImplementedError("the remote cases have no engine workload")


class ZmqTcpNetnsAdapter(ZmqTcpAdapter):
    name = "zmq-tcp-netns"
    net = "netns"


# -- vLLM's remote path ------------------------------------------------------------------------


class _VllmRemoteWriter(_VllmWriter):
    def __init__(self, n_readers: int) -> None:
        from vllm.distributed.device_communicators.shm_broadcast import MessageQueue

        self.queue: Any = MessageQueue(
            n_readers, 0, max_chunk_bytes=_VLLM_MAX_CHUNK_BYTES, max_chunks=_VLLM_MAX_CHUNKS,
            connect_ip=_host(),
        )  # fmt: skip


class VllmRemoteAdapter(_RemoteMixin, Adapter):
    """vLLM's ``MessageQueue`` with every reader remote (``n_local_reader=0``, readers
    subscribe to its XPUB socket at ``connect_ip``)."""

    name = "vllm-mq-remote"
    requires = VllmMessageQueueAdapter.requires
    preload = (_VLLM_MODULE,)
    distributions = VllmMessageQueueAdapter.distributions

    def describe(self) -> dict[str, Any]:
        return {**self._network(), "n_local_reader": 0, "note": "vLLM's remote XPUB path"}

    def open_writer(self, n_readers: int, max_message_bytes: int) -> Writer:
        return _VllmRemoteWriter(n_readers)

    def open_reader(self, handle: Any, index: int) -> Reader:
        return _VllmReader(handle, index)

    def reply_path(self) -> ReplyPath:
        raise NotImplementedError("the remote cases have no engine workload")


class VllmRemoteNetnsAdapter(VllmRemoteAdapter):
    name = "vllm-mq-remote-netns"
    net = "netns"


REMOTE_ADAPTERS: tuple[type[Adapter], ...] = (
    ShmcastRemoteAdapter,
    ZmqTcpAdapter,
    VllmRemoteAdapter,
    ShmcastRemoteNetnsAdapter,
    ZmqTcpNetnsAdapter,
    VllmRemoteNetnsAdapter,
)
#: What ``shmcast bench --remote`` runs: small-message latency, 64 B and 1 MiB throughput.
REMOTE_WORKLOADS = ("latency:dict", "latency:1KiB", "throughput:64B", "throughput:1MiB")
