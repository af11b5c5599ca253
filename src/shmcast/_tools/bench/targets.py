"""The performance targets: how shmcast-futex stands against each, per round and over the run.

Each target is a row computed from the run's results alone (nothing is hard-coded but the
thresholds):

- *best in its cell* (latency p50 and p99, paced and saturated; throughput per reader; the
  engine scenario): the advantage factor (> 1: shmcast better, as in ``report.py``) over vLLM's
  queue and over the best other comparator, in each round and between the medians of the
  rounds; met when both factors between the medians reach the threshold (1, or 2.5 against
  vLLM in the engine scenario);
- *1 MiB against memcpy*: MB/s per reader as a share of this machine's single-threaded memcpy
  from memory measured in the same run; met from 0.8;
- *wake-up against the C floor*: the wake-up latency over the bare C futex wake-up
  (``floor.py``) measured in the same round; met up to 3;
- *idle CPU*: the CPU seconds the busiest reader used while idle; met up to 0.01;
- *asyncio* (when ``shmcast-async`` ran): ``get_async``'s latency p50 over the sync reader's
  (met up to 1.5), the thread pool's (``shmcast-executor``) over ``get_async``'s (met from 2),
  and the awaiting reader's idle CPU over the sync reader's (met up to 1).

A cell that did not run or did not verify has no figure ("-") and is not met.
"""

from __future__ import annotations

import statistics
from typing import Any

OURS = "shmcast-futex"
#: (workload, metric, label, threshold against vLLM)
BEST_IN_CELL = [
    ("latency", "p50_us", "p50", 1.0),
    ("latency", "p99_us", "p99", 1.0),
    ("saturated", "p50_us", "p50", 1.0),
    ("saturated", "p99_us", "p99", 1.0),
    ("throughput", "msgs_per_s_per_reader", "msg/s = MB/s", 1.0),
    ("engine", "steps_per_s", "steps/s", 2.5),
]
MEMCPY_SHARE = 0.8
WAKE_FACTOR = 3.0
IDLE_CPU_S = 0.01
ASYNC = "shmcast-async"
EXECUTOR = "shmcast-executor"
#: (workload, metric, label, numerator, denominator, need, higher is met)
ASYNC_FACTORS = [
    ("latency", "p50_us", "latency p50 async / sync", ASYNC, OURS, 1.5, False),
    ("latency", "p50_us", "latency p50 thread pool / async", EXECUTOR, ASYNC, 2.0, True),
    ("idle_cpu", "reader_cpu_s_max", "idle CPU async / sync", ASYNC, OURS, 1.0, False),
]


def _round_count(doc: dict[str, Any]) -> int:
    return max(1, int(doc.get("settings", {}).get("rounds", 1)))


def _ours(doc: dict[str, Any], workload: str, variant: str, readers: int,
          round_index: int | None, impl: str = OURS) -> dict[str, Any] | None:  # fmt: skip
    """``impl``'s verified case (of one round, or the medians when ``round_index`` is
    None); shmcast-futex's by default."""
    from .report import merge_rounds

    cases = [
        c for c in doc["cases"]
        if c["impl"] == impl and c.get("net", "local") == "local" and c["workload"] == workload
        and c["variant"] == variant and c["readers"] == readers
        and (round_index is None or c["round"] == round_index)
    ]  # fmt: skip
    if not cases:
        return None
    case = merge_rounds(cases)[0] if round_index is None else cases[0]
    return case if case["status"] == "ok" else None


def _ratio(ratios: list[dict[str, Any]], workload: str, variant: str, readers: int,
           metric: str) -> dict[str, Any] | None:  # fmt: skip
    for r in ratios:
        if (r["impl"], r["net"], r["workload"], r["variant"], r["readers"], r["metric"]) == (
            OURS, "local", workload, variant, readers, metric
        ):  # fmt: skip
            return r
    return None


def _cells(doc: dict[str, Any], workload: str) -> list[tuple[str, int]]:
    """(variant, readers) of every planned case of ``workload``, in plan order."""
    seen: dict[tuple[str, int], None] = {}
    for spec in doc.get("settings", {}).get("cases", []):
        if spec["workload"] == workload:
            seen[(spec["variant"], spec["readers"])] = None
    return list(seen)


