"""The remote path of a broadcast queue: readers on other hosts, over ZeroMQ (pyzmq).

- ``_options``: :class:`RemoteOptions`, the handle's :class:`RemoteInfo`, host identity,
  addresses and keys (no ZeroMQ import: the package imports without pyzmq);
- ``_wire``: the frame format;
- ``_publisher``: the writer's side, a thread that reads the ring for the remote readers;
- ``_reader``: a remote reader endpoint.

(``shmcast keygen``, which makes CURVE keys for it, is one of the tools: ``shmcast._tools``.)

docs/remote.md describes the design, the wire format and the argument for why nothing is lost.
"""

from __future__ import annotations

from typing import Any

from ._options import RemoteInfo, RemoteOptions, host_identity

INSTALL_HINT = "the remote path needs pyzmq: pip install 'shmcast[remote]'"


def require_zmq() -> None:
    """ImportError with the install hint when pyzmq is missing."""
    try:
        import zmq  # noqa: F401
    except ImportError as exc:
        raise ImportError(INSTALL_HINT) from exc


def start_publisher(seg: Any, header: Any, options: RemoteOptions) -> tuple[Any, RemoteInfo]:
    """Bind the writer's socket and start its publisher thread (writer's constructor only);
    return the publisher and the handle's RemoteInfo."""
    require_zmq()
    from ._publisher import Publisher

    geometry = header.geometry
    options, ipv6, indices = options.checked(geometry.n_peers)
    publisher = Publisher(seg, header, options, indices, ipv6)
    info = RemoteInfo(publisher.endpoint, indices, geometry.n_peers, publisher.public_key, ipv6)
    return publisher, info


def remote_reader(handle: Any, reader: int, **options: Any) -> Any:
    """A remote reader endpoint for ``BroadcastQueue.attach`` (see there)."""
    from .._endpoint import Handle
    from .._errors import AttachError
    from .._participants import check_index

    if not isinstance(handle, Handle):
        raise TypeError(
            f"attach() needs the queue's handle (queue.handle), not {type(handle).__name__}"
        )
    if handle.remote is None:
        raise AttachError("this queue has no remote reader slots (RemoteOptions)")
    index = check_index(reader, handle.remote.n_readers, "reader")
    require_zmq()
    from ._reader import RemoteReader

    return RemoteReader(handle, index, **options)


__all__ = [
    "INSTALL_HINT",
    "RemoteInfo",
    "RemoteOptions",
    "host_identity",
    "remote_reader",
    "require_zmq",
    "start_publisher",
]
