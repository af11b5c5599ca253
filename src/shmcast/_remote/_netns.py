"""Two network namespaces joined by a veth pair: a real network boundary on one machine, for
``shmcast demo --remote``, ``shmcast bench`` remote cases and the tests.

:func:`netns_pair` creates them with names unique to the calling process (its pid and random
bits), gives each end an IPv4 address of the documentation range 192.0.2.0/24 and an IPv6
address of 2001:db8::/32 (they exist inside the two namespaces only: nothing leaves them), and
removes both namespaces, and with them the veth pair, when the block exits, whatever happened.
Where namespaces cannot be made (not root, no ``ip`` command, no kernel support) it raises
:class:`NetnsUnavailable` saying why.

:func:`enter_netns` moves the calling thread into a namespace.  A process calls it first thing,
before it opens any socket or ZeroMQ context (whose threads inherit the namespace), so that
everything it opens lives there.  The namespaces share the machine's /dev/shm: a process in
the writer's namespace reads through shared memory, one in the other namespace has another
network namespace in its host identity and so takes the network path.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

CLONE_NEWNET = 0x40000000


class NetnsUnavailable(Exception):
    """Network namespaces cannot be made here; the message says why."""


@dataclass(frozen=True)
class NetnsPair:
    """The writer's namespace and the reader's, and each end's addresses."""

    writer_ns: str
    reader_ns: str
    writer_v4: str = "192.0.2.1"
    reader_v4: str = "192.0.2.2"
    writer_v6: str = "2001:db8::1"
    reader_v6: str = "2001:db8::2"

    def bind(self, ipv6: bool = False) -> str:
        """The writer's bind address (a free port)."""
        return f"tcp://[{self.writer_v6}]:0" if ipv6 else f"tcp://{self.writer_v4}:0"


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", *args], capture_output=True, text=True, timeout=20, stdin=subprocess.DEVNULL
    )


def enter_netns(name: str) -> None:
    """Move the calling thread into the network namespace ``name`` (made by ``ip netns``).
    OSError if that fails."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"setns into {name}: {os.strerror(errno)}")
    finally:
        os.close(fd)


def _remove(names: list[str]) -> None:
    for name in names:
        with contextlib.suppress(Exception):
            _ip("netns", "del", name)


@contextlib.contextmanager
def netns_pair() -> Iterator[NetnsPair]:
    """Create the pair (NetnsUnavailable if it cannot be); remove it on exit."""
    if shutil.which("ip") is None:
        raise NetnsUnavailable("the ip command (iproute2) is not installed")
    if os.geteuid() != 0:
        raise NetnsUnavailable("creating network namespaces needs root")
    tag = f"{os.getpid() % 100000:05d}{secrets.token_hex(2)}"
    pair = NetnsPair(f"shmcast-{tag}-w", f"shmcast-{tag}-r")
    veth_w, veth_r = f"sc{tag}w", f"sc{tag}r"  # at most 15 characters
    w, r = pair.writer_ns, pair.reader_ns
    steps = [
        ("netns", "add", w),
        ("netns", "add", r),
        ("-n", w, "link", "add", veth_w, "type", "veth", "peer", "name", veth_r, "netns", r),
        ("-n", w, "addr", "add", f"{pair.writer_v4}/24", "dev", veth_w),
        ("-n", r, "addr", "add", f"{pair.reader_v4}/24", "dev", veth_r),
        ("-n", w, "-6", "addr", "add", f"{pair.writer_v6}/64", "dev", veth_w, "nodad"),
        ("-n", r, "-6", "addr", "add", f"{pair.reader_v6}/64", "dev", veth_r, "nodad"),
        ("-n", w, "link", "set", veth_w, "up"),
        ("-n", r, "link", "set", veth_r, "up"),
        ("-n", w, "link", "set", "lo", "up"),
        ("-n", r, "link", "set", "lo", "up"),
    ]
    made: list[str] = []
    try:
        for step in steps:
            done = _ip(*step)
            if done.returncode != 0:
                raise NetnsUnavailable(f"ip {' '.join(step)}: {done.stderr.strip()}")
            if step[:2] == ("netns", "add"):
                made.append(step[2])
        yield pair
    finally:
        _remove(made)
