"""Remote readers across a real network boundary: the writer (and its local readers) in one
network namespace, remote readers in another, joined by a veth pair (tests/_netns.py).  A
reader in the other namespace has the writer's boot id but another namespace, so the handle
sends it down the network path by itself (no ``network=True`` here)."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from _netns import NetnsPair, netns_pair
from _procs import (
    OBJECT,
    RAW,
    in_netns,
    plan_digest,
    process_group,
    reader_check_plan,
    remote_reader_plan,
    remote_reader_read_and_hold,
    remote_reader_until_broken,
    remote_writer,
)

pytest.importorskip("zmq")
pytestmark = pytest.mark.timeout(120)

SMALL = {"n_slots": 8, "slot_size": 4096}  # a 32 KiB ring
PLAN = [(RAW, 64), (OBJECT, 3000), (RAW, 20_000), (RAW, 0)] * 25 + [
    (RAW, 300_000),  # ten times the ring
    (OBJECT, 100_000),
    (RAW, 5),
]


@pytest.fixture(scope="module")
def pair() -> Iterator[NetnsPair]:
    with netns_pair() as made:
        yield made


def start_writer(group, pair: NetnsPair, n_readers: int, remote: dict, plan, then="close",
                 geometry=SMALL):  # fmt: skip
    report, report_child = group.back_channel()
    control, control_child = group.channel()
    writer = group.start(in_netns, pair.writer_ns, remote_writer, report_child, control_child,
                         n_readers, remote, geometry, 11, plan, then, label="writer")  # fmt: skip
    if not report.poll(60):
        group.result(writer, 1)
    return writer, report.recv(), report, control


@pytest.mark.parametrize("ipv6", [False, True], ids=["ipv4", "ipv6"])
def test_local_and_remote_readers_across_namespaces(pair: NetnsPair, ipv6: bool) -> None:
    with process_group("forkserver", timeout=90) as group:
        remote = {"bind": pair.bind(ipv6), "readers": [1, 2]}
        writer, handle, _, _ = start_writer(group, pair, 3, remote, PLAN)
        local = group.start(in_netns, pair.writer_ns, reader_check_plan, handle, 0, 11, PLAN)
        far = [
            group.start(
                in_netns,
                pair.reader_ns,
                remote_reader_plan,
                handle,
                i,
                11,
                PLAN,
                {"allow_pickle": True},
            )
            for i in (1, 2)
        ]
        group.result(writer)
        assert group.result(local)["digest"] == plan_digest(PLAN)
        for child in far:
            result = group.result(child)
            assert result["network"], "a reader in another namespace took the network path"
            assert result["digest"] == plan_digest(PLAN)


def test_a_slow_remote_reader_throttles_the_writer_across_namespaces(pair: NetnsPair) -> None:
    plan = [(RAW, 2000)] * 60
    window = {"window_messages": 4, "window_bytes": 64 << 10}
    with process_group("forkserver", timeout=90) as group:
        writer, handle, _, _ = start_writer(group, pair, 1, {"bind": pair.bind(), **window}, plan)
        slow = group.start(in_netns, pair.reader_ns, remote_reader_plan, handle, 0, 11, plan,
                           {"slow": 0.02})  # fmt: skip
        result = group.result(writer)
        assert group.result(slow)["digest"] == plan_digest(plan)
    assert result["most_in_flight"] <= window["window_messages"]
    assert result["most_in_flight_bytes"] <= window["window_bytes"]
    assert result["elapsed"] >= (len(plan) - 8 - 4 - 1) * 0.02 * 0.9


@pytest.mark.parametrize("policy", ["raise", "drop"])
def test_a_remote_reader_killed_across_namespaces(pair: NetnsPair, policy: str) -> None:
    plan = [(RAW, 1000)] * 300
    with process_group("forkserver", timeout=90) as group:
        remote = {"bind": pair.bind(), "readers": [1], "window_messages": 8}
        geometry = {**SMALL, "on_dead_reader": policy}
        writer, handle, _, _ = start_writer(group, pair, 2, remote, plan, "until-broken",
                                            geometry)  # fmt: skip
        local = group.start(in_netns, pair.writer_ns, remote_reader_until_broken, handle, 0, {})
        hold, hold_child = group.back_channel()
        victim = group.start(in_netns, pair.reader_ns, remote_reader_read_and_hold, handle, 1, 5,
                             hold_child, {})  # fmt: skip
        assert hold.poll(60) and hold.recv() == "read"
        group.kill(victim)
        result = group.result(writer)
        got = group.result(local)
    if policy == "raise":
        assert result["peer"] == "reader 1" and result["blocked_s"] < 5.0
        assert got["error"] == "QueueClosed" and len(got["got"]) == result["sent"]
    else:
        assert result["sent"] == len(plan) and result["peer"] is None
        assert got["error"] == "QueueClosed" and len(got["got"]) == len(plan)


def test_the_writer_killed_across_namespaces(pair: NetnsPair) -> None:
    """The writer sends, the remote reader has it all, the writer is killed: both readers
    raise QueueBroken naming the writer after everything they received (the remote one within
    about dead_after).  (Messages still on their way when a writer dies are lost with it: a
    reset connection drops them; the remote reader then raises after what did arrive.)"""
    plan = [(RAW, 500)] * 30
    with process_group("forkserver", timeout=90) as group:
        writer, handle, report, control = start_writer(group, pair, 2, {"bind": pair.bind()},
                                                       plan, "die")  # fmt: skip
        local = group.start(in_netns, pair.writer_ns, remote_reader_until_broken, handle, 0, {})
        arrived, arrived_child = group.back_channel()
        far = group.start(in_netns, pair.reader_ns, remote_reader_until_broken, handle, 1, {},
                          arrived_child, len(plan))  # fmt: skip
        assert report.poll(60) and report.recv() == "sent"
        assert arrived.poll(60) and arrived.recv() == "got"
        control.send("die")
        far_result, local_result = group.result(far), group.result(local)
        assert group.join(writer) == -signal.SIGKILL
    for got in (far_result, local_result):
        assert got["error"] == "QueueBroken" and got["peer"] == "writer"
        assert len(got["got"]) == len(plan)  # everything it sent, then the error
    assert far_result["after"] < 5.0


def test_curve_across_namespaces(pair: NetnsPair, tmp_path: Path) -> None:
    from shmcast._tools.cli import main as cli_main

    for name in ("writer", "reader"):
        assert cli_main(["keygen", str(tmp_path), name]) == 0
    trusted = tmp_path / "trusted"
    trusted.mkdir()
    (trusted / "reader.key").write_bytes((tmp_path / "reader.key").read_bytes())
    remote = {"bind": pair.bind(), "server_key": str(tmp_path / "writer.key_secret"),
              "client_keys": str(trusted)}  # fmt: skip
    plan = [(OBJECT, 100), (RAW, 50_000)] * 10
    with process_group("forkserver", timeout=90) as group:
        writer, handle, _, _ = start_writer(group, pair, 1, remote, plan)
        far = group.start(in_netns, pair.reader_ns, remote_reader_plan, handle, 0, 11, plan,
                          {"key": str(tmp_path / "reader.key_secret")})  # fmt: skip
        group.result(writer)
        result = group.result(far)
    assert result["network"] and result["digest"] == plan_digest(plan)
