"""Zero-copy: the writer fills shared memory in place, readers look at it in place.

Run it:  python examples/zero_copy.py

``reserve(nbytes)`` hands the writer a writable view of the ring; whatever it writes there
is published, without another copy, when the block ends (and nothing is, if the block raises).
``view()`` hands a reader the message where it lies in the ring; the slots are held until the
block ends.  Uses numpy when it is installed, plain memoryviews otherwise.

The rule on both sides: do not keep the view, or an array made on it, past the block.
"""

from __future__ import annotations

import multiprocessing as mp
import struct

from shmcast import BroadcastQueue, QueueClosed

try:
    import numpy as np
except ImportError:  # numpy is optional
    np = None

ROWS, COLS = 512, 1024  # a 2 MiB float32 frame
N_FRAMES = 20


def reader(handle, index: int) -> None:
    sums = []
    with BroadcastQueue.attach(handle, reader=index) as queue:
        while True:
            try:
                with queue.view(timeout=30) as buf:  # a read-only memoryview into the ring
                    if np is not None:
                        frame = np.frombuffer(buf, dtype=np.float32).reshape(ROWS, COLS)
                        sums.append(int(frame.sum(dtype=np.float64)))
                        del frame  # do not keep it past the block
                    else:
                        sums.append(sum(struct.unpack_from("<64f", buf)))
            except QueueClosed:
                break
    values = ROWS * COLS if np is not None else 64
    expected = [n * (values - 1) + 1 for n in range(N_FRAMES)]  # what the writer wrote
    print(f"reader {index}: {len(sums)} frames, all as written: {sums == expected}")


def main() -> None:
    ctx = mp.get_context("spawn")
    frame_bytes = ROWS * COLS * 4
    with BroadcastQueue(n_readers=2, n_slots=16, slot_size=1024 * 1024) as queue:
        readers = [
            ctx.Process(target=reader, args=(queue.handle, i), daemon=True) for i in range(2)
        ]
        for p in readers:
            p.start()
        queue.wait_until_ready(timeout=60)
        for n in range(N_FRAMES):
            with queue.reserve(frame_bytes, timeout=30) as buf:  # writable, in the ring
                if np is not None:
                    frame = np.frombuffer(buf, dtype=np.float32).reshape(ROWS, COLS)
                    frame.fill(n)  # computed straight into shared memory
                    frame[0, 0] = 1.0
                    del frame
                else:
                    struct.pack_into("<64f", buf, 0, *([float(n)] * 63 + [1.0]))
    for p in readers:
        p.join(timeout=60)
        if p.exitcode != 0:
            raise SystemExit(f"{p.name} failed with exit code {p.exitcode}")
    print(f"writer: sent {N_FRAMES} frames of {frame_bytes // 1024} KiB without copying them")


if __name__ == "__main__":
    main()
