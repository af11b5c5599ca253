"""The remote half of the vLLM drop-in: readers on other hosts.

A :class:`~shmcast.compat.vllm.MessageQueue` with ``n_local_reader < n_reader``, or a reader
whose rank is not in ``handle.local_reader_ranks``, needs readers on other hosts, which receive
the stream over ZeroMQ.  That transport is not part of this version yet: both entry points
below say so with a :class:`NotImplementedError`, before anything is created, so that a
program finds out at construction time rather than when it first sends.

Everything the queue needs from the remote half goes through these two functions; the rest of
the drop-in only holds what they return:

- :func:`open_publisher` (writer side) returns an object with ``address`` (the address the
  remote readers connect to, for ``Handle.remote_subscribe_addr``), ``ipv6`` (for
  ``Handle.remote_addr_ipv6``), ``wait_until_ready(timeout)``, ``put(obj, timeout)`` and
  ``close()``;
- :func:`open_subscriber` (reader side) returns an object with ``wait_until_ready(timeout)``,
  ``get(timeout)`` and ``close()``.
"""

from __future__ import annotations

from typing import Any

MISSING = (
    "readers on other hosts (remote readers, over ZeroMQ) are not available yet in shmcast's "
    "vLLM MessageQueue; every reader must be local (n_local_reader == n_reader, and every "
    "reader's rank in local_reader_ranks)"
)


def open_publisher(n_remote_reader: int, connect_ip: str | None) -> Any:
    """The writer's side for ``n_remote_reader`` readers on other hosts, bound on
    ``connect_ip`` (None: this host's address)."""
    raise NotImplementedError(
        f"a MessageQueue with {n_remote_reader} remote reader(s) was asked for: {MISSING}"
    )


def open_subscriber(handle: Any, rank: int) -> Any:
    """A remote reader's side of the queue behind ``handle``, for ``rank``."""
    raise NotImplementedError(
        f"rank {rank} is not in the queue's local_reader_ranks "
        f"{list(handle.local_reader_ranks)}, so it would read remotely: {MISSING}"
    )
