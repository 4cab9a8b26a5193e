"""The standalone batcher with a recording runner (plain Python: the batcher knows no model)."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import numpy as np
import pytest

from ortmux.worker.errors import Cancelled, DeadlineExceeded, InvalidArgument, ResourceExhausted
from ortmux.worker.scheduler.batcher import Batcher, BatchLimits
from ortmux.worker.scheduler.request import QueuedRequest


class Recorder:
    """Echoes each request's input; records batches; can hold the first run until released."""

    def __init__(self, hold: bool = False) -> None:
        self.batches: list[list[str]] = []
        self.release = threading.Event()
        if not hold:
            self.release.set()
        self.started = threading.Event()
        self.widths: list[int] = []

    def __call__(self, requests: Sequence[QueuedRequest]) -> list:
        self.started.set()
        self.release.wait(10)
        self.batches.append([r.fairness_key for r in requests])
        self.widths += [r.inputs["x"].shape[1] for r in requests]
        return [{"y": r.inputs["x"] * 2} for r in requests]


def request(key: str = "", rows: int = 1, width: int = 4, **kwargs: object) -> QueuedRequest:
    return QueuedRequest(inputs={"x": np.ones((rows, width), np.float32)}, fairness_key=key, **kwargs)  # type: ignore[arg-type]


def test_batch_closes_at_max_rows_and_results_go_back_per_request() -> None:
    recorder = Recorder(hold=True)
    batcher = Batcher("m", recorder, BatchLimits(max_batch_rows=4, max_delay=5.0))
    blocker = batcher.submit(request("block", batchable=False))
    assert recorder.started.wait(5)
    queued = [batcher.submit(request(f"k{i}", rows=2)) for i in range(4)]
    recorder.release.set()
    results = [q.future.result(5) for q in queued]
    blocker.future.result(5)
    assert [len(b) for b in recorder.batches] == [1, 2, 2]
    assert all(r.batch_rows == 4 for r in results)
    np.testing.assert_array_equal(results[0].outputs["y"], np.full((2, 4), 2.0))
    batcher.close()


def test_batch_closes_after_max_delay() -> None:
    recorder = Recorder()
    batcher = Batcher("m", recorder, BatchLimits(max_batch_rows=64, max_delay=0.05))
    started = time.monotonic()
    result = batcher.submit(request()).future.result(5)
    assert time.monotonic() - started >= 0.05
    assert result.batch_rows == 1
    batcher.close()


def test_different_shapes_and_groups_never_share_a_run() -> None:
    recorder = Recorder(hold=True)
    batcher = Batcher("m", recorder, BatchLimits(max_batch_rows=64, max_delay=0.05))
    batcher.submit(request("block", batchable=False))
    assert recorder.started.wait(5)
    queued = [
        batcher.submit(request("a", width=4)),
        batcher.submit(request("b", width=8)),
        batcher.submit(request("c", width=4)),
        batcher.submit(request("d", width=4, group="other")),
    ]
    recorder.release.set()
    for q in queued:
        q.future.result(5)
    assert sorted(sorted(b) for b in recorder.batches[1:]) == [["a", "c"], ["b"], ["d"]]
    batcher.close()


def test_queue_full_is_resource_exhausted_at_once_with_a_retry_hint() -> None:
    recorder = Recorder(hold=True)
    batcher = Batcher("m", recorder, BatchLimits(max_batch_rows=1, max_delay=0.0, max_queue=2))
    batcher.submit(request())
    assert recorder.started.wait(5)  # running: no longer queued
    batcher.submit(request())
    batcher.submit(request())
    with pytest.raises(ResourceExhausted, match="queue of model 'm' is full") as caught:
        batcher.submit(request())
    assert caught.value.retry_after
    assert batcher.counters.rejected == 1
    recorder.release.set()
    batcher.close()


def test_expired_and_cancelled_requests_never_run() -> None:
    recorder = Recorder(hold=True)
    batcher = Batcher("m", recorder, BatchLimits(max_batch_rows=1, max_delay=0.0))
    batcher.submit(request("block", batchable=False))
    assert recorder.started.wait(5)
    expired = batcher.submit(request("late", deadline=time.monotonic() + 0.01))
    cancelled = batcher.submit(request("gone", is_active=lambda: False))
    fine = batcher.submit(request("fine"))
    time.sleep(0.05)
    recorder.release.set()
    with pytest.raises(DeadlineExceeded):
        expired.future.result(5)
    with pytest.raises(Cancelled):
        cancelled.future.result(5)
    fine.future.result(5)
    assert [b for b in recorder.batches] == [["block"], ["fine"]]
    assert (batcher.counters.expired, batcher.counters.cancelled) == (1, 1)
    batcher.close()


