"""Results: the JSON document, the terminal tables, the ratios and the PNG plots.

Only cases whose every reader verified every message (status ``ok``) are ranked and enter the
ratios; the others appear in the tables with their status (lost, reordered, corrupt, hang,
error) and their first problem.  Ratios are *advantage factors*: how many times better
shmcast is than the other implementation on that metric (other/shmcast for lower-is-better
metrics, shmcast/other for higher-is-better ones), so > 1 always means shmcast is better.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

SCHEMA = "shmcast-bench/1"
VLLM = "vllm-mq"
#: vLLM's queue on each network a case can run on: shared memory ("local"), or its remote
#: path over loopback or across network namespaces (``remote_adapters.py``).
VLLM_BY_NET = {"local": VLLM, "loopback": "vllm-mq-remote", "netns": "vllm-mq-remote-netns"}
#: The shmcast implementation each ratio table is about, per network.
SHMCAST_BY_NET = {"local": "shmcast-futex", "loopback": "shmcast-remote",
                  "netns": "shmcast-remote-netns"}  # fmt: skip

#: workload -> [(metric key, label, higher is better)]
METRICS: dict[str, list[tuple[str, str, bool]]] = {
    "latency": [
        ("p50_us", "p50 us", False),
        ("p99_us", "p99 us", False),
        ("p99_9_us", "p99.9 us", False),
        ("max_us", "max us", False),
    ],
    "saturated": [
        ("p50_us", "p50 us", False),
        ("p99_us", "p99 us", False),
        ("p99_9_us", "p99.9 us", False),
        ("max_us", "max us", False),
    ],
    "throughput": [
        ("msgs_per_s_per_reader", "msg/s/reader", True),
        ("mb_per_s_per_reader", "MB/s/reader", True),
    ],
    "wakeup": [("p50_us", "p50 us", False), ("p99_us", "p99 us", False)],
    "idle_cpu": [("reader_cpu_s_mean", "reader CPU s", False)],
    "engine": [("steps_per_s", "steps/s", True)],
    "executor": [("steps_per_s", "steps/s", True)],
}
#: extra columns shown in the tables (not ranked)
EXTRA_COLUMNS: dict[str, list[tuple[str, str]]] = {
    "latency": [("achieved_interval_us", "interval us")],
    "saturated": [("achieved_interval_us", "interval us"), ("credit_wait_share", "held back")],
    "throughput": [("mb_per_s_min_reader", "MB/s slowest")],
    "wakeup": [("count", "samples")],
    "idle_cpu": [("reader_cpu_s_max", "max CPU s"), ("window_s", "window s")],
    "engine": [("step_rtt_p50_us", "step p50 us"), ("step_rtt_p99_us", "step p99 us")],
    "executor": [
        ("step_rtt_p50_us", "step p50 us"),
        ("step_rtt_p99_us", "step p99 us"),
        ("cpu_us_per_step", "CPU us/step"),
    ],
}


def is_shmcast(impl: str) -> bool:
    return impl.startswith("shmcast")


def case_label(case: dict[str, Any]) -> str:
    return f"{case['workload']} {case['variant']} r{case['readers']}"


# -- CPU placement -----------------------------------------------------------------------------

#: a case whose core-to-core round trip exceeds this many times the run's fastest one ran with
#: the CPUs placed apart (on a virtual machine: the host moved them to different core complexes)
SLOW_FACTOR = 2.0


def fastest_core_to_core(cases: list[dict[str, Any]]) -> float | None:
    """The fastest core-to-core round trip (ns) measured around any case of the run."""
    values = [v for c in cases for v in c.get("core_to_core_ns") or () if v]
    return min(values) if values else None


def placement(case: dict[str, Any], fastest: float | None) -> str | None:
    """``"near"`` when every round trip measured around the case (before and after it, in
    each round) was within ``SLOW_FACTOR`` of the run's fastest, ``"apart"`` when all were
    beyond it, ``"moved"`` when the CPUs moved during the case or between its rounds; None
    when not measured."""
    values = [v for v in case.get("core_to_core_ns") or () if v]
    if not fastest or len(values) < 2:
        return None
    slow = [v > SLOW_FACTOR * fastest for v in values]
    return "apart" if all(slow) else "moved" if any(slow) else "near"


# -- rounds ------------------------------------------------------------------------------------


def _is_figure(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def merge_rounds(cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per implementation and case, in first-seen order, from the rounds of a run
    (``--rounds``).  A case that failed in any round keeps that round's failure (flagged, not
    ranked).  Otherwise every numeric metric is the median over the rounds, and what is not a
    number (the latency CDF, per-reader lists) comes from the round whose first metric is the
    median one.  ``rounds`` counts the rounds; ``core_to_core_ns`` gathers all of theirs.  A
    single round is returned as it is."""
    groups: dict[tuple[str, str, str, int], list[dict[str, Any]]] = {}
    for case in cases:
        key = (case["impl"], case["workload"], case["variant"], case["readers"])
        groups.setdefault(key, []).append(case)
    merged = []
    for runs in groups.values():
        if len(runs) == 1:
            merged.append(runs[0])
            continue
        failed = [c for c in runs if c["status"] != "ok"]
        if failed:
            entry = dict(failed[0])
        else:
            first = METRICS[runs[0]["workload"]][0][0]
            ranked = sorted(runs, key=lambda c: c["metrics"].get(first) or 0.0)
            middle = ranked[(len(runs) - 1) // 2]
            entry = dict(middle)
            entry["metrics"] = {
                key: statistics.median(values) if all(map(_is_figure, values)) else value
                for key, value in middle["metrics"].items()
                for values in [[c["metrics"].get(key) for c in runs]]
            }
        entry["rounds"] = len(runs)
        entry["core_to_core_ns"] = [v for c in runs for v in c.get("core_to_core_ns") or ()]
        merged.append(entry)
    return merged


# -- ratios ------------------------------------------------------------------------------------


def _factor(ours: float | None, theirs: float | None, higher_better: bool) -> float | None:
    if not ours or not theirs or ours <= 0 or theirs <= 0:
        return None
    return ours / theirs if higher_better else theirs / ours


def compute_ratios(cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For every shmcast variant, every ok case and ranked metric: the advantage factor over
    vLLM's MessageQueue and over the best other (non-shmcast, non-vLLM) implementation,
    where those ran and verified; with the CPU placement (:func:`placement`) each of the
    compared cases ran under, since a comparison across placements compares the host too.
    Over several rounds, the medians (:func:`merge_rounds`) are compared."""
    fastest = fastest_core_to_core(cases)
    cases = merge_rounds(cases)
    by_key: dict[tuple[str, str, str, int], dict[str, dict[str, Any]]] = {}
    for case in cases:
        if case["status"] == "ok":
            net = case.get("net", "local")  # cases compare only with cases on their network
            key = (net, case["workload"], case["variant"], case["readers"])
            by_key.setdefault(key, {})[case["impl"]] = case
    ratios = []
    for (net, workload, variant, readers), impls in by_key.items():
        vllm = VLLM_BY_NET.get(net, VLLM)
        for metric, label, higher in METRICS.get(workload, []):
            others = {
                name: c["metrics"].get(metric)
                for name, c in impls.items()
                if not is_shmcast(name) and name != vllm and c["metrics"].get(metric) is not None
            }
            best_name = None
            if others:
                pick = max if higher else min
                best_name = pick(others, key=lambda n: others[n])
            vllm_value = impls[vllm]["metrics"].get(metric) if vllm in impls else None
            for name, case in impls.items():
                if not is_shmcast(name):
                    continue
                ours = case["metrics"].get(metric)
                ratios.append(
                    {
                        "impl": name,
                        "net": net,
                        "workload": workload,
                        "variant": variant,
                        "readers": readers,
                        "metric": metric,
                        "label": label,
                        "higher_is_better": higher,
                        "value": ours,
                        "vllm": vllm_value,
                        "vs_vllm": _factor(ours, vllm_value, higher),
                        "best_other": best_name,
                        "best_other_value": others.get(best_name) if best_name else None,
                        "vs_best_other": _factor(
                            ours, others.get(best_name) if best_name else None, higher
                        ),
                        "placement": {
                            "shmcast": placement(case, fastest),
                            "vllm": placement(impls[vllm], fastest) if vllm in impls else None,
                            "best_other": (
                                placement(impls[best_name], fastest) if best_name else None
                            ),
                        },
                    }
                )
    return ratios


# -- JSON --------------------------------------------------------------------------------------


def write_json(doc: dict[str, Any], out_dir: Path, stem: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{stem}.json"
    path.write_text(json.dumps(doc, indent=1, sort_keys=False) + "\n")
    return path


# -- terminal tables ---------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        magnitude = abs(value)  # each format from where its rounding begins: 9.996 is "10.0"
        if magnitude >= 99.95:
            return f"{value:,.0f}"
        if magnitude >= 9.995:
            return f"{value:.1f}"
        if magnitude >= 0.01:
            return f"{value:.2f}"
        return f"{value:.2g}"
    return str(value)


def _is_number(cell: str) -> bool:
    try:
        float(cell.replace(",", ""))
    except ValueError:
        return False
    return True


def _table(headers: list[str], rows: list[list[str]]) -> str:
    """A plain-text table; columns of numbers are right-aligned."""
    widths = [len(h) for h in headers]
    numeric = [True] * len(headers)
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
            if cell != "-" and not _is_number(cell):
                numeric[i] = False

    def line(cells: list[str]) -> str:
        parts = [
            c.rjust(widths[i]) if numeric[i] else c.ljust(widths[i]) for i, c in enumerate(cells)
        ]
        return "  ".join(parts).rstrip()

    out = [line(headers), line(["-" * w for w in widths])]
    out.extend(line(r) for r in rows)
    return "\n".join(out)


_TITLES = {
    "latency": "one-way latency, paced sends (microseconds)",
    "saturated": "one-way latency, saturated sends (a short target interval, a bound on "
    "messages in flight per reader; microseconds)",
    "throughput": "throughput, back-to-back sends (per reader)",
    "wakeup": "wake-up latency after an idle period (microseconds)",
    "idle_cpu": "CPU used by each reader while idle after a burst",
    "engine": "engine scenario: broadcast a step, every worker replies",
    "executor": "vLLM's executor loop: a request per step, every worker replies on its own queue",
}


def format_tables(doc: dict[str, Any]) -> str:
    """The human-readable report: one table per workload (medians over the rounds), the
    ratios, flagged cases (of every round)."""
    out: list[str] = []
    cases = doc["cases"]
    merged = merge_rounds(cases)
    busy = sorted(c["background"]["busy_percent"] for c in cases if c.get("background"))
    if busy:
        machine = doc.get("machine", {})
        out.append(
            f"machine: {machine.get('cpus', '?')} CPU(s); other load before each case: "
            f"median {busy[len(busy) // 2]:.0f}% busy, max {busy[-1]:.0f}%"
            + ("  (figures are skewed by other work)" if busy[len(busy) // 2] > 20 else "")
        )
    fastest = fastest_core_to_core(cases)
    if fastest:
        kinds = [placement(c, fastest) for c in cases]
        out.append(
            f"CPU placement: a cache line's round trip between two CPUs, around each case: "
            f"fastest {fastest:.0f} ns; {kinds.count('apart')} case(s) ran with the CPUs apart "
            f"(> {SLOW_FACTOR:g}x that), {kinds.count('moved')} while they moved (column 'CPUs')"
        )
    rounds = max((c.get("rounds", 1) for c in merged), default=1)
    if rounds > 1:
        out.append(f"each figure below is the median of {rounds} rounds")
    if busy or fastest or rounds > 1:
        out.append("")
    for workload, metrics in METRICS.items():
        rows_cases = [c for c in merged if c["workload"] == workload]
        if not rows_cases:
            continue
        extras = EXTRA_COLUMNS.get(workload, [])
        headers = (
            ["implementation", "case", "status"]
            + [m[1] for m in metrics]
            + [e[1] for e in extras]
            + ["CPUs"]
        )
        rows = []
        for c in rows_cases:
            status = c["status"]
            row = [c["impl"], f"{c['variant']} r{c['readers']}", status]
            if status == "ok":
                row += [_fmt(c["metrics"].get(m[0])) for m in metrics]
                row += [_fmt(c["metrics"].get(e[0])) for e in extras]
            else:
                row += ["-"] * (len(metrics) + len(extras))
            row.append(placement(c, fastest) or "-")
            rows.append(row)
        out.append(f"== {workload}: {_TITLES[workload]} ==")
        out.append(_table(headers, rows))
        out.append("")
    flagged = [c for c in cases if c["status"] != "ok"]
    if flagged:
        out.append("== flagged (not ranked) ==")
        for c in flagged:
            detail = (c.get("detail") or "").strip().splitlines()
            first = (
                detail[-1] if c["status"] == "error" and detail else (detail[0] if detail else "")
            )
            where = f"{case_label(c)} (round {c['round'] + 1})" if rounds > 1 else case_label(c)
            out.append(f"{c['impl']:<16} {where:<28} {c['status']:<9} {first[:160]}")
        out.append("")
    leaks = [c for c in cases if c.get("leaked")]
    if leaks:
        out.append("== resources left behind by an implementation (removed by the harness) ==")
        for c in leaks:
            out.append(f"{c['impl']:<16} {case_label(c):<28} {', '.join(c['leaked'])}")
        out.append("")
    unavailable = {
        name: info for name, info in doc["implementations"].items() if info["status"] != "ok"
    }
    if unavailable:
        out.append("== implementations not run ==")
        for name, info in unavailable.items():
            out.append(f"{name:<16} {info['status']}: {info.get('reason', '')}")
        out.append("")
    out.extend(_memcpy_table(merged, doc.get("memcpy_mb_per_s") or {}, fastest))
    for net, ours in SHMCAST_BY_NET.items():
        out.extend(_ratio_table(doc, ours, VLLM_BY_NET[net]))
    if doc.get("targets"):
        from .targets import format_targets

        out.extend(format_targets(doc["targets"]))
    return "\n".join(out)


def _ratio_table(doc: dict[str, Any], ours: str, vllm: str) -> list[str]:
    """The factors of ``ours`` against vLLM (``vllm``) and the best other comparator."""
    out: list[str] = []
    ratios = [r for r in doc.get("ratios", []) if r["impl"] == ours]
    if ratios:
        out.append(
            f"== {ours} against vLLM and the best other comparator (factor > 1: shmcast better) =="
        )
        headers = ["case", "metric", "shmcast", vllm, "x vllm", "best other", "value",
                   "x best", "CPUs (ours/vllm/best)"]  # fmt: skip
        rows = [
            [
                f"{r['workload']} {r['variant']} r{r['readers']}",
                r["label"],
                _fmt(r["value"]),
                _fmt(r["vllm"]),
                _fmt(r["vs_vllm"]),
                r["best_other"] or "-",
                _fmt(r["best_other_value"]),
                _fmt(r["vs_best_other"]),
                "/".join(r["placement"][k] or "-" for k in ("shmcast", "vllm", "best_other")),
            ]
            for r in ratios
        ]
        out.append(_table(headers, rows))
        out.append("")
    return out


def _memcpy_table(
    merged: list[dict[str, Any]], memcpy: dict[str, dict[str, float]], fastest: float | None
) -> list[str]:
    """shmcast-futex's large-message throughput (``merged``: the cases, medians over the
    rounds) as a share of this machine's single-threaded memcpy, measured in the same run
    (``memcpy``, keyed by size; see ``memcpy.py``), from memory and in cache."""
    rows = []
    for c in merged:
        reference = memcpy.get(str(c.get("size")))
        if c["impl"] != "shmcast-futex" or c["status"] != "ok" or c["workload"] != "throughput":
            continue
        if not reference or c["payload"] != "bytes":
            continue
        ours = c["metrics"]["mb_per_s_per_reader"]
        rows.append(
            [
                f"{c['variant']} r{c['readers']}",
                _fmt(ours),
                _fmt(reference["from_memory"]),
                _fmt(ours / reference["from_memory"]),
                _fmt(reference["in_cache"]),
                _fmt(ours / reference["in_cache"]),
                placement(c, fastest) or "-",
            ]
        )
    if not rows:
        return []
    headers = ["case", "MB/s/reader", "memcpy from memory", "share", "memcpy in cache", "share",
               "CPUs"]  # fmt: skip
    return [
        "== shmcast-futex against one memcpy on one CPU (the messages come from memory) ==",
        _table(headers, rows),
        "",
    ]


# -- plots -------------------------------------------------------------------------------------

_SIZE_TICKS = [64, 4096, 65536, 1 << 20, 16 << 20]


def _size_label(n: int) -> str:
    for unit, scale in (("MiB", 1 << 20), ("KiB", 1024)):
        if n >= scale:
            return f"{n // scale} {unit}"
    return f"{n} B"


def _save_figure(
    plt: Any, fig: Any, axes: Any, title: str, panels_width: float, path: Path
) -> Path:
    """Finish a figure and write it: one legend for the whole figure right of the panels (each
    label once), the title, the panels in the left ``panels_width`` of the width; then close."""
    seen: dict[str, Any] = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            seen.setdefault(label, handle)
    if seen:
        fig.legend(list(seen.values()), list(seen), loc="center right", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, panels_width, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_plots(doc: dict[str, Any], out_dir: Path, stem: str) -> tuple[list[Path], str]:
    """PNG plots (latency CDFs, throughput against message size).  Returns the files written
    and a note ("" or why nothing was plotted).  Needs matplotlib; without it, no plots."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import NullFormatter
    except ImportError:
        return [], "matplotlib is not installed: no plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    ok = [c for c in merge_rounds(doc["cases"]) if c["status"] == "ok"]
    impls = list(dict.fromkeys(c["impl"] for c in doc["cases"]))
    colors = {name: plt.get_cmap("tab10")(i % 10) for i, name in enumerate(impls)}

    panels = sorted(
        {(c["workload"], c["variant"], c["readers"]) for c in ok if c["metrics"].get("cdf")},
        # each saturated panel right of the paced one of the same payload and readers
        key=lambda k: (k[0] not in ("latency", "saturated"), k[1], k[2], k[0]),
    )
    if panels:
        both = {k[0] for k in panels} >= {"latency", "saturated"}
        cols = min(2 if both else 3, len(panels))
        rows = -(-len(panels) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.8 * rows), squeeze=False)
        for ax, (workload, variant, readers) in zip(axes.flat, panels, strict=False):
            for c in ok:
                if (c["workload"], c["variant"], c["readers"]) != (workload, variant, readers):
                    continue
                points = c["metrics"]["cdf"]
                ax.plot([p[0] for p in points], [p[1] for p in points], label=c["impl"],
                        color=colors[c["impl"]], linewidth=1.4)  # fmt: skip
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_title(f"{workload} {variant}, {readers} reader(s)", fontsize=10)
            ax.set_xlabel("one-way latency (us)")
            ax.set_ylabel("fraction of messages")
            ax.grid(True, which="both", alpha=0.3)
        for ax in list(axes.flat)[len(panels) :]:
            ax.axis("off")
        title = "Latency CDF per implementation (verified cases only)"
        path = out_dir / f"{stem}-latency-cdf.png"
        written.append(_save_figure(plt, fig, axes, title, 0.86, path))

    tput = [c for c in ok if c["workload"] == "throughput"]
    reader_counts = sorted({c["readers"] for c in tput})
    if tput:
        fig, axes = plt.subplots(
            1, len(reader_counts), figsize=(6 * len(reader_counts), 4.2), squeeze=False
        )
        for ax, readers in zip(axes.flat, reader_counts, strict=False):
            for impl in impls:
                mine = [c for c in tput if c["impl"] == impl and c["readers"] == readers]
                raw = sorted((c for c in mine if c["payload"] == "bytes"), key=lambda c: c["size"])
                if raw:
                    ax.plot([c["size"] for c in raw],
                            [c["metrics"]["mb_per_s_per_reader"] for c in raw],
                            marker="o", label=impl, color=colors[impl])  # fmt: skip
                for c in mine:
                    if c["payload"] == "numpy":
                        ax.scatter([c["size"]], [c["metrics"]["mb_per_s_per_reader"]],
                                   marker="*", s=120, color=colors[impl],
                                   label=f"{impl} (numpy)")  # fmt: skip
            ax.set_xscale("log", base=2)
            ax.set_xticks(_SIZE_TICKS, [_size_label(t) for t in _SIZE_TICKS])
            ax.set_yscale("log")
            ax.set_xlabel("message size (bytes)")
            ax.set_ylabel("MB/s per reader")
            ax.set_title(f"{readers} reader(s)")
            ax.grid(True, which="both", alpha=0.3)
        title = "Throughput against message size (stars: a numpy array; verified cases only)"
        path = out_dir / f"{stem}-throughput.png"
        written.append(_save_figure(plt, fig, axes, title, 0.82, path))
    return written, ""
