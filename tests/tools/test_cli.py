"""The command line and the demo, end to end.

``shmcast demo`` runs in a subprocess (its own session, so that on a timeout the whole process
group, readers included, is killed); ``run_demo`` is also called directly.  Every run uses small
counts: these tests check that every message arrives intact and that failures are reported,
never how fast.
"""

from __future__ import annotations

import io
import os
import re
import signal
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from _procs import run_command

import shmcast
from shmcast._tools import demo
from shmcast._tools.cli import SUBCOMMANDS, main
from shmcast._tools.demo import RAW_HEADER, MessagePlan, format_report, run_demo

TIMEOUT = 90  # seconds for one demo run (below pytest's own 120 s, so that this kills first)
SMALL = ["--readers", "2", "--slots", "8", "--slot-size", "16K", "--stall-timeout", "20"]
WAIT_POLICIES = ["futex", "spin", "backoff", "idle"]


def run_cli(*args: str, timeout: float = TIMEOUT, env: dict[str, str] | None = None):
    """Run ``python -m shmcast ARGS``; kill its whole process group if it overruns."""
    return run_command([sys.executable, "-m", "shmcast", *args], timeout, env=env)


def segment_of(output: str) -> str:
    """The demo's segment name, from its header line."""
    m = re.search(r"/dev/shm/(shmcast-[0-9a-f]+)", output)
    assert m, f"no segment name in the demo's output:\n{output}"
    return m.group(1)


def assert_demo_ok(proc: subprocess.CompletedProcess, messages: int) -> None:
    report = proc.stdout + proc.stderr
    assert proc.returncode == 0, report
    assert f"OK: every reader received all {messages} messages in order" in proc.stdout, report
    assert "Traceback" not in report, report
    assert not Path("/dev/shm", segment_of(proc.stdout)).exists(), "segment left behind"


# -- the command line ----------------------------------------------------------------------


