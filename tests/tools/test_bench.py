"""Tests of the benchmark harness (``shmcast bench``), in quick mode.

- a run of shmcast and multiprocessing.Queue over a tiny workload set writes the documented
  JSON, and every implementation verified every message;
- an implementation that loses messages, and one that reorders them, are flagged, not ranked;
- an implementation that hangs is reported as a hang within its time limit, and nothing it
  started is left: no process of its group, no shared-memory segment;
- the report places each case (the core-to-core round trip around it) and compares large
  messages with this machine's memcpy;
- the probes beside the harness run: ``call_costs.py`` (warm and cold), ``wake_floor.c``,
  ``wake_layers.py`` and ``aio_one_loop.py``;
- the saturated latency workload bounds the messages in flight per reader by the harness's
  credits, and the targets table gives each target per round and between the medians;
- iceoryx2 (where its wheel is installed) runs every workload kind verified, through its own
  reply path; its message framing rejects malformed samples.

The fake implementations below are adapters like the real ones; the harness's leader process
imports this module to run them (``--impl test_bench:ClassName``).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from shmcast._liveness import all_stat_fields
from shmcast._tools import bench
from shmcast._tools.bench import adapters, floor, iceoryx2_adapter, report, targets
from shmcast._tools.bench.adapters import (
    MultiprocessingQueueAdapter,
    Reader,
    ShmcastAdapter,
    Writer,
)
from shmcast._tools.bench.memcpy import memcpy_bandwidth
from shmcast._tools.bench.stats import SequenceCheck, percentile
from shmcast._tools.bench.workloads import Credits

# -- fake implementations ------------------------------------------------------------------------


class _FilteringWriter(Writer):
    """Wraps a real writer; ``plan(n)`` says what to do with the n-th message sent."""

    def __init__(self, inner: Writer, plan: Any) -> None:
        self.inner = inner
        self.plan = plan
        self.count = 0
        self.held: list[tuple[Any, bool]] = []

    def reader_handle(self, index: int) -> Any:
        return self.inner.reader_handle(index)

    def wait_ready(self, timeout: float) -> None:
        self.inner.wait_ready(timeout)

    def send(self, obj: Any, raw: bool) -> None:
        action = self.plan(self.count)
        self.count += 1
        if action == "drop":
            return
        if action == "hold":  # send it after the next one: a swap
            self.held.append((obj, raw))
            return
        self.inner.send(obj, raw)
        while self.held:
            self.inner.send(*self.held.pop())

    def close(self) -> None:
        self.inner.close()


def _drop_some(n: int) -> str:
    return "drop" if n % 10 == 5 else "send"  # never the last of a multiple of 10


def _swap_one(n: int) -> str:
    return "hold" if n == 30 else "send"


class LossyAdapter(MultiprocessingQueueAdapter):
    """multiprocessing.Queue that silently drops one message in ten."""

    name = "fake-lossy"

    def open_writer(self, n_readers: int, max_message_bytes: int) -> Writer:
        return _FilteringWriter(super().open_writer(n_readers, max_message_bytes), _drop_some)


class ReorderingAdapter(MultiprocessingQueueAdapter):
    """multiprocessing.Queue that delivers messages 30 and 31 swapped."""

    name = "fake-reordering"

    def open_writer(self, n_readers: int, max_message_bytes: int) -> Writer:
        return _FilteringWriter(super().open_writer(n_readers, max_message_bytes), _swap_one)


class _NeverReturningReader(Reader):
    def __init__(self, attached: Reader) -> None:
        self.attached = attached  # keeps the reader attached: it holds the writer back

    def recv(self, timeout: float) -> Any:
        time.sleep(3600)  # ignores its timeout, like a lost wake-up
        return None


class HangingAdapter(ShmcastAdapter):
    """A shmcast queue whose readers never return from recv: the writer fills the ring and
    then blocks for good (a hang in the writer, holding a shared-memory segment)."""

    name = "fake-hang"

    def open_reader(self, handle: Any, index: int) -> Reader:
        return _NeverReturningReader(super().open_reader(handle, index))


class _SlowReader(Reader):
    def __init__(self, inner: Reader) -> None:
        self.inner = inner

    def recv(self, timeout: float) -> Any:
        time.sleep(0.002)  # a reader that takes 2 ms per message
        return self.inner.recv(timeout)

    def close(self) -> None:
        self.inner.close()


class SlowReaderAdapter(MultiprocessingQueueAdapter):
    """multiprocessing.Queue (unbounded) whose readers take 2 ms per message: only the
    harness's credits keep the writer from running ahead of them."""

    name = "fake-slow"

    def open_reader(self, handle: Any, index: int) -> Reader:
        return _SlowReader(super().open_reader(handle, index))


# -- helpers ----------------------------------------------------------------------------------


def bench_args(*argv: str) -> argparse.Namespace:
    """``shmcast bench ARGV`` parsed as the command line does."""
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return parser.parse_args(list(argv))


def run_bench(tmp_path: Path, *argv: str) -> tuple[int, dict[str, Any]]:
    """Run ``shmcast bench ARGV --out tmp_path`` in this process; return its exit code and the
    JSON document it wrote."""
    code = bench.run(bench_args(*argv, "--out", str(tmp_path), "--no-plots"))
    files = sorted(tmp_path.glob("bench-*.json"))
    assert len(files) == 1, files
    return code, json.loads(files[0].read_text())


