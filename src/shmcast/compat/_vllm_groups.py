"""Building a :class:`~shmcast.compat.vllm.MessageQueue` over a process group.

Two kinds of groups, as in vLLM: a ``torch.distributed`` process group (torch is imported here,
only when one is used) and vLLM's ``StatelessProcessGroup`` (recognized by its methods, so vLLM
is never imported).  Only the group's object collectives are used: broadcast and all-gather.

Which ranks share the writer's host is found by trying: the source rank creates a tiny
shmcast queue, every rank tries to attach to it, and the answers are gathered.  A rank that
can attach shares the writer's shared memory, which is what a local reader needs.

Ranks that cannot attach read remotely (over ZeroMQ TCP, see :mod:`shmcast.compat._remote`),
as in vLLM.  Every function here is collective: each rank of the group calls it, with the same
arguments.
"""

from __future__ import annotations

from typing import Any

from .._errors import ShmcastError
from .._queue import BroadcastQueue


class _TorchGroup:
    """A ``torch.distributed`` process group, through its object collectives."""

    def __init__(self, pg: Any) -> None:
        import torch.distributed as dist

        self._dist = dist
        self._pg = pg
        self.rank = dist.get_rank(pg)
        self.world_size = dist.get_world_size(pg)
        self._ranks = dist.get_process_group_ranks(pg)  # group rank -> global rank

    def broadcast(self, obj: Any, src: int) -> Any:
        box = [obj]
        self._dist.broadcast_object_list(box, src=self._ranks[src], group=self._pg)
        return box[0]

    def all_gather(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        self._dist.all_gather_object(out, obj, group=self._pg)
        return out


class _StatelessGroup:
    """vLLM's ``StatelessProcessGroup`` (or anything with its ``rank``, ``world_size``,
    ``broadcast_obj`` and ``all_gather_obj``)."""

    def __init__(self, pg: Any) -> None:
        self._pg = pg
        self.rank = pg.rank
        self.world_size = pg.world_size

    def broadcast(self, obj: Any, src: int) -> Any:
        return self._pg.broadcast_obj(obj, src)

    def all_gather(self, obj: Any) -> list[Any]:
        return self._pg.all_gather_obj(obj)


def group_of(pg: Any) -> _TorchGroup | _StatelessGroup:
    """Wrap ``pg``: a StatelessProcessGroup-like object, else a torch process group."""
    if all(hasattr(pg, a) for a in ("rank", "world_size", "broadcast_obj", "all_gather_obj")):
        return _StatelessGroup(pg)
    return _TorchGroup(pg)


def _check_rank(what: str, rank: Any, world_size: int) -> None:
    if not isinstance(rank, int) or isinstance(rank, bool) or not 0 <= rank < world_size:
        raise ValueError(
            f"{what} must be a rank of the group (0 to {world_size - 1}), got {rank!r}"
        )


def same_host_as(group: _TorchGroup | _StatelessGroup, source_rank: int) -> list[bool]:
    """For every rank of the group, whether it shares ``source_rank``'s shared memory
    (collective)."""
    probe = None
    if group.rank == source_rank:
        probe = BroadcastQueue(group.world_size, n_slots=2, slot_size=64)
        handle = group.broadcast(probe.handle, source_rank)
    else:
        handle = group.broadcast(None, source_rank)
    attached = None
    try:
        if probe is None:
            try:
                attached = BroadcastQueue.attach(handle, reader=group.rank)
            except (ShmcastError, OSError):
                attached = None
        # Everybody has tried before anybody closes: the gather orders it.
        return [bool(s) for s in group.all_gather(probe is not None or attached is not None)]
    finally:
        if attached is not None:
            attached.close()
        if probe is not None:
            probe.close()


def _survey(pg: Any, what: str, source: int) -> tuple[_TorchGroup | _StatelessGroup, list[int]]:
    """The wrapped group, and the ranks that do not share ``source``'s host (collective)."""
    group = group_of(pg)
    _check_rank(what, source, group.world_size)
    return group, [r for r, here in enumerate(same_host_as(group, source)) if not here]


def create_from_process_group(
    cls: type,
    pg: Any,
    max_chunk_bytes: int,
    max_chunks: int,
    writer_rank: int = 0,
    external_writer_handle: Any = None,
    blocking: bool = True,
) -> Any:
    """A queue over ``pg``: group rank ``writer_rank`` writes, every other rank reads
    (collective).

    The writer creates the queue (or, with ``external_writer_handle``, joins the queue of a
    writer outside the group, as a reader of it) and broadcasts its handle; every other rank
    joins it: the ranks on the writer's host through shared memory, the others remotely (the
    writer's socket bound on this host's address).  With ``blocking``, every rank then waits
    until all have joined.  If the writer cannot create the queue, every reader raises too
    (RuntimeError), instead of waiting for a handle that never comes.
    """
    group, remote = _survey(pg, "writer_rank", writer_rank)
    if group.rank == writer_rank:
        try:
            if external_writer_handle is not None:
                queue = cls.create_from_handle(external_writer_handle, group.rank)
            else:
                local = [r for r in range(group.world_size) if r != writer_rank and r not in remote]
                queue = cls(
                    n_reader=group.world_size - 1, n_local_reader=len(local),
                    local_reader_ranks=local, max_chunk_bytes=max_chunk_bytes,
                    max_chunks=max_chunks,
                )  # fmt: skip
        except BaseException:
            group.broadcast(None, writer_rank)  # the readers raise too instead of waiting
            raise
        group.broadcast(queue.export_handle(), writer_rank)
    else:
        handle = group.broadcast(None, writer_rank)
        if handle is None:
            raise RuntimeError(
                f"the writer (rank {writer_rank}) could not create the queue; see its error"
            )
        queue = cls.create_from_handle(handle, group.rank)
    if blocking:
        queue.wait_until_ready()
    return queue


def create_from_process_group_single_reader(
    cls: type,
    pg: Any,
    max_chunk_bytes: int,
    max_chunks: int,
    reader_rank: int = 0,
    blocking: bool = False,
) -> tuple[Any, list[Any]]:
    """One queue per rank of ``pg``, each with one reader, ``reader_rank`` (collective).

    Every rank creates a queue of its own (the reader's too, as vLLM does) and the handles are
    gathered: returns ``(this rank's queue, handles)``, the handles of every rank, in rank
    order, on the reader and ``[]`` elsewhere.  With ``blocking``, each rank waits until the
    reader has joined its queue (the reader must join them all for that).  The queue of a rank
    on another host than the reader has its reader remote (``n_local_reader=0``): the reader
    joins it over the network.
    """
    group, remote = _survey(pg, "reader_rank", reader_rank)
    queue = cls(
        n_reader=1, n_local_reader=0 if group.rank in remote else 1,
        max_chunk_bytes=max_chunk_bytes, max_chunks=max_chunks,
    )  # fmt: skip
    handles = group.all_gather(queue.export_handle())
    if blocking:
        queue.wait_until_ready()
    return queue, (list(handles) if group.rank == reader_rank else [])
