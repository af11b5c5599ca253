"""Two network namespaces joined by a veth pair, for tests that cross a real network boundary.

:func:`netns_pair` creates them with names unique to this test run (the pid and random bits),
gives each end an IPv4 address of the documentation range 192.0.2.0/24 and an IPv6 address of
2001:db8::/32 (inside the namespaces only: nothing leaves them), and removes both namespaces,
and with them the veth pair, when the block exits, whatever happened.  Where namespaces cannot
be made (not root, no ``ip``, no kernel support) it skips the test with the reason.

:func:`enter_netns` moves the calling thread into a namespace; child processes call it first
thing (before any socket or ZeroMQ context exists), so everything they open lives there.
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
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)


def enter_netns(name: str) -> None:
    """Move the calling thread into the network namespace ``name`` (made by ``ip netns``)."""
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
    """Create the pair (or skip the test, saying why); remove it on exit."""
    import pytest

    if shutil.which("ip") is None:
        pytest.skip("network namespaces: the ip command (iproute2) is not installed")
    if os.geteuid() != 0:
        pytest.skip("network namespaces: creating them needs root")
    tag = f"{os.getpid() % 100000:05d}{secrets.token_hex(2)}"
    pair = NetnsPair(f"shmcast-{tag}-w", f"shmcast-{tag}-r")
    veth_w, veth_r = f"sc{tag}w", f"sc{tag}r"  # at most 15 characters
    made: list[str] = []
    steps = [
        ("netns", "add", pair.writer_ns),
        ("netns", "add", pair.reader_ns),
        ("-n", pair.writer_ns, "link", "add", veth_w, "type", "veth", "peer", "name", veth_r,
         "netns", pair.reader_ns),
        ("-n", pair.writer_ns, "addr", "add", f"{pair.writer_v4}/24", "dev", veth_w),
        ("-n", pair.reader_ns, "addr", "add", f"{pair.reader_v4}/24", "dev", veth_r),
        ("-n", pair.writer_ns, "-6", "addr", "add", f"{pair.writer_v6}/64", "dev", veth_w, "nodad"),
        ("-n", pair.reader_ns, "-6", "addr", "add", f"{pair.reader_v6}/64", "dev", veth_r, "nodad"),
        ("-n", pair.writer_ns, "link", "set", veth_w, "up"),
        ("-n", pair.reader_ns, "link", "set", veth_r, "up"),
        ("-n", pair.writer_ns, "link", "set", "lo", "up"),
        ("-n", pair.reader_ns, "link", "set", "lo", "up"),
    ]  # fmt: skip
    try:
        for step in steps:
            done = _ip(*step)
            if done.returncode != 0:
                _remove(made)
                pytest.skip(f"network namespaces unavailable: ip {' '.join(step)}: "
                            f"{done.stderr.strip()}")  # fmt: skip
            if step[:2] == ("netns", "add"):
                made.append(step[2])
        yield pair
    finally:
        _remove(made)
