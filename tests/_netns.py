"""The networks of the remote tests: :func:`netns_pair` as in ``shmcast._remote._netns``, but
a machine without them skips the test with the reason; :func:`foreign_ipv4`, an address this
host does not have."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from shmcast._remote._netns import NetnsPair, NetnsUnavailable, enter_netns
from shmcast._remote._netns import netns_pair as _netns_pair

__all__ = ["NetnsPair", "enter_netns", "foreign_ipv4", "netns_pair"]

#: TEST-NET-2 (RFC 5737): documentation addresses, never assigned to a host.
FOREIGN_IPV4 = "198.51.100.1"


def foreign_ipv4() -> str:
    """An IPv4 address that this host does not have (binding on it fails); skip the test in
    the unlikely case that it does."""
    import socket

    import pytest

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind((FOREIGN_IPV4, 0))
        except OSError:
            return FOREIGN_IPV4
    pytest.skip(f"{FOREIGN_IPV4} is an address of this host")


@contextlib.contextmanager
def netns_pair() -> Iterator[NetnsPair]:
    """Two namespaces joined by a veth pair, removed on exit; skip where unavailable."""
    import pytest

    try:
        with _netns_pair() as pair:
            yield pair
    except NetnsUnavailable as exc:
        pytest.skip(f"network namespaces unavailable: {exc}")
