"""A stand-in for model.Runtime in the Redis queue tests' worker processes: RQ, Redis, the
worker (`queues.run_worker`) and the job path (`jobs.run_job`) are the real ones; only the
propagation and Label Studio are replaced by what the payload asks for (sleep, bad input, a
crash), and every run, store and report is counted in Redis, so the tests can check that
each job ran, and was stored, once.

Run: python tests/backend/queue_fake_runtime.py <redis url> <lease seconds>
"""

from __future__ import annotations

import json
import os
import sys
import time

from xmem_label.backend.queues import RedisQueue, run_worker
from xmem_label.model import InputError


class FakeRuntime:
    def __init__(self, url: str, lease: float):
        self.journal = RedisQueue(url, lease_seconds=lease, max_attempts=3)
        self.redis = self.journal.redis

    def execute(self, record) -> dict:
        payload = record.payload
        self.redis.rpush(f"test:ran:{record.key}", os.getpid())
        time.sleep(payload.get("sleep", 0))
        if payload.get("bad"):
            raise InputError(payload["bad"])
        if payload.get("crash"):
            raise RuntimeError(payload["crash"])
        return {"prediction": {"value": payload.get("value")}, "timings": {"total": 0.0}}

    def store(self, record, result: dict) -> dict:
        self.redis.rpush(f"test:stored:{record.key}", json.dumps(result))
        return {"prediction_id": 1, "timings": result["timings"]}

    def report(self, record, reason: str) -> None:
        self.redis.rpush(f"test:reported:{record.key}", reason)


if __name__ == "__main__":
    run_worker(FakeRuntime(sys.argv[1], float(sys.argv[2])))
