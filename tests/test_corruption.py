"""A corruption fuzzer: random bytes written from another process into every region of a live
queue, and what every call does afterwards.

Each seeded iteration builds a small broadcast or gather queue in a victim process (a writer
thread per source, the readers in the main thread), lets messages flow, and at a random point
has a second process write random bytes into one region of the segment: the header, the
writer's line, the control lines (sleepers, futex words), the participant lines, the slot
descriptors or the slot data (``_faults.scribble``: a few bytes, an aligned word with a random
or extreme value, or the whole region).  Then, per iteration:

- every put and get returns within its timeout (plus a second of scheduling slack);
- only documented exceptions (``ShmcastError`` subclasses) escape;
- the victim process does not die (of a signal or otherwise);
- no message is delivered twice, out of order, or wrong without an error.  Half the iterations
  run with payload checksums (``checksum=True``): there every region, the data included, must
  give zero wrong deliveries.  Without checksums, bytes written into the *data* region change
  messages in a way nothing can tell: those are counted apart (``payload changed``) and shown,
  not hidden; every other region must still give zero.

``--fuzz-iterations N`` runs more (the default is sized for CI); ``-s`` prints the table.
"""

from __future__ import annotations

import collections

import pytest
from _faults import REGIONS, FuzzReport, corrupter, fuzz_victim
from _procs import process_group

BATCH = 40  # iterations per victim process
TIMEOUT = 0.3  # seconds every put and get may block


def _table(reports: list[FuzzReport]) -> str:
    rows = collections.defaultdict(lambda: collections.Counter())
    for r in reports:
        row = rows[r.region]
        row["iterations"] += 1
        row["checksums"] += r.checksum
        row["calls"] += r.calls
        row["hangs"] += len(r.late) + bool(r.hang)
        row["escaped"] += len(r.escaped)
        row["wrong"] += len(r.wrong) + len(r.duplicates)
        row["payload changed"] += len(r.payload_changed)
        for name, n in r.errors.items():
            row[name] += n
    columns = ["iterations", "checksums", "calls", "hangs", "crashes", "escaped", "wrong",
               "payload changed"]  # fmt: skip
    errors = sorted({k for row in rows.values() for k in row} - set(columns))
    lines = ["region       " + "  ".join(f"{c:>15}" for c in columns + errors)]
    for region in REGIONS:
        row = rows[region]
        lines.append(f"{region:<12} " + "  ".join(f"{row[c]:>15}" for c in columns + errors))
    return "\n".join(lines)


@pytest.mark.timeout(900)
def test_corruption_fuzzer(request: pytest.FixtureRequest) -> None:
    total = request.config.getoption("fuzz_iterations")
    seeds = list(range(total))
    reports: list[FuzzReport] = []
    crashes: list[str] = []
    for first in range(0, total, BATCH):
        batch = seeds[first : first + BATCH]
        with process_group("fork", timeout=BATCH * 20) as group:
            requests, requests_child = group.context.Pipe(duplex=False)
            replies_child, replies = group.context.Pipe(duplex=False)
            scribbler = group.start(corrupter, requests, replies, label="corrupter")
            victim = group.start(
                fuzz_victim, batch, requests_child, replies_child, TIMEOUT, label="victim"
            )
            try:
                reports += group.result(victim)
            except Exception as exc:  # a crash, a hang, an assertion: report with the seeds
                crashes.append(f"seeds {batch[0]}..{batch[-1]}: {exc}")
            requests_child.send(None)
            group.result(scribbler)
            code = group.join(victim)
            if code != 0:
                crashes.append(f"seeds {batch[0]}..{batch[-1]}: victim exit code {code}")
    table = _table(reports)
    print(f"\ncorruption fuzzer, {total} iterations:\n{table}")
    problems = [
        f"seed {r.seed} ({r.region}, {r.kind}): {what}"
        for r in reports
        for what in (*r.late, *r.escaped, *r.wrong, *r.duplicates, *([r.hang] if r.hang else []))
    ]
    assert not crashes, crashes
    assert not problems, "\n".join(problems[:20]) + "\n" + table
    assert len(reports) == total
    assert all(sum(r.errors.values()) + r.calls > 0 for r in reports)
