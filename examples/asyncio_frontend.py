"""An asyncio front end that talks to worker processes through shmcast, without blocking its loop.

Run it:  python examples/asyncio_frontend.py

The front end (this process, one event loop) broadcasts requests to two worker processes with
``await requests.put_async(...)`` and awaits their replies from a gather queue with
``await replies.get_with_sender_async(...)``; the workers are plain synchronous code.  While it
waits, other coroutines of the loop go on running (a heartbeat here).  A wait that is given
up (``asyncio.wait_for``) takes nothing: the reply it would have got comes with the next call.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp

from shmcast import BroadcastQueue, GatherQueue, QueueClosed

N_WORKERS = 2
N_REQUESTS = 100


def worker(request_handle, reply_handle, index: int) -> None:
    with (
        BroadcastQueue.attach(request_handle, reader=index) as requests,
        GatherQueue.attach(reply_handle, writer=index) as replies,
    ):
        while True:
            try:
                request = requests.get(timeout=30)
            except QueueClosed:  # the front end closed the request queue
                break
            replies.put({"request": request["n"], "square": request["n"] ** 2}, timeout=30)


async def heartbeat(beats: list[float]) -> None:
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(0.01)
        beats.append(loop.time())


async def front_end(requests: BroadcastQueue, replies: GatherQueue) -> None:
    beats: list[float] = []
    ticking = asyncio.create_task(heartbeat(beats))

    # Nothing was asked yet: a bounded wait gives up and takes nothing.
    try:
        await asyncio.wait_for(replies.get_async(), timeout=0.2)
    except asyncio.TimeoutError:
        print("no reply before the first request (the wait was cancelled, nothing lost)")

    answered: dict[int, list[int]] = {i: [] for i in range(N_WORKERS)}
    for n in range(N_REQUESTS):
        await requests.put_async({"n": n}, timeout=30)  # every worker gets every request
        for _ in range(N_WORKERS):
            sender, reply = await replies.get_with_sender_async(timeout=30)
            assert reply["square"] == reply["request"] ** 2
            answered[sender].append(reply["request"])
    ticking.cancel()

    in_order = all(got == list(range(N_REQUESTS)) for got in answered.values())
    print(f"front end: {N_REQUESTS} requests answered by {N_WORKERS} workers, in order: {in_order}")
    print(f"heartbeat kept ticking while the front end waited: {len(beats) > 5}")


def main() -> None:
    ctx = mp.get_context("spawn")
    with (
        BroadcastQueue(n_readers=N_WORKERS) as requests,
        GatherQueue(n_writers=N_WORKERS) as replies,
    ):
        workers = [
            ctx.Process(target=worker, args=(requests.handle, replies.handle, i), daemon=True)
            for i in range(N_WORKERS)
        ]
        for p in workers:
            p.start()
        requests.wait_until_ready(timeout=60)
        replies.wait_until_ready(timeout=60)
        asyncio.run(front_end(requests, replies))
        requests.close()  # the workers drain it, then see QueueClosed
        for p in workers:
            p.join(timeout=60)
            if p.exitcode != 0:
                raise SystemExit(f"worker exited with {p.exitcode}")


if __name__ == "__main__":
    main()
