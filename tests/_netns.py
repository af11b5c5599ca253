"""The network namespaces of the remote tests: :func:`netns_pair` as in
``shmcast._remote._netns``, but a machine without them skips the test with the reason."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from shmcast._remote._netns import NetnsPair, NetnsUnavailable, enter_netns
from shmcast._remote._netns import netns_pair as _netns_pair

__all__ = ["NetnsPair", "enter_netns", "netns_pair"]


@contextlib.contextmanager
def netns_pair() -> Iterator[NetnsPair]:
    """Two namespaces joined by a veth pair, removed on exit; skip where unavailable."""
    import pytest

    try:
        with _netns_pair() as pair:
            yield pair
    except NetnsUnavailable as exc:
        pytest.skip(f"network namespaces unavailable: {exc}")