def _best_rows(doc: dict[str, Any]) -> list[dict[str, Any]]:
    rounds = _round_count(doc)
    by_round = doc.get("ratios_by_round") or [doc.get("ratios", [])]
    rows = []
    for workload, metric, label, need_vllm in BEST_IN_CELL:
        for variant, readers in _cells(doc, workload):
            median = _ratio(doc.get("ratios", []), workload, variant, readers, metric)
            per = [_ratio(by_round[r], workload, variant, readers, metric)
                   if r < len(by_round) else None for r in range(rounds)]  # fmt: skip
            vs_vllm = median["vs_vllm"] if median else None
            vs_best = median["vs_best_other"] if median else None
            met = (
                vs_vllm is not None and vs_vllm >= need_vllm
                and vs_best is not None and vs_best >= 1.0
            )  # fmt: skip
            rows.append({
                "target": f"{workload} {label}",
                "case": f"{variant} r{readers}",
                "per_round_vs_vllm": [p["vs_vllm"] if p else None for p in per],
                "vs_vllm": vs_vllm,
                "per_round_vs_best": [p["vs_best_other"] if p else None for p in per],
                "per_round_best": [p["best_other"] if p else None for p in per],
                "vs_best": vs_best,
                "best": median["best_other"] if median else None,
                "need": f"x vllm >= {need_vllm:g}, x best >= 1",
                "met": met,
            })  # fmt: skip
    return rows


