"""Configuration of the remote path, the part of the handle that describes it, host identity,
addresses and keys.  Nothing here imports ZeroMQ, so the package imports without pyzmq.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

#: A CURVE key pair: the path of a secret certificate file (made by ``shmcast keygen`` or
#: ``zmq.auth.create_certificates``), or ``(public, secret)`` as Z85 bytes.
KeyPair = Union[str, "os.PathLike[str]", tuple[bytes, bytes]]

_TCP = re.compile(r"^tcp://(?P<host>\[[0-9A-Fa-f:.%\w]+\]|[^:\[\]/*]+):(?P<port>\d+)$")


def host_identity() -> str:
    """Which host (and network namespace) this process runs on: the kernel's boot id and the
    inode of the calling thread's network namespace.  Two processes with the same identity
    share the machine's /dev/shm and its loopback; a process in another network namespace of
    the same machine counts as another host (it reaches the writer over the network)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = "unknown-boot"
    try:
        net = str(os.stat(f"/proc/self/task/{_thread_id()}/ns/net").st_ino)
    except OSError:
        try:
            net = str(os.stat("/proc/self/ns/net").st_ino)
        except OSError:
            net = "unknown-netns"
    return f"{boot}/{net}"


def _thread_id() -> int:
    import threading

    return threading.get_native_id()


def check_endpoint(address: str) -> tuple[str, bool]:
    """Validate a ``tcp://HOST:PORT`` bind address; return it and whether it is IPv6.

    HOST must be one address (an IPv4 address, a bracketed IPv6 address, or a host or
    interface name), never a wildcard: the writer binds only where it is told to.  PORT 0
    picks a free port.  ValueError otherwise.
    """
    if not isinstance(address, str):
        raise TypeError(f"bind must be a 'tcp://HOST:PORT' string, not {type(address).__name__}")
    match = _TCP.match(address)
    if match is None:
        raise ValueError(
            f"bind address {address!r} is not tcp://HOST:PORT with one host (an IPv4 address, "
            "[an IPv6 address], or a name; no wildcard)"
        )
    host, port = match.group("host"), int(match.group("port"))
    if port > 65535:
        raise ValueError(f"bind address {address!r}: port {port} out of range")
    ipv6 = host.startswith("[")
    bare = host[1:-1].split("%")[0] if ipv6 else host
    try:
        ip = ipaddress.ip_address(bare)
    except ValueError:
        if ipv6:
            raise ValueError(f"bind address {address!r}: {bare!r} is not an IPv6 address") from None
        return address, False  # a host or interface name, resolved by ZeroMQ
    if ip.is_unspecified:
        raise ValueError(
            f"bind address {address!r} means every interface; give the one address the "
            "readers connect to"
        )
    return address, ipv6


