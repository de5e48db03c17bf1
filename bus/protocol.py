"""The versioned JSON wire protocol (docs/protocol.md).

Requests travel on readQ / writeQ with AMQP properties `reply_to` and
`correlation_id`; replies come back on the client's responseQ. Log records
travel on the syncQ exchange into the stream. All bodies are UTF-8 JSON."""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from .errors import BadRequest, DBError, from_wire

VERSION = 1
KINDS = ("read", "write")


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


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
        d: dict = {"v": VERSION, "kind": self.kind, "id": self.id, "body": self.body}
        if self.min_lsn is not None:
            d["min_lsn"] = self.min_lsn
        if self.sent_at is not None:
            d["sent_at"] = self.sent_at
        return dumps(d)


def decode_request(raw: bytes) -> Request:
    """Parse a request; raises BadRequest with a clear message when it is not one."""
    try:
        d = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"request is not valid JSON: {exc}") from None
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
    return Request(kind=kind, body=body, id=rid, min_lsn=min_lsn, sent_at=d.get("sent_at"))


@dataclass
class Reply:
    result: Any
    lsn: int          # write: the write's LSN; read: the LSN the answering worker had applied
    worker: str = ""

    def encode(self) -> bytes:
        return dumps({"v": VERSION, "ok": True, "result": self.result, "lsn": self.lsn, "worker": self.worker})


def encode_error(err: DBError, worker: str = "") -> bytes:
    return dumps({"v": VERSION, "ok": False, "error": err.to_wire(), "worker": worker})


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
