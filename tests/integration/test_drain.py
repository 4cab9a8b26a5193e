"""SIGTERM on a real worker process: health flips, every accepted request is answered, exit 0."""

from __future__ import annotations

import contextlib
import itertools
import re
import signal
import threading
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ortmux.client import Client, InferRequest, OrtmuxError

from ..conftest import serve_process


def test_sigterm_mid_stream_answers_every_accepted_request_and_flips_health(tmp_path: Path) -> None:
    process, address = serve_process(
        tmp_path, "--max-batch-size", "1", "--stream-window", "64", "--drain-grace-seconds", "60"
    )
    try:
        heavy = {"input_ids": np.ones((8, 256), dtype=np.int64)}
        statuses: list[int] = []
        with grpc.insecure_channel(address) as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=60)

            def follow() -> None:
                with contextlib.suppress(grpc.RpcError):  # the watch ends when the worker stops
                    statuses.extend(reply.status for reply in watch)

            watcher = threading.Thread(target=follow)
            watcher.start()
            with Client(address, stream_timeout=60) as client:
                # Endless: only a drain ends it with UNAVAILABLE (else its deadline ends it).
                stream = client.stream_infer(
                    (InferRequest("demo", heavy) for _ in itertools.count()), window=64
                )
                answered = [next(stream)]
                process.send_signal(signal.SIGTERM)
                try:
                    answered.extend(stream)
                    raise AssertionError("the stream should end with UNAVAILABLE once the worker drains")
                except OrtmuxError as error:
                    ending = error
            assert process.wait(timeout=60) == 0
            watcher.join(10)
        assert ending.code == grpc.StatusCode.UNAVAILABLE
        taken = re.search(r"answered the (\d+) requests it took", ending.message)
        assert taken, ending.message
        assert int(taken.group(1)) == len(answered)
        assert all(result.ok for result in answered)
        assert statuses[0] == health_pb2.HealthCheckResponse.SERVING
        assert health_pb2.HealthCheckResponse.NOT_SERVING in statuses
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
