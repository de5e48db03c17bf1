"""The versioned JSON wire protocol (docs/protocol.md).

Requests travel on readQ / writeQ with AMQP properties `reply_to` and
`correlation_id`; replies come back on the client's responseQ. Log records
travel on the syncQ exchange into the stream. All bodies are UTF-8 JSON:
strict JSON, so NaN and Infinity are neither read (a request holding them, or
a number too large for a double, is refused) nor written, and text is valid
Unicode (a lone surrogate escape such as "\\ud800" is refused). A request is
at most MAX_REQUEST_BYTES long and nests at most MAX_DEPTH deep."""
from __future__ import annotations

import json
import math
import uuid
from dataclasses import dataclass, field
from typing import Any

from .errors import BadRequest, DBError, from_wire

VERSION = 1
KINDS = ("read", "write")
MAX_REQUEST_BYTES = 4 << 20   # one request's body
MAX_DEPTH = 32                # nesting of arrays and objects in a request


def dumps(obj: Any) -> bytes:
    """Strict JSON: raises ValueError for NaN or Infinity, UnicodeEncodeError for a lone surrogate."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    v = float(text)
    if not math.isfinite(v):
        raise ValueError(f"the number {text[:40]} is too large for a double")
    return v


def loads(raw: bytes | str) -> Any:
    """Strict JSON: NaN, Infinity and numbers that overflow a double are refused (ValueError)."""
    return json.loads(raw, parse_constant=_no_constant, parse_float=_finite)


def _check_tree(obj: Any) -> None:
    """Every string (and key) valid Unicode; nesting at most MAX_DEPTH. Iterative."""
    stack = [(obj, 0)]
    while stack:
        o, depth = stack.pop()
        if isinstance(o, str):
            try:
                o.encode("utf-8")
            except UnicodeEncodeError:
                raise BadRequest("the request holds text that is not valid Unicode (a lone surrogate)") from None
        elif isinstance(o, (list, dict)):
            if depth >= MAX_DEPTH:
                raise BadRequest(f"the request nests deeper than {MAX_DEPTH} levels")
            items = o.items() if isinstance(o, dict) else ((None, v) for v in o)
            for k, v in items:
                if k is not None:
                    stack.append((k, depth + 1))
                stack.append((v, depth + 1))


def new_id() -> str:
    return uuid.uuid4().hex


@dataclass
class Request:
    kind: str                  # "read" | "write"
    body: dict                 # a query (read) or {"ops": [...]} (write)
    id: str = field(default_factory=new_id)  # also the idempotency key of a write
    min_lsn: int | None = None  # read-your-writes: answer only once this LSN is applied
    sent_at: float | None = None

    def encode(self) -> bytes:
        """The request's bytes; BadRequest (never sent) when JSON cannot carry it."""
        d: dict = {"v": VERSION, "kind": self.kind, "id": self.id, "body": self.body}
        if self.min_lsn is not None:
            d["min_lsn"] = self.min_lsn
        if self.sent_at is not None:
            d["sent_at"] = self.sent_at
        try:
            return dumps(d)
        except ValueError as exc:   # NaN or Infinity (UnicodeEncodeError, a lone surrogate, is one too)
            code = "bad_request" if isinstance(exc, UnicodeEncodeError) else "out_of_range"
            raise BadRequest(f"the request cannot be sent as JSON: {str(exc)[:120]}", code=code) from None
        except (TypeError, RecursionError) as exc:
            raise BadRequest(f"the request cannot be sent as JSON: {str(exc)[:120]}") from None


def decode_request(raw: bytes) -> Request:
    """Parse a request; raises BadRequest (and nothing else) with a clear
    message when it is not one."""
    if len(raw) > MAX_REQUEST_BYTES:
        raise BadRequest(f"the request is {len(raw)} bytes; at most {MAX_REQUEST_BYTES}", code="too_large")
    try:
        d = loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise BadRequest(f"request is not valid JSON: {str(exc)[:200]}") from None
    _check_tree(d)
    if not isinstance(d, dict):
        raise BadRequest("request must be a JSON object")
    if d.get("v") != VERSION:
        raise BadRequest(f"unsupported protocol version {d.get('v')!r}; this worker speaks {VERSION}",
                         code="unsupported_version")
    kind = d.get("kind")
    if kind not in KINDS:
        raise BadRequest(f"kind must be one of {KINDS}, got {kind!r}")
    body = d.get("body")
    if not isinstance(body, dict):
        raise BadRequest("body must be a JSON object")
    rid = d.get("id")
    if not isinstance(rid, str) or not (0 < len(rid) <= 128):
        raise BadRequest("id must be a non-empty string of at most 128 characters")
    min_lsn = d.get("min_lsn")
    if min_lsn is not None and (not isinstance(min_lsn, int) or isinstance(min_lsn, bool) or min_lsn < 0):
        raise BadRequest("min_lsn must be a non-negative integer")
    sent_at = d.get("sent_at")
    if sent_at is not None and (not isinstance(sent_at, (int, float)) or isinstance(sent_at, bool)):
        raise BadRequest("sent_at must be a number (seconds since the epoch)")
    return Request(kind=kind, body=body, id=rid, min_lsn=min_lsn, sent_at=sent_at)


@dataclass
class Reply:
    result: Any
    lsn: int          # write: the write's LSN; read: the LSN the answering worker had applied
    worker: str = ""

    def encode(self) -> bytes:
        return dumps({"v": VERSION, "ok": True, "result": self.result, "lsn": self.lsn, "worker": self.worker})


def encode_error(err: DBError, worker: str = "") -> bytes:
    d = {"v": VERSION, "ok": False, "error": err.to_wire(), "worker": worker}
    try:
        return dumps(d)
    except ValueError:   # a message quoting what JSON cannot carry: escape it
        return json.dumps(d, separators=(",", ":"), default=str).encode()


def decode_reply(raw: bytes) -> Reply:
    """A reply, or raises the DBError it carries."""
    try:
        d = json.loads(raw)
    except ValueError as exc:
        raise DBError(f"unreadable reply: {exc}") from None
    if not isinstance(d, dict):
        raise DBError("unreadable reply: not an object")
    if not d.get("ok"):
        raise from_wire(d.get("error") or {})
    return Reply(result=d.get("result"), lsn=int(d.get("lsn") or 0), worker=d.get("worker", ""))


# --- the replication log -------------------------------------------------
# One stream message holds either a batch of entries committed together by a
# master (group commit), or a barrier that opens a new term.

def encode_entries(term: int, master: str, entries: list[dict]) -> bytes:
    """entries: [{"lsn": int, "id": request id, "ops": [resolved ops], "result": {...}}]"""
    return dumps({"v": VERSION, "type": "entries", "term": term, "master": master, "entries": entries})


def encode_barrier(term: int, master: str, nonce: str) -> bytes:
    return dumps({"v": VERSION, "type": "barrier", "term": term, "master": master, "nonce": nonce})


def encode_probe(worker: str, nonce: str) -> bytes:
    """A record that means nothing but "I was here": a new slave is caught up
    when it reads its own probe back."""
    return dumps({"v": VERSION, "type": "probe", "term": 0, "master": worker, "nonce": nonce})


def decode_record(raw: bytes) -> dict:
    d = json.loads(raw)
    if not isinstance(d, dict) or d.get("type") not in ("entries", "barrier", "probe") or not isinstance(d.get("term"), int):
        raise ValueError("not a log record")
    return d
