"""vLLM's executor loop, in miniature, through the drop-in and (where vLLM is installed) through
vLLM's own MessageQueue, side by side: the same engine code drives both.

The shape is vLLM's multiprocessing executor: one broadcast queue to N workers, one response
queue per worker (``MessageQueue(1, 1)``, created by the worker, its handle sent back), the
collective starts in the executor's order, workers in ``dequeue(indefinite=True)``, and
``collective_rpc``-style steps: a request ``(method, args, kwargs, output_rank)``, then a reply
from every worker (or only from ``output_rank``) read within one deadline.  With 12 workers on
a 2-core machine the processes outnumber the cores six to one: the seed's condition.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from typing import Any

import pytest
from _procs import executor_worker, mq_class, process_group

from shmcast import QueueBroken
from shmcast._segment import SHM_DIR

STEP_DEADLINE = 30.0  # seconds every step's replies may take


def payload_of(step: int) -> bytes:
    """Mostly small requests; every 97th carries 300 KiB (more than a slot)."""
    size = 300 * 1024 if step % 97 == 96 else 64 + step % 200
    return bytes([step % 251]) * size


def collective_rpc(broadcast: Any, responses: list[Any], step: int) -> list[dict[str, Any]]:
    """One step as vLLM's executor runs it; returns the replies read."""
    output_rank = step % len(responses) if step % 10 == 3 else None  # unique_reply_rank
    payload = payload_of(step)
    broadcast.enqueue(("execute_model", (step, payload), {"non_block": False}, output_rank))
    deadline = time.monotonic() + STEP_DEADLINE
    wanted = range(len(responses)) if output_rank is None else [output_rank]
    replies = []
    for rank in wanted:
        try:
            status, result = responses[rank].dequeue(timeout=max(0.0, deadline - time.monotonic()))
        except TimeoutError as exc:
            raise TimeoutError(f"step {step}: no reply from rank {rank} in time") from exc
        assert status == "SUCCESS"
        assert result == {
            "rank": rank, "step": step, "nbytes": len(payload),
            "digest": hashlib.blake2b(payload, digest_size=8).hexdigest(),
        }, f"step {step}: wrong reply from rank {rank}"  # fmt: skip
        replies.append(result)
    return replies


def start_executor(impl: str, group: Any, n_workers: int) -> tuple[Any, list[Any], list[Any]]:
    """The executor's start: broadcast queue, workers, their response queues, both collective
    starts.  Returns (broadcast queue, response queues, worker children)."""
    cls = mq_class(impl)
    broadcast = cls(n_workers, n_workers, max_chunk_bytes=16 * 1024 * 1024)
    children, backs = [], []
    for rank in range(n_workers):
        back, child_end = group.context.Pipe(duplex=False)
        children.append(group.start(executor_worker, impl, broadcast.export_handle(), rank,
                                    child_end))  # fmt: skip
        child_end.close()
        backs.append(back)
    responses = []
    for rank, back in enumerate(backs):
        assert back.poll(120), f"worker {rank} sent no response handle"
        responses.append(cls.create_from_handle(back.recv(), 0))
    broadcast.wait_until_ready()
    for queue in responses:
        queue.wait_until_ready()
    return broadcast, responses, children


def run_loop(impl: str, n_workers: int, steps: int) -> float:
    """Run ``steps`` steps with ``n_workers`` workers; return steps per second."""
    with process_group(timeout=120) as group:
        broadcast, responses, _children = start_executor(impl, group, n_workers)
        try:
            start = time.monotonic()
            for step in range(steps):
                collective_rpc(broadcast, responses, step)
            rate = steps / (time.monotonic() - start)
            broadcast.enqueue(("shutdown", (), {}, None))
            assert group.results() == [steps] * n_workers  # every worker saw every request
        finally:
            broadcast.shutdown()
            for queue in responses:
                queue.shutdown()
    return rate


@pytest.mark.timeout(300)
@pytest.mark.parametrize("impl", ["shmcast", "vllm"])
def test_executor_loop_with_12_workers(impl: str) -> None:
    if impl == "vllm":
        pytest.importorskip("vllm", reason="vLLM is not installed here (make test-vllm has it)")
    rate = run_loop(impl, 12, 3000)
    print(f"{impl}: {rate:.0f} steps/s with 12 workers (a check, not a benchmark)")


@pytest.mark.timeout(120)
def test_a_worker_killed_mid_loop_is_named_not_waited_for() -> None:
    with process_group(timeout=60) as group:
        broadcast, responses, children = start_executor("shmcast", group, 4)
        try:
            for step in range(50):
                collective_rpc(broadcast, responses, step)
            group.kill(children[2])
            start = time.monotonic()
            with pytest.raises(QueueBroken) as info:
                for step in range(50, 10_000):
                    collective_rpc(broadcast, responses, step)
            assert time.monotonic() - start < 10  # not the step deadline, nor forever
            assert str(children[2].pid) in str(info.value) or info.value.pid == children[2].pid
        finally:
            broadcast.shutdown()
            for queue in responses:
                queue.shutdown()
            # The killed worker created its response queue and could not remove its name.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(SHM_DIR, responses[2].handle.buffer_handle.name))
