"""shmcast: broadcast messages from one process to many through shared memory.

One writer, N readers, every reader gets every message in order; waiting sleeps in the kernel
on a futex, so an idle process costs nothing and nothing freezes under load.  See README.md and
docs/ for the guide, docs/protocol.md for the protocol.
"""

from ._endpoint import Handle, QueueStats
from ._errors import (
    AttachError,
    InheritedEndpoint,
    MessageKindError,
    MessageTooLarge,
    QueueBroken,
    QueueClosed,
    QueueTimeout,
    RoleError,
    SegmentError,
    SerializationError,
    SharedMemoryFull,
    ShmcastError,
)
from ._gather import GatherQueue
from ._queue import BroadcastQueue
from ._region import SharedBuffers
from ._remote import RemoteOptions
from ._serialize import PickleSerializer, Serializer
from ._wait import BackoffWait, FutexWait, IdleWait, SpinWait, WaitPolicy

__version__ = "0.1.0"

__all__ = [
    "AttachError",
    "BackoffWait",
    "BroadcastQueue",
    "FutexWait",
    "GatherQueue",
    "Handle",
    "IdleWait",
    "InheritedEndpoint",
    "MessageKindError",
    "MessageTooLarge",
    "PickleSerializer",
    "QueueBroken",
    "QueueClosed",
    "QueueStats",
    "QueueTimeout",
    "RemoteOptions",
    "RoleError",
    "SegmentError",
    "SerializationError",
    "Serializer",
    "SharedBuffers",
    "SharedMemoryFull",
    "ShmcastError",
    "SpinWait",
    "WaitPolicy",
    "__version__",
]
