"""Fault-injection points for tests of the worker's recovery paths.

A test names faults in the worker's environment:

    STRATUS_FAULTS="promotion.after_barrier=drop_connection,promotion.before_finish=pause:2"

and the worker calls `hit(point, worker)` at each named point. A fault fires
once per process. Actions:
  drop_connection  close the worker's AMQP connection under it (as a broker
                   restart or a network cut looks to the worker)
  pause:S          sleep S seconds right there (a slow or descheduled worker)
  exit:N           end the process at once with code N (a crash at that point)

With STRATUS_FAULTS unset (always, outside tests) every call is a dict lookup
that finds nothing."""
from __future__ import annotations

import logging
import os
import time

log = logging.getLogger("stratus.worker.faults")


def _parse(raw: str) -> dict[str, str]:
    out = {}
    for item in raw.split(","):
        point, _, action = item.strip().partition("=")
        if point and action:
            out[point] = action
    return out


_pending = _parse(os.environ.get("STRATUS_FAULTS", ""))


def hit(point: str, worker=None) -> None:
    action = _pending.pop(point, None)
    if action is None:
        return
    log.warning("fault injected at %s: %s", point, action)
    name, _, arg = action.partition(":")
    if name == "pause":
        time.sleep(float(arg or 1))
    elif name == "exit":
        os._exit(int(arg or 1))
    elif name == "drop_connection" and worker is not None and worker.conn is not None:
        # Close the socket beneath pika: the next I/O fails as a lost connection does.
        try:
            import socket
            worker.conn._impl._transport._sock.shutdown(socket.SHUT_RDWR)  # noqa: SLF001 (test seam)
        except Exception as exc:
            log.warning("could not drop the connection: %r", exc)
    elif name not in ("drop_connection",):
        log.error("unknown fault action %r", action)