def _median(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def _figure_rows(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The memcpy share, the wake-up over the floor and the idle CPU: one figure per round
    and the figure of the medians."""
    rounds = range(_round_count(doc))
    rows = []
    memcpy = doc.get("memcpy_mb_per_s") or {}
    for variant, readers in _cells(doc, "throughput"):
        if variant != "1MiB":
            continue
        reference = (memcpy.get(str(1 << 20)) or {}).get("from_memory")

        def share(case: dict[str, Any] | None, ref: float | None = reference) -> float | None:
            if case is None or not ref:
                return None
            return case["metrics"]["mb_per_s_per_reader"] / ref

        value = share(_ours(doc, "throughput", variant, readers, None))
        rows.append({
            "target": "1 MiB / memcpy from memory", "case": f"{variant} r{readers}",
            "per_round": [share(_ours(doc, "throughput", variant, readers, r)) for r in rounds],
            "value": value, "need": f">= {MEMCPY_SHARE:g}",
            "met": value is not None and value >= MEMCPY_SHARE,
        })  # fmt: skip
    floors = {f["round"]: f for f in (doc.get("wake_floor") or {}).get("rounds") or [] if f}
    for variant, readers in _cells(doc, "wakeup"):
        for metric in ("p50_us", "p99_us"):
            per = []
            for r in rounds:
                case = _ours(doc, "wakeup", variant, readers, r)
                floor = floors.get(r, {}).get(metric)
                per.append(case["metrics"][metric] / floor if case and floor else None)
            ours = _ours(doc, "wakeup", variant, readers, None)
            floor_median = _median([f.get(metric) for f in floors.values()])
            value = ours["metrics"][metric] / floor_median if ours and floor_median else None
            rows.append({
                "target": f"wake-up {metric[:3]} / C futex floor", "case": f"r{readers}",
                "per_round": per, "value": value, "need": f"<= {WAKE_FACTOR:g}",
                "met": value is not None and value <= WAKE_FACTOR,
            })  # fmt: skip
    for variant, readers in _cells(doc, "idle_cpu"):
        per = []
        for r in rounds:
            case = _ours(doc, "idle_cpu", variant, readers, r)
            per.append(case["metrics"].get("reader_cpu_s_max") if case else None)
        ours = _ours(doc, "idle_cpu", variant, readers, None)
        value = ours["metrics"].get("reader_cpu_s_max") if ours else None
        rows.append({
            "target": "idle CPU s, busiest reader", "case": f"r{readers}",
            "per_round": per, "value": value, "need": f"<= {IDLE_CPU_S:g}",
            "met": value is not None and value <= IDLE_CPU_S,
        })  # fmt: skip
    return rows


def _quotient(doc: dict[str, Any], cell: tuple[str, str, int], metric: str, top: str,
              bottom: str, round_index: int | None) -> float | None:  # fmt: skip
    """``top``'s ``metric`` over ``bottom``'s in ``cell`` (workload, variant, readers); None
    where either has no such figure (or ``bottom``'s is 0)."""
    num, den = _ours(doc, *cell, round_index, top), _ours(doc, *cell, round_index, bottom)
    over = num["metrics"].get(metric) if num else None
    under = den["metrics"].get(metric) if den else None
    if over is None or not under:
        return None
    return over / under


def _both_ran(doc: dict[str, Any], cell: tuple[str, str, int], top: str, bottom: str) -> bool:
    """Whether ``top`` and ``bottom`` both have a case (verified or not) in ``cell``."""
    ran = {
        c["impl"] for c in doc["cases"]
        if c.get("net", "local") == "local"
        and (c["workload"], c["variant"], c["readers"]) == cell
    }  # fmt: skip
    return top in ran and bottom in ran


def _async_rows(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The asyncio reader's factors (ASYNC_FACTORS), per round and between the medians, for
    every cell where both implementations of a factor ran."""
    rounds = range(_round_count(doc))
    rows = []
    for workload, metric, label, top, bottom, need, higher in ASYNC_FACTORS:
        for variant, readers in _cells(doc, workload):
            cell = (workload, variant, readers)
            if not _both_ran(doc, cell, top, bottom):
                continue
            per = [_quotient(doc, cell, metric, top, bottom, r) for r in rounds]
            value = _quotient(doc, cell, metric, top, bottom, None)
            met = value is not None and (value >= need if higher else value <= need)
            rows.append({
                "target": label, "case": f"{variant} r{readers}", "per_round": per,
                "value": value, "need": f"{'>=' if higher else '<='} {need:g}", "met": met,
            })  # fmt: skip
    return rows


def compute_targets(doc: dict[str, Any]) -> dict[str, Any]:
    """Every target row of the run (recorded in the JSON as ``targets``)."""
    best = _best_rows(doc)
    figures = _figure_rows(doc) + _async_rows(doc)
    return {
        "impl": OURS,
        "rounds": _round_count(doc),
        "best_in_cell": best,
        "figures": figures,
        "met": sum(r["met"] for r in best + figures),
        "total": len(best) + len(figures),
    }


def _per_round(values: list[Any], fmt: Any) -> str:
    return "/".join(fmt(v) for v in values)


def format_targets(targets: dict[str, Any]) -> list[str]:
    """The targets as two plain-text tables (empty when the run had none)."""
    from .report import _fmt, _table

    if not targets["total"]:
        return []
    out = [
        f"== targets: {targets['impl']} per round (r1/r2/...) and between the medians of "
        f"{targets['rounds']} round(s); x vllm, x best > 1: shmcast better; other rows: "
        f"against their need; {targets['met']} of {targets['total']} met ==",
    ]
    if targets["best_in_cell"]:
        headers = ["target", "case", "x vllm per round", "x vllm", "x best per round", "x best",
                   "best other", "need", "met"]  # fmt: skip
        rows = [
            [
                r["target"], r["case"], _per_round(r["per_round_vs_vllm"], _fmt),
                _fmt(r["vs_vllm"]), _per_round(r["per_round_vs_best"], _fmt), _fmt(r["vs_best"]),
                r["best"] or "-", r["need"], "yes" if r["met"] else "NO",
            ]
            for r in targets["best_in_cell"]
        ]  # fmt: skip
        out += [_table(headers, rows), ""]
    if targets["figures"]:
        headers = ["target", "case", "per round", "of the medians", "need", "met"]
        rows = [
            [r["target"], r["case"], _per_round(r["per_round"], _fmt), _fmt(r["value"]),
             r["need"], "yes" if r["met"] else "NO"]
            for r in targets["figures"]
        ]  # fmt: skip
        out += [_table(headers, rows), ""]
    return out
