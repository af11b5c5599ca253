"""The remote half of the vLLM drop-in: readers on other hosts.

A :class:`~shmcast.compat.vllm.MessageQueue` with ``n_local_reader < n_reader`` is one
:class:`~shmcast.BroadcastQueue` whose last ``n_reader - n_local_reader`` reader indices are
remote slots (:class:`~shmcast.RemoteOptions`, docs/remote.md): local readers read the ring,
remote ones receive the same stream over ZeroMQ TCP from the writer's publisher thread.  No
second transport: a remote reader is held back, declared dead and closed exactly as the remote
path of any shmcast queue.

What vLLM 0.33.0's callers rely on, and where it is kept here:

- ``connect_ip``: the writer's socket for remote readers is bound on that address, port 0 (the
  kernel picks a free port, so concurrent writers never collide), and the address actually
  bound goes into ``Handle.remote_subscribe_addr``; IPv6 addresses set
  ``Handle.remote_addr_ipv6``.  Without one, this host's address as vLLM picks it
  (:func:`host_ip`).  An address this host does not have fails at construction with ZeroMQ's
  own ``zmq.ZMQError`` ("Cannot assign requested address").
- a reader whose rank is not in ``handle.local_reader_ranks`` attaches over the network
  (also on the writer's host), taking the first remote slot that is free (:func:`attach`).
- ``remote_socket``: an object whose ``close()`` ends this side's network part
  (:class:`RemoteSocket`).

Security: vLLM's remote readers unpickle what arrives on their socket, unauthenticated.  The
drop-in keeps that behaviour, and opts in to it explicitly (``allow_pickle=True`` in
:func:`attach`; shmcast's own remote readers refuse pickled objects from a writer that is not
authenticated).  Whoever can answer a remote reader in the writer's place can therefore run
code in it, and whoever reaches the writer's port can read the stream; docs/vllm.md
("Security") says so.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import weakref
from typing import Any

from .._errors import AttachError
from .._queue import BroadcastQueue
from .._remote import RemoteOptions, require_zmq
from .._serialize import Serializer

log = logging.getLogger("shmcast.compat.vllm")

#: vLLM's setting for this host's address, which it prefers to any guess.
HOST_IP_ENV = "VLLM_HOST_IP"
#: Public addresses used only to ask the kernel which local address would route to them (a
#: UDP socket's connect sends nothing).
_PROBES = ((socket.AF_INET, "8.8.8.8"), (socket.AF_INET6, "2001:4860:4860::8888"))

#: Unpickling what a writer sends without authenticating it is vLLM's behaviour, kept on
#: purpose for the drop-in (see the module docstring).
ALLOW_PICKLE = True


def host_ip() -> str:
    """This host's address as vLLM 0.33.0 chooses it for ``connect_ip=None``:
    ``$VLLM_HOST_IP`` if set, else the local address the kernel would send from to a public
    IPv4 address, else to a public IPv6 address.  Where neither is routable, vLLM falls back
    to every interface; shmcast binds only one address, so it falls back to loopback (readers
    on other hosts could not reach it either way) and logs a warning."""
    configured = os.environ.get(HOST_IP_ENV, "").strip()
    if configured:
        return configured
    for family, probe in _PROBES:
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as s:
                s.connect((probe, 80))
                return str(s.getsockname()[0])
        except OSError:
            continue
    log.warning(
        "cannot find this host's address (no route to the outside); remote readers of "
        "shmcast's MessageQueue bind on 127.0.0.1: set %s to the address they reach",
        HOST_IP_ENV,
    )
    return "127.0.0.1"


def bind_address(connect_ip: str | None) -> str:
    """The ``tcp://HOST:0`` address for ``connect_ip`` (None: :func:`host_ip`); an IPv6
    address goes in brackets.  ValueError for an empty or wildcard address (shmcast binds
    only where it is told; vLLM's fallback to 0.0.0.0 is not kept)."""
    if connect_ip is not None and not isinstance(connect_ip, str):
        raise TypeError(f"connect_ip must be a str or None, not {type(connect_ip).__name__}")
    host = (connect_ip or host_ip()).strip()
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        is_v6 = isinstance(ipaddress.ip_address(bare.split("%")[0]), ipaddress.IPv6Address)
    except ValueError:
        is_v6 = False  # a host name, resolved by ZeroMQ
    return f"tcp://[{bare}]:0" if is_v6 else f"tcp://{bare}:0"


def options(n_local_reader: int, n_reader: int, connect_ip: str | None) -> RemoteOptions:
    """The remote slots of a drop-in queue: reader indices ``n_local_reader`` to
    ``n_reader - 1``, bound as :func:`bind_address` says.  ImportError without pyzmq."""
    require_zmq()
    readers = tuple(range(n_local_reader, n_reader))
    return RemoteOptions(bind=bind_address(connect_ip), readers=readers)


def attach(buffer_handle: Any, rank: int, serializer: Serializer) -> BroadcastQueue:
    """Attach a remote reader (over the network, also on the writer's host) to the first free
    remote slot of the queue behind ``buffer_handle``.

    vLLM's remote readers have no index (they subscribe to one socket), so the slot is the
    first one the writer accepts: one taken by a live reader is refused by the writer and the
    next is tried.  AttachError when the queue has no remote slots or every slot is taken
    (naming the writer's last answer); SegmentError when the writer does not answer.
    """
    info = getattr(buffer_handle, "remote", None)
    if info is None:
        raise AttachError(
            f"rank {rank} is not one of the queue's local reader ranks, and the queue has no "
            "remote readers (its writer was built with n_local_reader == n_reader)"
        )
    require_zmq()
    refused: AttachError | None = None
    for index in info.readers:
        try:
            return BroadcastQueue.attach(
                buffer_handle, reader=index, network=True, serializer=serializer,
                allow_pickle=ALLOW_PICKLE,
            )  # fmt: skip
        except AttachError as exc:
            refused = exc
    raise AttachError(
        f"rank {rank}: every remote reader slot of this queue ({len(info.readers)}) is taken; "
        f"the writer's last answer: {refused}"
    )


class RemoteSocket:
    """``MessageQueue.remote_socket``: vLLM's callers only ever close it.  ``close()`` shuts
    the queue's end down (:meth:`MessageQueue.shutdown`), which closes this end's socket:
    a remote reader detaches, a writer sends its remote readers what is left (for at most the
    remote path's linger, 10 s) and closes.  ``linger`` is accepted and not used.  Holds the
    queue weakly, so that it does not keep the queue alive."""

    def __init__(self, queue: Any) -> None:
        self._queue = weakref.ref(queue)

    def close(self, linger: int | None = None) -> None:
        queue = self._queue()
        if queue is not None:
            queue.shutdown()

    @property
    def closed(self) -> bool:
        queue = self._queue()
        return queue is None or queue.shutting_down


__all__ = ["ALLOW_PICKLE", "RemoteSocket", "attach", "bind_address", "host_ip", "options"]