def test_version():
    proc = run_cli("--version", timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"shmcast {shmcast.__version__}"


def test_output_to_a_pipe_closed_early_ends_quietly():
    """``shmcast ls | head -1``: the reader of the output goes away; the command ends with
    141 (128 + SIGPIPE, as a shell reports a writer killed by it), no traceback."""
    script = Path(sys.executable).parent / "shmcast"
    proc = subprocess.Popen([str(script), "bench", "--list"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)  # fmt: skip
    try:
        proc.stdout.close()  # before the command writes anything
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 141, err
    assert b"Traceback" not in err and b"Exception ignored" not in err, err


def test_help_lists_every_subcommand():
    proc = run_cli("--help", timeout=60)
    assert proc.returncode == 0, proc.stderr
    for name in SUBCOMMANDS:
        assert name in proc.stdout


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "shmcast"
    if not script.exists():
        pytest.fail(f"the console script is missing next to {sys.executable}: reinstall")
    proc = subprocess.run(
        [str(script), "--version"], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0 and shmcast.__version__ in proc.stdout, proc.stderr


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["no-such-command"],
        ["demo", "--readers", "0"],
        ["demo", "--readers", "many"],
        ["demo", "--messages", "-5"],
        ["demo", "--seconds", "0"],
        ["demo", "--wait", "sleepy"],
        ["demo", "--slot-size", "100"],
        ["demo", "--slot-size", "lots"],
        ["demo", "--start-method", "teleport"],
        ["demo", "--no-such-option"],
        ["demo", "--readers", "2", "--kill-reader", "2"],
    ],
    ids=lambda a: " ".join(a) or "(nothing)",
)
def test_bad_arguments_exit_2(args):
    proc = run_cli(*args, timeout=60)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "error:" in proc.stderr
    assert "usage:" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_limit_only_the_queue_knows_is_a_usage_error():
    proc = run_cli("demo", "--readers", "100000", timeout=60)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "n_readers" in proc.stderr and "Traceback" not in proc.stderr


def test_main_returns_codes_instead_of_exiting(capsys):
    assert main(["--version"]) == 0
    assert main(["demo", "--wait", "nope"]) == 2
    assert "invalid choice" in capsys.readouterr().err


# -- the demo, end to end -------------------------------------------------------------------


def test_demo_small_run():
    proc = run_cli("demo", "--messages", "400", *SMALL)
    assert_demo_ok(proc, 400)
    # The table: one row per reader, every one ok, with latency figures.
    rows = [line.split() for line in proc.stdout.splitlines() if line.rstrip().endswith(" ok")]
    assert [row[0] for row in rows] == ["0", "1"], proc.stdout
    for row in rows:
        assert row[2] == "400", row  # messages
        assert row[5] == "0", row  # errors
    assert "msg/s" in proc.stdout and "MB/s" in proc.stdout


@pytest.mark.parametrize("wait", WAIT_POLICIES)
def test_demo_under_each_wait_policy(wait):
    proc = run_cli("demo", "--wait", wait, "--messages", "150", *SMALL)
    assert_demo_ok(proc, 150)
    assert f"wait policy {wait}" in proc.stdout


def test_demo_with_spawn_start_method_and_a_time_limit():
    proc = run_cli("demo", "--start-method", "spawn", "--seconds", "1.5", *SMALL)
    sent = re.search(r"OK: every reader received all (\d+) messages in order", proc.stdout)
    assert sent, proc.stdout + proc.stderr
    assert_demo_ok(proc, int(sent.group(1)))
    assert "start method spawn" in proc.stdout
    # Not a terminal: progress comes as plain lines (at least one in 1.5 s), no escapes.
    assert re.search(r"^\s+\d+\.\d s\s+sent\s+[\d,]+ messages", proc.stdout, re.MULTILINE)
    assert "\r" not in proc.stdout and "\x1b[" not in proc.stdout


def test_demo_runs_without_numpy():
    """Nothing of the CLI or the demo may need numpy: block its import in the writer."""
    code = (
        "import sys; sys.modules['numpy'] = None\n"
        "from shmcast._tools.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    args = ["demo", "--messages", "120", *SMALL]
    proc = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert_demo_ok(proc, 120)
    assert "numpy arrays: no" in proc.stdout
    assert "ndarray" not in proc.stdout


def test_demo_with_numpy_sends_arrays():
    pytest.importorskip("numpy")  # an optional dependency; the test extra installs it
    proc = run_cli("demo", "--messages", "50", *SMALL)
    assert_demo_ok(proc, 50)
    assert "numpy arrays: yes" in proc.stdout
    # The opening tour sends one message of every kind, arrays included.
    assert re.search(r"ndarray f32 128x256 [1-9]", proc.stdout), proc.stdout


def test_demo_reports_a_killed_reader_and_fails():
    proc = run_cli("demo", "--messages", "3000", "--readers", "3", "--kill-reader", "1", "-q")
    report = proc.stdout + proc.stderr
    assert proc.returncode == 1, report
    assert "FAILED:" in proc.stdout, report
    assert re.search(r"QueueBroken: reader 1 \(pid \d+\)", proc.stdout), report
    assert re.search(r"reader 1 \(pid \d+\) died without reporting \(killed by SIGKILL\)", report)
    assert "Traceback" not in report
    assert not Path("/dev/shm", segment_of(proc.stdout)).exists(), "segment left behind"


# -- run_demo, called directly --------------------------------------------------------------


def test_run_demo_returns_a_result():
    # 'fork': spawn and forkserver would leave multiprocessing's helper processes (the fork
    # server, the resource tracker) running in the test process; the subprocess tests above
    # cover those start methods.
    out = io.StringIO()
    result = run_demo(
        readers=2,
        messages=200,
        n_slots=8,
        slot_size=16 * 1024,
        start_method="fork",
        stall_timeout=20,
        out=out,
    )
    assert result.ok, format_report(result)
    assert result.verdict == "OK: every reader received all 200 messages in order"
    assert result.messages == 200 and not result.failures and not result.interrupted
    assert sum(result.kinds.values()) == 200
    assert set(result.kinds) == {
        k.name for k in MessagePlan(8, 16 * 1024, result.config.numpy).kinds
    }
    assert result.bytes > 0 and result.seconds > 0 and result.msgs_per_s > 0
    for reader in result.readers:
        assert reader.ok and reader.reported and reader.exitcode == 0
        assert reader.messages == 200 and reader.errors == 0 and reader.end_count == 200
        assert reader.bytes == result.bytes
        assert 0 < reader.latency_p50_us <= reader.latency_p99_us <= reader.latency_max_us
        assert reader.latency_samples == 200
    assert not Path("/dev/shm", result.segment).exists()
    assert "shmcast demo: 1 writer" in out.getvalue()
    assert result.verdict in format_report(result)


def test_run_demo_rejects_a_bad_configuration():
    with pytest.raises(ValueError, match="wait policy"):
        run_demo(wait="nope")
    with pytest.raises(ValueError, match="multiple of 64"):
        run_demo(slot_size=1000)
    with pytest.raises(ValueError, match="reader index"):
        run_demo(readers=2, kill_reader=5)


# -- the verification itself can fail -------------------------------------------------------


def raw_message(plan: MessagePlan, seq: int, payload: bytes, crc: int | None = None) -> bytes:
    crc = zlib.crc32(payload) if crc is None else crc
    return RAW_HEADER.pack(seq, 0, crc, plan.index_of(seq)) + payload


def test_check_message_accepts_good_and_catches_damaged_messages():
    plan = MessagePlan(8, 16 * 1024, numpy=False)
    seq = next(s for s in range(100) if plan.kind_of(s).form == "raw")
    size = plan.kind_of(seq).size
    payload = os.urandom(size)
    good = memoryview(raw_message(plan, seq, payload))
    assert demo._check_message(good, seq, plan)[3] == ""

    damaged = bytearray(good)
    damaged[-1] ^= 0x01
    assert "checksum" in demo._check_message(memoryview(damaged), seq, plan)[3]
    short = memoryview(raw_message(plan, seq, payload[:-64]))
    assert "bytes, expected" in demo._check_message(short, seq, plan)[3]
    assert "no header" in demo._check_message(memoryview(b"abc"), seq, plan)[3]

    dict_seq = next(s for s in range(100) if plan.kind_of(s).form == "dict")
    body = demo.make_dict(dict_seq)
    crc = zlib.crc32(demo.dict_bytes(body))
    envelope = (dict_seq, 0, crc, plan.index_of(dict_seq), body)
    assert demo._check_message(envelope, dict_seq, plan)[3] == ""
    body["ratio"] += 1
    assert "checksum" in demo._check_message(envelope, dict_seq, plan)[3]
    wrong_kind = (dict_seq, 0, crc, plan.index_of(seq), body)
    assert "kind index" in demo._check_message(wrong_kind, dict_seq, plan)[3]


def test_check_message_catches_a_damaged_array():
    np = pytest.importorskip("numpy")
    plan = MessagePlan(8, 16 * 1024, numpy=True)
    seq = next(s for s in range(100) if plan.kind_of(s).form == "ndarray")
    kind = plan.kind_of(seq)
    arr = np.arange(np.prod(kind.shape), dtype=kind.dtype).reshape(kind.shape)
    envelope = (seq, 0, zlib.crc32(arr), plan.index_of(seq), arr)
    assert demo._check_message(envelope, seq, plan)[3] == ""
    arr.flat[7] += 1
    assert "checksum" in demo._check_message(envelope, seq, plan)[3]
    wrong_shape = (seq, 0, 0, plan.index_of(seq), arr.reshape(-1))
    assert "not the" in demo._check_message(wrong_shape, seq, plan)[3]


def test_plan_opens_with_one_message_of_every_kind():
    plan = MessagePlan(8, 16 * 1024, numpy=True)
    tour = [plan.kind_of(s).name for s in range(len(plan.kinds))]
    assert tour == [k.name for k in plan.kinds]
    cycle = [plan.kind_of(s).name for s in range(len(plan.kinds), len(plan.kinds) + 1000)]
    for kind in plan.kinds:
        assert cycle.count(kind.name) == kind.weight
    capacity = 8 * 16 * 1024
    assert any(k.size > capacity for k in plan.kinds), "no message larger than the ring"
    assert any(16 * 1024 < k.size <= capacity for k in plan.kinds), "no multi-slot message"


def test_progress_redraws_one_line_on_a_terminal():
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    screen = Terminal()
    progress = demo._Progress(screen, enabled=True)
    progress.update(10, 1000, progress.started + 1.0)
    progress.update(20, 2000, progress.started + 2.0)
    progress.finish()
    text = screen.getvalue()
    assert text.count("\r") == 2 and text.count("\x1b[K") == 2 and text.endswith("\n")
    assert text.count("\n") == 1


def test_latency_samples_are_decimated_not_unbounded():
    lat = demo._Latencies(cap=100)
    for ns in range(1, 1001):
        lat.add(ns)
    assert lat.max == 1000 and len(lat.samples) < 100 and lat.seen == 1000
    assert struct.calcsize("q") * len(lat.samples) == len(lat.samples.tobytes())


def valid_message(plan: MessagePlan, seq: int):
    """Message ``seq`` as the writer sends it and a reader sees it (numpy-free plan)."""
    kind = plan.kind_of(seq)
    if kind.form == "dict":
        body = demo.make_dict(seq)
        return (seq, 0, zlib.crc32(demo.dict_bytes(body)), plan.index_of(seq), body)
    return memoryview(raw_message(plan, seq, os.urandom(kind.size)))


def test_verifier_counts_lost_repeated_and_undecodable_messages():
    plan = MessagePlan(8, 16 * 1024, numpy=False)
    good = demo._Verifier(plan)
    for seq in range(12):
        good.receive(valid_message(plan, seq), now_ns=1000)
    good.receive((demo.END_OF_STREAM, 12, 0, 0, None), now_ns=1000)
    assert (good.messages, good.errors, good.end_count) == (12, 0, 12)
    assert good.latencies.seen == 12

    bad = demo._Verifier(plan)
    for seq in [0, 1, 3, 3, 4]:  # #2 lost, #3 delivered twice
        bad.receive(valid_message(plan, seq), now_ns=1000)
    bad.undecodable(ValueError("garbage"))
    assert bad.messages == 6 and bad.errors == 3
    assert bad.error_samples == [
        "expected message #2, got #3",
        "expected message #4, got #3",
        "message #5 could not be decoded: garbage",
    ]
    report = bad.report(0, "closed")
    assert report["errors"] == 3 and report["end_count"] is None


def test_demo_remote_reader_gets_every_message():
    """One reader receives over the network: from another network namespace where the
    machine allows it, else over loopback (the header says which)."""
    pytest.importorskip("zmq")
    proc = run_cli("demo", "--remote", "--messages", "300", "--no-numpy", *SMALL)
    assert_demo_ok(proc, 300)
    assert "remote: reader 1 " in proc.stdout
    assert "network namespace" in proc.stdout or "loopback" in proc.stdout
