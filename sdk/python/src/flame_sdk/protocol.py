"""The worker protocol's names and messages (docs/protocol.md, version 2)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

#: The protocol version this SDK speaks. A command with another ``v`` is
#: answered ``failed`` and not run.
VERSION = 2
#: JetStream stream of commands, subjects ``flame.cmd.<worker-id>``.
COMMAND_STREAM = "FLAME_CMDS"
#: JetStream stream of reports, subjects ``flame.report.<job-id>``.
REPORT_STREAM = "FLAME_REPORTS"
#: KV bucket of live workers (entries expire without heartbeats).
WORKER_BUCKET = "flame-workers"
#: Object store bucket of model blobs, named by the sha256 of their bytes.
BLOB_BUCKET = "flame-models"
#: A command too large for one NATS message is stored whole in the object
#: store; its message carries the command's head and this header names the
#: blob (its sha256).
COMMAND_BLOB_HEADER = "Flame-Command-Blob"
#: Seconds a worker stays listed after its last heartbeat.
WORKER_TTL = 6.0
#: Seconds between heartbeats.
HEARTBEAT = 2.0
#: Seconds before a heartbeat that failed is tried again (a registration
#: lives a few heartbeats: after a server failed over, the worker must be
#: listed again within that, not a timeout and a whole heartbeat later).
HEARTBEAT_RETRY = 0.5
#: Seconds a starting worker watches a registration that another process
#: wrote under its id: a live holder renews it within this, a dead one does not.
RENEWAL_WAIT = 3.0
#: Seconds a taken command stays unacknowledged, without word that it is
#: still running, before it is delivered again.
COMMAND_ACK_WAIT = 15.0
#: Seconds between a worker's words that a command is still running.
COMMAND_PROGRESS = 5.0
#: How long JetStream drops a repeated ``Nats-Msg-Id``.
DUPLICATE_WINDOW = 120.0
#: Seconds a report that cannot be published is tried again (within the window).
REPORT_RETRY_FOR = 90.0
#: The command kinds of this version.
KINDS = ("deploy", "init_model", "train", "coordinate", "evaluate", "aggregate")

_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


class ProtocolError(Exception):
    """A message that does not follow the protocol."""


def check_id(value: str, what: str = "id") -> str:
    """An id usable in a subject and a consumer name, or a ``ValueError``."""
    if not _ID.match(value):
        raise ValueError(f"{what} '{value}' is not valid: use letters, digits, '-' and '_' only (at most 128)")
    return value


def offers(roles: List[str], role: str, has_dataset: bool) -> bool:
    """Whether a worker offering ``roles`` takes a task of ``role``: by name, or
    by its generic role (``trainer`` with a dataset, ``aggregator`` without);
    a ring's reducer runs beside a trainer."""
    generic = "trainer" if has_dataset else "aggregator"
    return any(r == role or r == generic or (role == "ring-reducer" and r == "trainer") for r in roles)


@dataclass(frozen=True)
class Command:
    """A command's head and its body (a JSON object with ``kind``)."""

    v: int
    id: str
    job_id: str
    task_id: str
    round: int
    body: Dict[str, Any]

    @property
    def kind(self) -> str:
        return str(self.body.get("kind", ""))

    @classmethod
    def decode(cls, data: bytes) -> "Command":
        """Reads a command; a ``ProtocolError`` when its head does not read
        (nothing can be answered then)."""
        try:
            obj = json.loads(data)
        except ValueError as e:
            raise ProtocolError(f"not JSON: {e}") from e
        if not isinstance(obj, dict):
            raise ProtocolError("a command is a JSON object")
        try:
            v, cid, job, task, rnd = obj["v"], obj["id"], obj["job_id"], obj["task_id"], obj["round"]
        except KeyError as e:
            raise ProtocolError(f"the command has no '{e.args[0]}'") from e
        body = obj.get("body")
        if not isinstance(v, int) or not isinstance(rnd, int) or not all(isinstance(x, str) for x in (cid, job, task)):
            raise ProtocolError("the command's v and round are numbers, its id, job_id and task_id strings")
        return cls(v=v, id=cid, job_id=job, task_id=task, round=rnd, body=body if isinstance(body, dict) else {})


def report(command: Command, worker_id: str, body: Dict[str, Any]) -> Dict[str, Any]:
    """The report answering ``command``."""
    return {
        "v": VERSION,
        "command_id": command.id,
        "job_id": command.job_id,
        "task_id": command.task_id,
        "worker_id": worker_id,
        "round": command.round,
        "body": body,
    }


def failed(error: str) -> Dict[str, Any]:
    return {"kind": "failed", "error": error}


def worker_info(worker_id: str, roles: List[str], realm: str, device: str, instance: str) -> bytes:
    """The registry entry (and heartbeat) of a worker, written by the process
    whose random mark is ``instance``."""
    return json.dumps({"id": worker_id, "roles": roles, "realm": realm, "device": device, "instance": instance}).encode()


def writer(entry: Optional[bytes]) -> Tuple[bool, Optional[str]]:
    """Whether a registry entry is a registration, and the ``instance`` mark
    of the process that wrote it (None where it does not say)."""
    try:
        value = json.loads(entry or b"")
    except ValueError:
        return False, None
    if not isinstance(value, dict):
        return False, None
    mark = value.get("instance")
    return True, mark if isinstance(mark, str) else None


def optional(body: Dict[str, Any], key: str) -> Optional[Any]:
    value = body.get(key)
    return None if value is None else value