def group_members(pgid: int) -> list[int]:
    """Processes (zombies included) still in process group ``pgid``."""
    return [pid for pid, fields in all_stat_fields() if int(fields[2]) == pgid]


def cases_of(doc: dict[str, Any], impl: str) -> list[dict[str, Any]]:
    return [c for c in doc["cases"] if c["impl"] == impl]


# -- unit tests of the verification --------------------------------------------------------------


def test_sequence_check_counts_gaps_reorders_and_missing_tail() -> None:
    check = SequenceCheck(expected=6)
    for seq in (0, 1, 3, 2, 4):
        check.observe(seq)
    check.finish()
    assert (check.lost, check.out_of_order, check.duplicated, check.received) == (1, 1, 0, 5)
    assert not check.ok
    assert "gap" in check.first_problem

    twice = SequenceCheck(expected=2)
    for seq in (0, 0, 1, 7):
        twice.observe(seq)
    twice.finish()
    assert (twice.lost, twice.duplicated, twice.corrupt) == (0, 1, 1)

    clean = SequenceCheck(expected=3)
    for seq in range(3):
        assert clean.observe(seq)
    clean.finish()
    assert clean.ok and clean.lost == 0


def test_placement_from_the_core_to_core_round_trips() -> None:
    def case(*ns: float | None) -> dict[str, Any]:
        return {"core_to_core_ns": list(ns)}

    cases = [case(70, 80), case(400, 380), case(75, 300), case(None, 90), case()]
    fastest = report.fastest_core_to_core(cases)
    assert fastest == 70
    kinds = [report.placement(c, fastest) for c in cases]
    assert kinds == ["near", "apart", "moved", None, None]
    assert report.fastest_core_to_core([case(), case(None, None)]) is None


def test_ratios_and_tables_show_each_side_s_placement() -> None:
    def case(impl: str, value: float, c2c: list[float]) -> dict[str, Any]:
        return {
            "impl": impl, "workload": "throughput", "variant": "1MiB", "readers": 1,
            "payload": "bytes", "size": 1 << 20, "status": "ok", "core_to_core_ns": c2c,
            "metrics": {"msgs_per_s_per_reader": value, "mb_per_s_per_reader": value},
        }  # fmt: skip

    cases = [
        case("shmcast-futex", 300.0, [70, 75]),
        case("vllm-mq", 100.0, [350, 340]),
        case("mp-queue", 50.0, [72, 330]),
    ]
    ratios = [r for r in report.compute_ratios(cases) if r["metric"] == "mb_per_s_per_reader"]
    assert len(ratios) == 1
    assert ratios[0]["vs_vllm"] == pytest.approx(3.0)
    assert ratios[0]["placement"] == {"shmcast": "near", "vllm": "apart", "best_other": "moved"}
    memcpy = {str(1 << 20): {"from_memory": 600.0, "in_cache": 1200.0}}
    doc = {"cases": cases, "implementations": {}, "ratios": ratios, "memcpy_mb_per_s": memcpy}
    text = report.format_tables(doc)
    assert "fastest 70 ns; 1 case(s) ran with the CPUs apart" in text
    assert "near/apart/moved" in text
    # shmcast's 300 MB/s is half of memcpy from memory and a quarter of memcpy in cache
    row = next(line for line in text.splitlines() if line.startswith("1MiB r1 "))
    assert row.split() == ["1MiB", "r1", "300", "600", "0.50", "1,200", "0.25", "near"]


def test_rounds_merge_into_medians_and_keep_any_failure() -> None:
    def case(impl: str, p50: float, status: str = "ok", c2c: float = 70.0) -> dict[str, Any]:
        return {
            "impl": impl, "workload": "latency", "variant": "dict", "readers": 1,
            "status": status, "core_to_core_ns": [c2c, c2c],
            "metrics": {"p50_us": p50, "p99_us": 2 * p50, "cdf": [[p50, 0.5]]},
        }  # fmt: skip

    cases = [
        case("shmcast-futex", 10.0), case("vllm-mq", 50.0),
        case("shmcast-futex", 30.0, c2c=400.0), case("vllm-mq", 40.0, status="lost"),
        case("shmcast-futex", 20.0), case("vllm-mq", 60.0),
    ]  # fmt: skip
    ours, theirs = report.merge_rounds(cases)
    assert ours["rounds"] == 3 and ours["status"] == "ok"
    assert ours["metrics"]["p50_us"] == 20.0 and ours["metrics"]["p99_us"] == 40.0
    assert ours["metrics"]["cdf"] == [[20.0, 0.5]]  # from the median round
    assert len(ours["core_to_core_ns"]) == 6
    assert report.placement(ours, 70.0) == "moved"  # apart in one round of three
    assert theirs["status"] == "lost" and theirs["rounds"] == 3  # flagged, not ranked
    ratios = report.compute_ratios(cases)
    assert ratios and all(r["vllm"] is None for r in ratios)  # vLLM's median is not compared
    assert {r["metric"]: r["value"] for r in ratios}["p50_us"] == 20.0
    single = case("mp-queue", 5.0)
    assert report.merge_rounds([single]) == [single]