def test_a_flooding_tenant_cannot_starve_another() -> None:
    recorder = Recorder(hold=True)
    batcher = Batcher("m", recorder, BatchLimits(max_batch_rows=1, max_delay=0.0))
    batcher.submit(request("block", batchable=False))
    assert recorder.started.wait(5)
    flood = [batcher.submit(request("flood")) for _ in range(20)]
    quiet = [batcher.submit(request("quiet")) for _ in range(5)]
    recorder.release.set()
    for q in flood + quiet:
        q.future.result(5)
    order = [b[0] for b in recorder.batches[1:]]
    # round-robin: the quiet tenant's five requests are among the first ten runs
    assert order[:10] == ["flood", "quiet"] * 5
    batcher.close()


def test_priority_orders_a_tenants_own_requests_and_never_one_tenant_against_another() -> None:
    recorder = Recorder(hold=True)
    batcher = Batcher("m", recorder, BatchLimits(max_batch_rows=1, max_delay=0.0))
    batcher.submit(request("block", batchable=False))
    assert recorder.started.wait(5)
    quiet = [batcher.submit(request("quiet")) for _ in range(2)]
    loud = [batcher.submit(request("loud", width=2 + i, priority=0)) for i in range(2)]
    loud.append(batcher.submit(request("loud", width=9, priority=100)))
    recorder.release.set()
    for q in [*quiet, *loud]:
        q.future.result(5)
    runs = recorder.batches[1:]
    # round-robin across tenants whatever priority they claim: quiet is not pushed back
    assert runs == [["quiet"], ["loud"], ["quiet"], ["loud"], ["loud"]]
    # inside its own queue the loud tenant's urgent request went first
    assert loud[2].future.result(5).outputs["y"].shape == (1, 9)
    assert recorder.widths[1:3] == [4, 9]
    batcher.close()


def test_an_error_reaches_every_request_of_its_batch_and_the_batcher_goes_on() -> None:
    calls = []

    def failing(requests: Sequence[QueuedRequest]) -> list:
        calls.append(len(requests))
        if len(calls) == 1:
            raise InvalidArgument("bad batch")
        return [{"y": r.inputs["x"]} for r in requests]

    batcher = Batcher("m", failing, BatchLimits(max_batch_rows=8, max_delay=0.05))
    first = [batcher.submit(request(f"k{i}")) for i in range(3)]
    for q in first:
        with pytest.raises(InvalidArgument, match="bad batch"):
            q.future.result(5)
    assert batcher.submit(request()).future.result(5).outputs["y"].shape == (1, 4)
    batcher.close()


def test_fair_share_caps_a_flooding_key_while_others_are_active() -> None:
    recorder = Recorder(hold=True)
    batcher = Batcher("m", recorder, BatchLimits(max_batch_rows=32, max_delay=0.0, fair_share_rows=2))
    batcher.submit(request("block", batchable=False))
    assert recorder.started.wait(5)
    flood = [batcher.submit(request("flood")) for _ in range(9)]
    quiet = batcher.submit(request("quiet"))
    recorder.release.set()
    for q in [*flood, quiet]:
        q.future.result(5)
    sizes = [len(b) for b in recorder.batches[1:]]
    assert sizes[0] == 3  # two flood rows and the quiet one
    assert max(sizes) <= 3 and sum(sizes) == 10
    batcher.close()


def test_without_a_cap_one_key_fills_the_batch() -> None:
    recorder = Recorder(hold=True)
    batcher = Batcher("m", recorder, BatchLimits(max_batch_rows=32, max_delay=0.0))
    batcher.submit(request("block", batchable=False))
    assert recorder.started.wait(5)
    queued = [batcher.submit(request("flood")) for _ in range(9)] + [batcher.submit(request("quiet"))]
    recorder.release.set()
    for q in queued:
        q.future.result(5)
    assert [len(b) for b in recorder.batches[1:]] == [10]
    batcher.close()
