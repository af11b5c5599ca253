"""The exceptions shmcast raises: one hierarchy under :class:`ShmcastError`.

Only these (and the built-in TypeError / ValueError for bad arguments) escape shmcast's calls on
purpose: whatever a corrupted or hostile segment holds becomes a :class:`SegmentError`.
"""

from __future__ import annotations

from . import _native


class ShmcastError(Exception):
    """Base class of every error shmcast raises on purpose."""


class QueueClosed(ShmcastError):
    """The queue was closed: by this endpoint (any use after ``close()``), or by the writer
    (raised to a reader once it has read everything the writer published)."""


class QueueBroken(ShmcastError):
    """A peer died: the writer of a reader, or a reader the writer waits for.

    ``peer`` says who (``"writer"`` or ``"reader 3"``) and ``pid`` its process id.
    """

    def __init__(self, message: str, *, peer: str = "", pid: int = 0) -> None:
        super().__init__(message)
        self.peer = peer
        self.pid = pid


class QueueTimeout(ShmcastError, TimeoutError):
    """A blocking call ran out of time.  Nothing was sent or received: the queue is unchanged."""


class SegmentError(ShmcastError):
    """A handle does not lead to a usable queue (the segment is gone, not shmcast's, of another
    layout version, corrupted, or another queue than the handle was made for), or a queue in use
    was found corrupted: a sequence, length, state or pid in the segment that no participant
    could have written.  A corrupted queue is not repaired; close it."""


class AttachError(ShmcastError, ValueError):
    """A reader index is out of range or already in use."""


class RoleError(ShmcastError):
    """A writer-only call on a reader (``put``) or a reader-only call on the writer (``get``)."""


class MessageKindError(ShmcastError, TypeError):
    """The next message is not of the kind asked for (``get_bytes`` on an object message).
    The message stays in the queue."""


class MessageTooLarge(ShmcastError, ValueError):
    """A zero-copy reservation larger than the ring.  (``put`` streams any size.)"""


class SerializationError(ShmcastError):
    """The serializer could not encode an object (nothing was sent) or decode a message (the
    message is consumed; the cause is chained)."""


class SharedMemoryFull(ShmcastError, OSError):
    """A new queue does not fit in /dev/shm: the message says how much it needs and how much is
    free.  Raised by the constructor; nothing is left behind."""


class InheritedEndpoint(ShmcastError, RuntimeError):
    """An endpoint was used in a process other than the one that created or attached it (a
    child forked after the parent attached).  The parent's stream is untouched; the child must
    attach an index of its own."""


_native.set_errors(SegmentError, QueueClosed, InheritedEndpoint)