def test_memcpy_reference_measures_both_figures() -> None:
    figures = memcpy_bandwidth(1 << 20, repeats=1)
    assert set(figures) == {"in_cache", "from_memory"}
    assert all(value > 0 for value in figures.values())
    with pytest.raises(ValueError, match="at least 1"):
        memcpy_bandwidth(0)


def test_percentile_interpolates() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == pytest.approx(50.5)
    assert percentile(values, 100) == 100.0
    assert percentile([7.0], 99) == 7.0


# -- end-to-end runs -------------------------------------------------------------------------------

WORKLOAD_METRICS = {
    "latency": {"p50_us", "p99_us", "p99_9_us", "max_us", "achieved_interval_us", "cdf"},
    "throughput": {"msgs_per_s_per_reader", "mb_per_s_per_reader", "mb_per_s_min_reader"},
    "wakeup": {"p50_us", "p99_us", "repetitions"},
    "idle_cpu": {"reader_cpu_s", "reader_cpu_s_mean", "window_s"},
    "engine": {"steps_per_s", "steps_completed", "step_rtt_p50_us"},
}


@pytest.mark.timeout(120)
def test_quick_run_verifies_every_message(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, doc = run_bench(
        tmp_path,
        "--quick",
        "--impl", "shmcast-futex,mp-queue",
        "--workload", "latency:dict,throughput:64B,wakeup,idle_cpu,engine",
        "--readers", "2",
        "--engine-workers", "3",
        "--engine-steps", "40",
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    assert doc["schema"] == "shmcast-bench/1"
    assert set(doc["implementations"]) == {"shmcast-futex", "mp-queue"}
    assert all(info["status"] == "ok" for info in doc["implementations"].values())
    assert len(doc["settings"]["cases"]) == 5
    assert len(doc["cases"]) == 10
    assert doc["memcpy_mb_per_s"] == {}  # no throughput case of 1 MiB or more
    for case in doc["cases"]:
        assert case["status"] == "ok", (case["impl"], case["workload"], case["detail"])
        readers = case["verification"]["readers"]
        assert len(readers) == case["readers"]
        for reader in readers:
            assert reader["ok"] and reader["received"] == case["messages"], reader
            assert reader["lost"] == reader["out_of_order"] == reader["corrupt"] == 0
        assert WORKLOAD_METRICS[case["workload"]] <= set(case["metrics"]), case["metrics"]
        assert case["elapsed_s"] < case["time_limit"]
        assert case["leaked"] == []
        assert {"busy_percent", "loadavg_1m"} <= set(case["background"])
        before, after = case["core_to_core_ns"]  # every test machine has two CPUs or more
        assert 0 < before < 1e6 and 0 < after < 1e6
    engine = [c for c in doc["cases"] if c["workload"] == "engine"]
    assert all(c["readers"] == 3 and c["metrics"]["steps_completed"] == 40 for c in engine)
    # shmcast is compared with the best other comparator; vLLM did not run, so no vLLM ratio
    ratios = [r for r in doc["ratios"] if r["impl"] == "shmcast-futex"]
    assert ratios and all(r["best_other"] == "mp-queue" for r in ratios)
    assert all(r["vllm"] is None and r["vs_vllm"] is None for r in ratios)
    assert "== latency" in out and "== engine" in out


@pytest.mark.timeout(60)
def test_rounds_run_the_plan_again_and_report_medians(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    code, doc = run_bench(
        tmp_path, "--quick", "--impl", "shmcast-futex,mp-queue", "--workload", "throughput:64B",
        "--readers", "1", "--rounds", "2",
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0 and doc["settings"]["rounds"] == 2
    assert [(c["round"], c["impl"]) for c in doc["cases"]] == [
        (0, "shmcast-futex"), (0, "mp-queue"), (1, "shmcast-futex"), (1, "mp-queue"),
    ]  # fmt: skip
    assert all(c["status"] == "ok" for c in doc["cases"])
    assert "each figure below is the median of 2 rounds" in out
    ratio = next(r for r in doc["ratios"] if r["metric"] == "msgs_per_s_per_reader")
    values = sorted(c["metrics"]["msgs_per_s_per_reader"] for c in cases_of(doc, "shmcast-futex"))
    assert ratio["value"] == pytest.approx(sum(values) / 2)
    assert bench.run(bench_args("--quick", "--rounds", "0")) == 2
    assert "--rounds must be at least 1" in capsys.readouterr().err


@pytest.mark.timeout(60)
def test_engine_with_gather_queue_replies(tmp_path: Path) -> None:
    code, doc = run_bench(
        tmp_path,
        "--quick",
        "--impl", "shmcast-backoff",
        "--workload", "engine",
        "--engine-workers", "3",
        "--engine-steps", "40",
        "--shmcast-replies", "gather",
    )  # fmt: skip
    assert code == 0
    (case,) = doc["cases"]
    assert case["status"] == "ok", case["detail"]
    assert case["metrics"]["steps_completed"] == 40
    assert doc["implementations"]["shmcast-backoff"]["config"]["reply_path"] == "one GatherQueue"


@pytest.mark.timeout(120)
def test_executor_loop_runs_vllms_shape(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    impls = "shmcast-futex,shmcast-vllm" + (",vllm-mq" if adapters.missing_modules(
        adapters.VllmMessageQueueAdapter.requires) == [] else "")  # fmt: skip
    code, doc = run_bench(
        tmp_path,
        "--quick",
        "--impl", impls,
        "--workload", "executor",
        "--executor-workers", "2,3",
        "--executor-steps", "30",
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    assert [(c.workload, c.variant, c.readers) for c in _plan_specs(doc)] == [
        ("executor", "small", 2), ("executor", "small", 3),
        ("executor", "1MiB", 2), ("executor", "1MiB", 3),
    ]  # fmt: skip
    ran = [c for c in doc["cases"] if c["impl"] in ("shmcast-futex", "shmcast-vllm", "vllm-mq")]
    assert ran, doc["implementations"]
    for case in ran:
        assert case["status"] == "ok", (case["impl"], case["detail"])
        assert case["metrics"]["steps_completed"] == 30 and case["metrics"]["steps_per_s"] > 0
        # The CPU time of every process over the timed steps; the engine's is part of it.
        cpu, engine = case["metrics"]["cpu_us_per_step"], case["metrics"]["engine_cpu_us_per_step"]
        assert 0 < engine < cpu < 1e6, case["metrics"]
        for reader in case["verification"]["readers"]:
            assert reader["ok"] and reader["received"] == 30, reader
    if doc["implementations"]["shmcast-vllm"]["status"] == "ok":
        config = doc["implementations"]["shmcast-vllm"]["config"]
        assert config["max_chunk_bytes"] == 16 * 1024 * 1024 and config["n_slots"] == 640
    else:  # the drop-in's adapter needs torch, as vLLM's processes have it
        assert doc["implementations"]["shmcast-vllm"]["status"] == "not installed"
    assert "== executor" in out and "CPU us/step" in out


def _plan_specs(doc: dict[str, Any]) -> list[Any]:
    from shmcast._tools.bench.workloads import CaseSpec

    return [CaseSpec.from_dict(c) for c in doc["settings"]["cases"]]


@pytest.mark.timeout(120)
def test_lossy_and_reordering_implementations_are_flagged_not_ranked(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    code, doc = run_bench(
        tmp_path,
        "--quick",
        "--impl", "shmcast-futex,test_bench:LossyAdapter,test_bench:ReorderingAdapter",
        "--workload", "latency:dict",
        "--readers", "2",
        "--stall-seconds", "1",
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    (ours,) = cases_of(doc, "shmcast-futex")
    (lossy,) = cases_of(doc, "fake-lossy")
    (reordering,) = cases_of(doc, "fake-reordering")
    assert ours["status"] == "ok"
    assert lossy["status"] == "lost"
    messages = lossy["messages"]
    for reader in lossy["verification"]["readers"]:
        assert reader["lost"] == messages // 10 and not reader["ok"]
    assert reordering["status"] == "reordered"
    for reader in reordering["verification"]["readers"]:
        assert (reader["out_of_order"], reader["lost"], reader["received"]) == (1, 0, messages)
    ranked = {r["best_other"] for r in doc["ratios"]}
    assert ranked == {None}, "a flagged implementation must not be a comparator"
    assert "== flagged (not ranked) ==" in out
    assert "fake-lossy" in out.split("== flagged")[1]


@pytest.mark.timeout(120)
def test_hanging_implementation_is_killed_within_its_time_limit(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    limit = 6.0
    started = time.monotonic()
    code, doc = run_bench(
        tmp_path,
        "--quick",
        "--impl", "test_bench:HangingAdapter",
        "--workload", "latency:dict",
        "--readers", "2",
        "--time-limit", str(limit),
    )  # fmt: skip
    took = time.monotonic() - started
    out = capsys.readouterr().out
    assert code == 0
    (case,) = doc["cases"]
    assert case["status"] == "hang", case
    assert "phase: running" in case["detail"]
    assert limit <= case["elapsed_s"] < limit + 3
    assert took < limit + 20  # leader start-up and the kill included
    kill = case["kill"]
    assert kill["leftover_processes"] == []  # none running when the harness looked
    deadline = time.monotonic() + 10  # and the dead ones are reaped (by init) soon after
    while group_members(kill["process_group"]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert group_members(kill["process_group"]) == []
    # shmcast's segments have no name in /dev/shm once created: with the group killed there is
    # nothing the harness had to remove (and the leak check finds no new name either).
    assert [p for p in kill["removed_resources"] if "/shmcast-" in p] == [], kill
    assert "hang" in out


# -- the probes beside the harness ---------------------------------------------------------------

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
_US = re.compile(r"put +([0-9.]+) us +get +([0-9.]+) us")


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "mode",
    [[], ["--after-sleep", "0.01", "--repetitions", "3"], ["--size", "100000", "--checksum"]],
)
def test_call_costs_probe_reports_both_calls(mode: list[str]) -> None:
    out = subprocess.run(
        [sys.executable, str(BENCHMARKS / "call_costs.py"), "--messages", "640", *mode],
        capture_output=True, text=True, timeout=100, check=True,
    ).stdout  # fmt: skip
    figures = [tuple(map(float, m.groups())) for m in _US.finditer(out)]
    assert len(figures) == 3, out  # raw bytes, reserve and view, the dict
    assert all(0 < us < 100_000 for pair in figures for us in pair), out


@pytest.mark.timeout(120)
def test_wake_floor_probe_builds_and_measures(tmp_path: Path) -> None:
    cc = shutil.which("cc") or shutil.which("gcc")
    assert cc, "a C compiler is needed to build shmcast itself"
    exe = tmp_path / "wake_floor"
    subprocess.run([cc, "-O2", "-o", str(exe), str(BENCHMARKS / "wake_floor.c")], check=True,
                   timeout=60)  # fmt: skip
    out = subprocess.run([str(exe), "0.01", "3"], capture_output=True, text=True, timeout=30,
                         check=True).stdout  # fmt: skip
    lines = out.splitlines()
    assert lines[0] == "idle 0.010 s, 3 repetitions (microseconds)"
    for line in lines[1:3]:
        figures = [float(x) for x in line.split(":", 1)[1].split()]
        assert len(figures) == 3 and all(0 <= us < 10_000_000 for us in figures), out
    bad = subprocess.run([str(exe), "1", "0"], capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "usage" in bad.stderr


@pytest.mark.timeout(120)
def test_wake_layers_probe_reports_every_layer() -> None:
    out = subprocess.run(
        [sys.executable, str(BENCHMARKS / "wake_layers.py"), "0.01", "3"],
        capture_output=True, text=True, timeout=100, check=True,
    ).stdout  # fmt: skip
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:]}
    assert set(rows) == {"c", "python", "queue"}, out
    for row in rows.values():
        median, largest = float(row[1]), float(row[3])
        assert 0 < median <= largest < 10_000_000, out


@pytest.mark.timeout(120)
@pytest.mark.parametrize("rule", [[], ["--loop-pass-every", "0"]])
def test_aio_one_loop_probe_reports_its_readers_latency(rule: list[str]) -> None:
    out = subprocess.run(
        [sys.executable, str(BENCHMARKS / "aio_one_loop.py"), "--readers", "3", "--messages",
         "60", "--warmup", "10", *rule],
        capture_output=True, text=True, timeout=100, check=True,
    ).stdout  # fmt: skip
    got = re.search(r"p50 ([0-9.]+) us +p99 ([0-9.]+) us +\((\d+) samples\)", out)
    assert got, out
    p50, p99, samples = float(got[1]), float(got[2]), int(got[3])
    assert 0 < p50 <= p99 < 10_000_000 and samples == 3 * 50, out
    assert ("0 us" if rule else "default") in out
    for wrong, says in [
        (["--messages", "5", "--warmup", "5"], "--warmup < --messages"),
        (["--loop-pass-every", "nan"], "--loop-pass-every must be"),
        (["--loop-pass-every", "-1"], "--loop-pass-every must be"),
        (["--interval-us", "nan"], "--interval-us must be"),
        (["--readers", "100000"], "n_readers must be"),
    ]:
        bad = subprocess.run([sys.executable, str(BENCHMARKS / "aio_one_loop.py"), *wrong],
                             capture_output=True, text=True, timeout=100)  # fmt: skip
        assert bad.returncode == 2 and says in bad.stderr, (wrong, bad.stderr)


@pytest.mark.timeout(180)
def test_remote_cases_run_on_loopback_and_across_namespaces(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    pytest.importorskip("zmq")
    code, doc = run_bench(
        tmp_path,
        "--remote",
        "--quick",
        "--impl", "shmcast-remote,zmq-tcp,shmcast-remote-netns,zmq-tcp-netns",
        "--workload", "latency:1KiB,throughput:64B",
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    netns = doc["implementations"]["shmcast-remote-netns"]
    if netns["status"] != "ok":  # no namespaces on this machine: said so, loopback still ran
        assert "namespace" in netns["reason"] or "root" in netns["reason"]
    ran = {c["impl"] for c in doc["cases"]}
    assert {"shmcast-remote", "zmq-tcp"} <= ran
    for case in doc["cases"]:
        assert case["status"] == "ok", (case["impl"], case["detail"])
        assert case["readers"] == 1 and case["net"] in ("loopback", "netns")
        assert all(r["ok"] for r in case["verification"]["readers"])
    ratios = [r for r in doc["ratios"] if r["impl"] == "shmcast-remote"]
    assert ratios and all(r["best_other"] == "zmq-tcp" and r["net"] == "loopback" for r in ratios)
    assert "== shmcast-remote against vLLM" in out


# -- the saturated workload, the targets, iceoryx2 ---------------------------------------------


def test_credits_bound_the_messages_in_flight() -> None:
    counters = [0, 0]
    credits = Credits(counters, window=3)
    assert [credits.blocked(seq) for seq in range(4)] == [False, False, False, True]
    credits.ack(0, 2)
    assert credits.blocked(3)  # reader 1 has taken nothing yet
    credits.ack(1, 1)
    assert not credits.blocked(3) and credits.blocked(4)
    started = time.monotonic()
    assert credits.wait(4, timeout=0.05) is False  # nobody acknowledges: it gives up
    assert 0.05 <= time.monotonic() - started < 2
    assert credits.wait(3, timeout=0.05) is True
    with pytest.raises(ValueError, match="at least 1"):
        Credits(counters, window=0)


@pytest.mark.timeout(120)
def test_saturated_latency_verifies_and_reports_the_interval(tmp_path: Path) -> None:
    code, doc = run_bench(
        tmp_path, "--quick", "--impl", "shmcast-futex,mp-queue", "--workload", "saturated",
        "--readers", "1,3",
    )  # fmt: skip
    assert code == 0
    planned = [(c.workload, c.variant, c.readers, c.interval_us, c.extra["window"])
               for c in _plan_specs(doc)]  # fmt: skip
    assert planned == [("saturated", v, n, 20.0, 10) for v in ("dict", "1KiB") for n in (1, 3)]
    assert len(doc["cases"]) == 8
    for case in doc["cases"]:
        assert case["status"] == "ok", (case["impl"], case["detail"])
        m = case["metrics"]
        assert {"p50_us", "p99_us", "p99_9_us", "cdf", "achieved_interval_us"} <= set(m)
        assert m["target_interval_us"] == 20.0 and m["achieved_interval_us"] >= 20.0 * 0.99
        assert m["window"] == 10 and m["credit_timeouts"] == 0
        for reader in case["verification"]["readers"]:
            assert reader["ok"] and reader["received"] == case["messages"] == 400
    ratios = [r for r in doc["ratios"] if r["workload"] == "saturated"]
    assert ratios and all(r["best_other"] == "mp-queue" for r in ratios)
    rows = [r for r in doc["targets"]["best_in_cell"] if r["target"].startswith("saturated")]
    assert [(r["target"], r["case"]) for r in rows] == [
        (f"saturated {p}", f"{v} r{n}") for p in ("p50", "p99") for v in ("dict", "1KiB")
        for n in (1, 3)
    ]  # fmt: skip
    assert all(r["per_round_best"] == ["mp-queue"] for r in rows)


@pytest.mark.timeout(120)
def test_saturated_credits_hold_the_writer_to_the_slowest_reader(tmp_path: Path) -> None:
    code, doc = run_bench(
        tmp_path, "--quick", "--impl", "test_bench:SlowReaderAdapter", "--workload",
        "saturated:dict", "--readers", "2", "--saturated-messages", "200",
        "--saturated-window", "2",
    )  # fmt: skip
    assert code == 0
    (case,) = doc["cases"]
    assert case["status"] == "ok", case["detail"]
    m = case["metrics"]
    # the queue is unbounded: without credits the writer would send every 20 us
    assert m["window"] == 2 and m["credit_wait_share"] > 0.5
    assert m["achieved_interval_us"] > 1500
    # a message waits behind at most one other (about 4 ms with its own 2 ms), never behind
    # the backlog of an unbounded queue (200 messages of 2 ms: 400 ms by the end)
    assert m["max_us"] < 100_000


def _case(impl: str, rnd: int, workload: str, variant: str, readers: int,
          **metrics: float) -> dict[str, Any]:  # fmt: skip
    """A verified case of a run, as the bench records it, for the target tests."""
    return {"impl": impl, "round": rnd, "workload": workload, "variant": variant,
            "readers": readers, "payload": "bytes", "size": 1 << 20, "status": "ok",
            "core_to_core_ns": [70, 70], "metrics": metrics}  # fmt: skip


def _target_doc() -> dict[str, Any]:
    case = _case
    cases = []
    for rnd, (ours, vllm, best) in enumerate([(10.0, 20.0, 12.0), (30.0, 20.0, 15.0)]):
        cases += [
            case("shmcast-futex", rnd, "saturated", "dict", 4, p50_us=ours, p99_us=ours),
            case("vllm-mq", rnd, "saturated", "dict", 4, p50_us=vllm, p99_us=vllm),
            case("iceoryx2", rnd, "saturated", "dict", 4, p50_us=best, p99_us=best),
        ]
        cases += [
            case(
                "shmcast-futex",
                rnd,
                "throughput",
                "1MiB",
                1,
                msgs_per_s_per_reader=400.0 * (rnd + 1),
                mb_per_s_per_reader=400.0 * (rnd + 1),
            )
        ]
        cases += [case("shmcast-futex", rnd, "wakeup", "dict", 1, p50_us=60.0, p99_us=90.0)]
        cases += [case("shmcast-futex", rnd, "idle_cpu", "dict", 4, reader_cpu_s_max=0.03 * rnd)]
    # fmt: on
    doc: dict[str, Any] = {
        "settings": {"rounds": 2, "cases": [
            {"workload": w, "variant": v, "readers": n} for w, v, n in
            [("saturated", "dict", 4), ("throughput", "1MiB", 1), ("wakeup", "dict", 1),
             ("idle_cpu", "dict", 4)]]},
        "cases": cases, "implementations": {},
        "memcpy_mb_per_s": {str(1 << 20): {"from_memory": 1000.0, "in_cache": 2000.0}},
        "wake_floor": {"status": "ok", "rounds": [
            {"round": 0, "p50_us": 20.0, "p99_us": 20.0}, {"round": 1, "p50_us": 30.0,
                                                         "p99_us": 45.0}]},
    }  # fmt: skip
    doc["ratios"] = report.compute_ratios(cases)
    doc["ratios_by_round"] = [report.compute_ratios([c for c in cases if c["round"] == r])
                              for r in range(2)]  # fmt: skip
    return doc


def test_targets_give_every_round_and_the_medians() -> None:
    doc = _target_doc()
    got = targets.compute_targets(doc)
    p50 = next(r for r in got["best_in_cell"] if r["target"] == "saturated p50")
    assert p50["case"] == "dict r4"
    assert p50["per_round_vs_vllm"] == [pytest.approx(2.0), pytest.approx(20 / 30)]
    assert p50["per_round_vs_best"] == [pytest.approx(1.2), pytest.approx(0.5)]
    assert p50["per_round_best"] == ["iceoryx2", "iceoryx2"]
    # medians: shmcast 20, vLLM 20, iceoryx2 13.5
    assert p50["vs_vllm"] == pytest.approx(1.0) and p50["vs_best"] == pytest.approx(13.5 / 20)
    assert p50["met"] is False
    figures = {(r["target"], r["case"]): r for r in got["figures"]}
    share = figures[("1 MiB / memcpy from memory", "1MiB r1")]
    assert share["per_round"] == [pytest.approx(0.4), pytest.approx(0.8)]
    assert share["value"] == pytest.approx(0.6) and not share["met"]
    wake = figures[("wake-up p50 / C futex floor", "r1")]
    assert wake["per_round"] == [pytest.approx(3.0), pytest.approx(2.0)]
    assert wake["value"] == pytest.approx(60 / 25) and wake["met"]
    idle = figures[("idle CPU s, busiest reader", "r4")]
    assert idle["per_round"] == [0.0, pytest.approx(0.03)] and not idle["met"]
    assert (got["met"], got["total"]) == (2, 7)  # the two wake-up rows
    doc["targets"] = got
    text = report.format_tables(doc)
    assert "2 of 7 met" in text
    assert "2.00/0.67" in text and "1.20/0.50" in text


def test_figures_are_printed_alike_on_both_sides_of_a_rounding() -> None:
    values = (999.6, 1000.0, 1234.4, 99.96, 100.0, 150.2, 9.996, 10.0, 12.34, 0.5, None)
    got = [report._fmt(v) for v in values]
    assert got == ["1,000", "1,000", "1,234", "100", "100", "150", "10.0", "10.0", "12.3",
                   "0.50", "-"]  # fmt: skip


def test_asyncio_targets_compare_the_awaiting_reader_with_the_sync_one_and_the_pool() -> None:
    cases = []
    for rnd, (sync, aio, pool) in enumerate([(40.0, 50.0, 150.0), (40.0, 70.0, 120.0)]):
        cases += [
            _case("shmcast-futex", rnd, "latency", "dict", 4, p50_us=sync),
            _case("shmcast-async", rnd, "latency", "dict", 4, p50_us=aio),
            _case("shmcast-executor", rnd, "latency", "dict", 4, p50_us=pool),
            _case("shmcast-futex", rnd, "latency", "dict", 1, p50_us=20.0),
            _case("shmcast-async", rnd, "latency", "dict", 1, p50_us=20.0),
            _case("shmcast-futex", rnd, "idle_cpu", "dict", 1, reader_cpu_s_max=0.004),
            _case("shmcast-async", rnd, "idle_cpu", "dict", 1, reader_cpu_s_max=0.002),
        ]
    doc = {
        "settings": {"rounds": 2, "cases": [
            {"workload": "latency", "variant": "dict", "readers": 4},
            {"workload": "latency", "variant": "dict", "readers": 1},
            {"workload": "idle_cpu", "variant": "dict", "readers": 1}]},
        "cases": cases,
    }  # fmt: skip
    rows = {(r["target"], r["case"]): r for r in targets.compute_targets(doc)["figures"]}
    slower = rows[("latency p50 async / sync", "dict r4")]
    assert slower["per_round"] == [pytest.approx(1.25), pytest.approx(1.75)]
    assert slower["value"] == pytest.approx(60 / 40) and slower["met"]  # 1.5: just met
    pool = rows[("latency p50 thread pool / async", "dict r4")]
    assert pool["per_round"] == [pytest.approx(3.0), pytest.approx(120 / 70)]
    assert pool["value"] == pytest.approx(135 / 60) and pool["met"]
    idle = rows[("idle CPU async / sync", "dict r1")]
    assert idle["value"] == pytest.approx(0.5) and idle["met"]
    assert rows[("latency p50 async / sync", "dict r1")]["value"] == pytest.approx(1.0)
    # no thread-pool reader with one reader: no row for it
    assert ("latency p50 thread pool / async", "dict r1") not in rows
    assert len(rows) == 5  # and the sync reader's own idle-CPU row
    # a figure missing (or a sync figure of 0): the row stays, unmet, with no value
    for case in cases:
        if case["workload"] == "idle_cpu":
            case["metrics"] = {} if case["impl"] == "shmcast-async" else {"reader_cpu_s_max": 0}
    rows = {(r["target"], r["case"]): r for r in targets.compute_targets(doc)["figures"]}
    idle = rows[("idle CPU async / sync", "dict r1")]
    assert idle["per_round"] == [None, None] and idle["value"] is None and not idle["met"]


def test_wake_floor_output_is_parsed_or_rejected(tmp_path: Path) -> None:
    out = "idle 2.000 s, 3 repetitions (microseconds)\nstore to sleeper running: 21.5 30 44.1\n"
    assert floor.parse(out) == [21.5, 30.0, 44.1]
    with pytest.raises(ValueError, match="no wake-up times"):
        floor.parse("nothing here\n")
    exe, reason = floor.build(tmp_path)
    assert exe is not None, reason
    got = floor.measure(exe, 0.01, 3)
    assert got["count"] == 3 and 0 < got["p50_us"] < 1e6, got


def test_iceoryx2_framing_round_trips_and_rejects_malformed_samples() -> None:
    np = pytest.importorskip("numpy")

    def framed(obj: Any, raw: bool) -> memoryview:
        parts = iceoryx2_adapter._encode(obj, raw)
        sizes = [memoryview(p).nbytes for p in parts]
        head = iceoryx2_adapter._HEADER.pack(ord("R" if raw else "P"), len(parts))
        head += b"".join(iceoryx2_adapter._LENGTH.pack(n) for n in sizes)
        return memoryview(head + b"".join(bytes(memoryview(p).cast("B")) for p in parts))

    assert iceoryx2_adapter._decode(framed(b"abc" * 100, True)) == b"abc" * 100
    array = np.arange(1000, dtype=np.int64)
    got = iceoryx2_adapter._decode(framed({"a": array, "b": [1, 2]}, False))
    assert got["b"] == [1, 2] and np.array_equal(got["a"], array)
    good = bytes(framed(b"xyz", True))
    for bad in (good[:4], b"Q" + good[1:], good[:-1], good + b"!"):
        with pytest.raises(ValueError):
            iceoryx2_adapter._decode(memoryview(bad))
    assert iceoryx2_adapter.buffer_size(1024) == 128
    assert iceoryx2_adapter.buffer_size(16 << 20) == 10


_NO_ICEORYX2 = adapters.missing_modules(iceoryx2_adapter.Iceoryx2Adapter.requires)


def test_iceoryx2_absent_is_listed_as_not_installed(tmp_path: Path) -> None:
    if not _NO_ICEORYX2:
        pytest.skip("iceoryx2 is installed here: its runs are tested below")
    code, doc = run_bench(tmp_path, "--quick", "--impl", "iceoryx2", "--workload",
                          "latency:dict")  # fmt: skip
    assert code == 0 and doc["cases"] == []
    info = doc["implementations"]["iceoryx2"]
    assert info["status"] == "not installed"
    assert info["reason"].startswith("cannot import iceoryx2; install the bench extra")


@pytest.mark.skipif(bool(_NO_ICEORYX2), reason="iceoryx2 is not installed (the bench extra "
                    "and benchmarks/README.md's .venv-bench recipe install it)")  # fmt: skip
@pytest.mark.timeout(180)
def test_iceoryx2_runs_every_workload_kind_verified(tmp_path: Path) -> None:
    code, doc = run_bench(
        tmp_path, "--quick", "--impl", "iceoryx2", "--readers", "2",
        "--workload", "latency:1KiB,saturated:dict,throughput:64B,throughput:numpy-16MiB,"
        "idle_cpu,engine,executor:small",
        "--engine-workers", "3", "--engine-steps", "40", "--executor-workers", "2",
        "--executor-steps", "30",
    )  # fmt: skip
    assert code == 0
    info = doc["implementations"]["iceoryx2"]
    assert info["status"] == "ok" and "iceoryx2" in info["versions"]
    assert "publisher per worker" in info["config"]["reply_path"]
    assert len(doc["cases"]) == 7
    for case in doc["cases"]:
        assert case["status"] == "ok", (case["workload"], case["detail"])
        assert case["leaked"] == []
        for reader in case["verification"]["readers"]:
            assert reader["ok"] and reader["received"] == case["messages"], reader
    steps = {c["workload"]: c["metrics"].get("steps_completed") for c in doc["cases"]}
    assert steps["engine"] == 40 and steps["executor"] == 30


@pytest.mark.timeout(120)
def test_asyncio_readers_run_the_reader_workloads(tmp_path: Path) -> None:
    code, doc = run_bench(
        tmp_path,
        "--quick",
        "--impl", "shmcast-async,shmcast-executor",
        "--workload", "latency:dict,throughput:64B,wakeup,idle_cpu",
        "--readers", "2",
    )  # fmt: skip
    assert code == 0
    configs = {name: info["config"]["reader"] for name, info in doc["implementations"].items()}
    assert configs == {
        "shmcast-async": "await queue.get_async(timeout)",
        "shmcast-executor": "await loop.run_in_executor(None, queue.get, timeout)",
    }
    # Only the workloads with an asyncio reader run: throughput does not.
    ran = sorted((c["impl"], c["workload"]) for c in doc["cases"])
    assert ran == sorted((impl, w) for impl in configs for w in ("latency", "wakeup", "idle_cpu"))
    for case in doc["cases"]:
        assert case["status"] == "ok", (case["impl"], case["workload"], case["detail"])
        for reader in case["verification"]["readers"]:
            assert reader["ok"] and reader["received"] == case["messages"], reader
        assert WORKLOAD_METRICS[case["workload"]] <= set(case["metrics"]), case["metrics"]
        assert case["leaked"] == []
