"""The example app's worker role: consumes the tasks its web role hands it
(bus.tasks), keeps a heartbeat (bus.instance), and logs one line per task:

    {"sleep": N}   sleeps N seconds first (to be killed mid-task)
    {"fail": true} raises: retried, then dead-lettered after the limit
    done <task id> <payload>   is logged when a task is done"""
import json
import os
import signal
import sys
import threading
import time

from bus import instance
from bus.tasks import TaskQueue


def handle(task):
    p = task.payload
    print(f"start {task.id} attempt {task.attempt}", flush=True)
    if p.get("sleep"):
        time.sleep(float(p["sleep"]))
    if p.get("fail"):
        raise RuntimeError("this task always fails")
    print(f"done {task.id} {json.dumps(p, sort_keys=True)}", flush=True)


def main():
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    instance.keep_heartbeat(stop)
    q = TaskQueue(None, None, os.environ["STRATUS_APP"], os.environ["STRATUS_ROLE"], max_attempts=3)
    print(f"jobs {os.environ.get('STRATUS_INSTANCE')} consuming {q.queue}", flush=True)
    q.consume(handle, stop=stop)
    print("jobs stopped", flush=True)


if __name__ == "__main__":
    main()
