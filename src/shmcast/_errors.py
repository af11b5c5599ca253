"""The exceptions shmcast raises: one hierarchy under :class:`ShmcastError`."""

from __future__ import annotations


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
    """A handle does not lead to a usable queue: the segment is gone, not shmcast's, of another
    layout version, corrupted, or another queue than the handle was made for."""


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