def _positive(name: str, value: Any, kind: type = float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        raise TypeError(f"{name} must be a {kind.__name__}, not {type(value).__name__}")
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")


@dataclass(frozen=True)
class RemoteOptions:
    """Remote reader slots of a :class:`~shmcast.BroadcastQueue`: readers on other hosts get the
    same stream over ZeroMQ TCP.  Needs pyzmq (``pip install shmcast[remote]``).

    Parameters:
        bind: ``"tcp://HOST:PORT"``: the one address the writer listens on (never every
            interface); PORT 0 picks a free port, which the handle carries.  IPv6 addresses
            go in brackets: ``"tcp://[fd00::1]:0"``.
        readers: the reader indices that may attach over the network (None: every index).
            A reader on the writer's own host always uses shared memory.
        window_messages, window_bytes: the most a remote reader may have received and not yet
            consumed (and acknowledged); the writer sends no more until it catches up, so
            memory stays bounded and a slow remote reader holds the writer back exactly like
            a slow local one.  A single message larger than ``window_bytes`` still travels,
            alone.
        heartbeat: seconds between heartbeats, both ways, also while idle.
        dead_after: seconds of silence after which a peer counts as dead: a blocked writer
            then raises QueueBroken naming the reader (or drops it, with
            ``on_dead_reader="drop"``), and a remote reader raises QueueBroken once it has read
            everything it received.  A reader that is only slow keeps sending heartbeats and
            is never dropped.
        linger: seconds the writer's ``close()`` waits for remote readers to receive what is
            still on its way; past that, they see the writer go silent (QueueBroken).
        server_key: the writer's CURVE key pair (see :data:`KeyPair`; ``shmcast keygen``
            makes one).  With it, every connection is encrypted and only readers whose public
            key is in ``client_keys`` get through; a peer without an accepted key receives
            nothing and injects nothing.  Without it, remote readers accept raw bytes only,
            unless they attach with ``allow_pickle=True``.
        client_keys: the public keys allowed in: a directory of public certificate files,
            or an iterable of Z85 public keys.  Required with ``server_key``.
        batch_bytes: how many bytes of small messages may travel in one ZeroMQ message.
    """

    bind: str
    readers: Sequence[int] | None = None
    window_messages: int = 1024
    window_bytes: int = 16 << 20
    heartbeat: float = 0.25
    dead_after: float = 2.0
    linger: float = 10.0
    server_key: KeyPair | None = None
    client_keys: str | os.PathLike[str] | Iterable[bytes] | None = field(default=None)
    batch_bytes: int = 256 << 10

    def checked(self, n_readers: int) -> tuple[RemoteOptions, bool, tuple[int, ...]]:
        """Validate against a queue of ``n_readers``; return self, whether the address is
        IPv6, and the remote reader indices.  TypeError or ValueError says what is wrong."""
        _, ipv6 = check_endpoint(self.bind)
        indices = tuple(range(n_readers)) if self.readers is None else tuple(self.readers)
        for i in indices:
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n_readers:
                raise ValueError(
                    f"remote reader index {i!r} is not one of this queue's 0..{n_readers - 1}"
                )
        if len(set(indices)) != len(indices) or not indices:
            raise ValueError(f"remote readers must be distinct indices, at least one: {indices}")
        _positive("window_messages", self.window_messages, int)
        _positive("window_bytes", self.window_bytes, int)
        _positive("batch_bytes", self.batch_bytes, int)
        for name in ("heartbeat", "dead_after", "linger"):
            _positive(name, getattr(self, name))
        if self.window_messages > 1 << 20:
            raise ValueError("window_messages must be at most 1048576")
        if not self.heartbeat * 2 <= self.dead_after <= 3600:
            raise ValueError(
                f"dead_after ({self.dead_after} s) must be at least twice the heartbeat "
                f"({self.heartbeat} s) and at most an hour"
            )
        if self.heartbeat > 60:
            raise ValueError("heartbeat must be at most 60 s")
        if (self.server_key is None) != (self.client_keys is None):
            raise ValueError(
                "server_key and client_keys go together: the writer's key pair, and the "
                "public keys of the readers it lets in"
            )
        return self, ipv6, indices


@dataclass(frozen=True)
class RemoteInfo:
    """What a remote reader needs from the handle: where to connect, which indices are
    served, and the writer's public CURVE key (None: no CURVE)."""

    endpoint: str
    readers: tuple[int, ...]
    n_readers: int
    server_public_key: bytes | None = None
    ipv6: bool = False


def load_key_pair(key: KeyPair, what: str) -> tuple[bytes, bytes]:
    """``(public, secret)`` Z85 keys from a secret certificate file or a pair.  ValueError if
    the file has no secret key or the keys are not 40-character Z85 strings."""
    if isinstance(key, tuple):
        if len(key) != 2:
            raise ValueError(f"{what} must be (public, secret), not a {len(key)}-tuple")
        public, secret = key
    else:
        from zmq.auth import load_certificate

        try:
            public, secret = load_certificate(os.fspath(key))
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot load {what} from {os.fspath(key)!r}: {exc}") from None
        if secret is None:
            raise ValueError(
                f"{what}: {os.fspath(key)!r} holds a public key only; give the .key_secret file"
            )
    for label, k in (("public", public), ("secret", secret)):
        if not isinstance(k, bytes) or len(k) != 40:
            raise ValueError(f"{what}: the {label} key must be 40 bytes of Z85")
    return public, secret


def load_public_keys(keys: str | os.PathLike[str] | Iterable[bytes]) -> frozenset[bytes]:
    """The accepted public keys: every certificate in a directory, or the given keys."""
    if isinstance(keys, (str, os.PathLike)):
        from zmq.auth import load_certificates

        path = os.fspath(keys)
        if not os.path.isdir(path):
            raise ValueError(f"client_keys {path!r} is not a directory of public certificates")
        found = frozenset(load_certificates(path).keys())
    else:
        found = frozenset(keys)
    for k in found:
        if not isinstance(k, bytes) or len(k) != 40:
            raise ValueError(f"client key {k!r} is not a 40-byte Z85 public key")
    if not found:
        raise ValueError("client_keys holds no public key: no reader could connect")
    return found
