"""Broadcast objects from one writer process to three reader processes.

Run it:  python examples/broadcast.py

The writer creates the queue and hands its picklable ``handle`` to each reader process; each
reader attaches at its own index and reads until the writer closes the queue.  Every reader
receives every message, in order.
"""

from __future__ import annotations

import multiprocessing as mp

from shmcast import BroadcastQueue, QueueClosed

N_READERS = 3
N_MESSAGES = 1000


def reader(handle, index: int) -> None:
    with BroadcastQueue.attach(handle, reader=index) as queue:
        received = []
        while True:
            try:
                message = queue.get(timeout=30)
            except QueueClosed:  # the writer closed the queue and everything was read
                break
            received.append(message["n"])
    in_order = received == list(range(N_MESSAGES))
    print(f"reader {index}: {len(received)} messages, in order: {in_order}")


def main() -> None:
    # 'spawn' (or 'forkserver'): each reader starts fresh and reaches the queue only
    # through its handle, as the workers of a real application do.
    ctx = mp.get_context("spawn")
    with BroadcastQueue(n_readers=N_READERS) as queue:
        readers = [
            ctx.Process(target=reader, args=(queue.handle, i), daemon=True)
            for i in range(N_READERS)
        ]
        for p in readers:
            p.start()
        queue.wait_until_ready(timeout=60)  # every reader has attached
        for n in range(N_MESSAGES):
            queue.put({"n": n, "payload": b"x" * (n % 100)}, timeout=30)
    # Leaving the block closed the queue: the readers drain it, then see QueueClosed.
    for p in readers:
        p.join(timeout=60)
        if p.exitcode != 0:
            raise SystemExit(f"reader {p.name} failed with exit code {p.exitcode}")
    print(f"writer: sent {N_MESSAGES} messages to {N_READERS} readers")


if __name__ == "__main__":
    main()
