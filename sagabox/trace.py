"""``sagabox trace``: one saga followed through every database and every log file.

Sources, merged into one timeline sorted by time:

- the orchestrator's ``saga_history`` (transitions, their causes and reasons, the ids
  of the commands each one emitted);
- outbox rows still pending (written, not yet published) in every database;
- the participants' inbox records (received_at, status, the stored reply);
- the JSON log lines whose ``correlation_id`` is the saga's id, and the
  ``outbox_batch_published`` lines whose ``correlation_ids`` list it (one timeline
  entry per message of the saga in the batch): the relay's, and those of the
  orchestrator and the workers publishing their own rows (``direct``).

From those it works out, for each command or compensation sent, where the time went:
written (history) -> published (its publisher's batch line, or the relay's
per-message debug line ``outbox_published``) -> received (inbox row or first
participant log line) -> handled (participant log) -> reply applied (orchestrator log,
else the step's next history row).

Reading is done by sagabox.store (SQL) and ``read_logs``; everything else here
is pure.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg

from outbox_relay.errors import MessageError, SagaboxError
from outbox_relay.message import decode
from outbox_relay.redaction import redact, redact_text
from outbox_relay.relay import describe_database
from sagabox import store

HANDLED_EVENTS = frozenset(
    {
        "command_applied",
        "command_refused",
        "compensation_applied",
        "compensation_refused",
        "command_cancelled",
        "command_tombstoned",
        "compensation_skipped",
        "inbox_duplicate_skipped",
        "command_dead_lettered",
        "message_rejected",
    }
)
REPLY_EVENTS = frozenset({"saga_transitioned", "reply_ignored"})
PUBLISHED_EVENT = "outbox_published"  # one message; the relay logs it at debug
# A participant sent the next command of a routing slip (participants/handling.py).
FORWARDED_EVENT = "slip_forwarded"
BATCH_EVENT = "outbox_batch_published"  # a confirmed batch, at info
IN_PROCESS = "in process"  # a slip's next step handled where the step before it was
NON_PARTICIPANTS = frozenset({"orchestrator", "relay", "sagabox"})


class TraceError(SagaboxError):
    """The id is not a UUID, or no database and no log knows it."""


@dataclass(frozen=True, slots=True)
class Entry:
    """One thing that happened to the saga, from one source."""

    at: datetime
    source: str  # history | outbox | inbox | log
    where: str  # a database (host/name) or a log's service
    what: str  # the event, transition or status
    step: str | None = None
    message_id: str | None = None
    detail: str = ""
    data: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class Hop:
    """One command or compensation sent by the orchestrator (or forwarded by a participant
    down a routing slip), and where its time went."""

    message_id: str
    written: datetime
    step: str | None = None
    kind: str | None = None
    type: str | None = None
    attempt: int | None = None
    published: datetime | None = None
    published_by: str | None = None
    received: datetime | None = None
    handled: datetime | None = None
    replied: datetime | None = None
    outcome: str | None = None
    pending: bool = False


@dataclass(frozen=True, slots=True)
class Trace:
    correlation_id: str
    saga: Mapping[str, Any] | None
    entries: list[Entry]
    hops: list[Hop]


def parse_id(value: str) -> str:
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise TraceError(f"not a saga / correlation id (a UUID): {value!r}") from None


def log_files(paths: Iterable[str | Path]) -> Iterator[Path]:
    """The files named, and every file in the folders named (recursively), sorted."""
    for path in map(Path, paths):
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.is_file())
        elif path.is_file():
            yield path
        else:
            raise TraceError(f"no such log file or folder: {path}")


def is_saga_line(record: Mapping[str, Any], correlation_id: str) -> bool:
    """True for a line of the saga: its ``correlation_id``, or a relay batch line
    whose ``correlation_ids`` list it."""
    if record.get("correlation_id") == correlation_id:
        return True
    listed = record.get("correlation_ids")
    return isinstance(listed, list) and correlation_id in listed


def read_logs(paths: Iterable[str | Path], correlation_id: str) -> list[dict[str, Any]]:
    """The JSON log lines of ``correlation_id`` in ``paths`` (other lines are skipped)."""
    found: list[dict[str, Any]] = []
    for path in log_files(paths):
        with open(path, encoding="utf-8", errors="replace") as lines:
            for line in lines:
                if correlation_id not in line:
                    continue  # cheap filter before parsing
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if isinstance(record, dict) and is_saga_line(record, correlation_id):
                    found.append(record)
    return found


def _time(value: object) -> datetime | None:
    if isinstance(value, datetime):
        return value
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value)
        except ValueError:
            return None
    return None


def history_entries(database: str, rows: Sequence[Mapping[str, Any]]) -> list[Entry]:
    entries = []
    for row in rows:
        moved = (
            f"{row['from_status']} -> {row['to_status']}"
            if row["from_status"] and row["from_status"] != row["to_status"]
            else row["to_status"]
        )
        emitted = row["emitted"] or []
        detail = "; ".join(
            part
            for part in (
                moved,
                f"attempt {row['attempt']}" if row["attempt"] else "",
                redact_text(row["reason"] or ""),
                f"emitted {', '.join(m[:8] for m in emitted)}" if emitted else "",
            )
            if part
        )
        entries.append(
            Entry(
                row["at"], "history", database, row["event"], row["step"], row["message_id"],
                detail, {k: v for k, v in row.items() if k != "at"},
            )
        )  # fmt: skip
    return entries


def outbox_entries(database: str, rows: Sequence[Mapping[str, Any]]) -> list[Entry]:
    entries = []
    for row in rows:
        step = kind = None
        try:
            envelope = decode(row["body"])
            step, kind = envelope.step, f"{envelope.kind} {envelope.type}"
        except MessageError:
            pass
        state = "parked" if row["parked_at"] else "pending"
        detail = f"{kind or '?'} to {row['destination']}; attempts {row['attempts']}"
        if row["error"]:
            detail += f"; {redact_text(row['error'])}"
        data = {k: v for k, v in row.items() if k != "body"}
        entries.append(
            Entry(row["created_at"], "outbox", database, f"outbox_{state}", step,
                  row["message_id"], detail, data)
        )  # fmt: skip
    return entries


def inbox_entries(database: str, rows: Sequence[Mapping[str, Any]]) -> list[Entry]:
    entries = []
    for row in rows:
        reply = row["reply_type"] or ""
        reason = (row["reply_payload"] or {}).get("reason")
        detail = f"{row['action']} {row['status']}" + (f"; reply {reply}" if reply else "")
        if reason:
            detail += f": {redact_text(str(reason))}"
        entries.append(
            Entry(row["received_at"], "inbox", database, f"inbox_{row['status']}", row["step"],
                  row["message_id"], detail, redact(dict(row)))
        )  # fmt: skip
    return entries


def relay_name(record: Mapping[str, Any]) -> str:
    """Which relay wrote a line: its service, pid and, when logged, host."""
    name = f"{record.get('service', 'relay')} pid {record.get('pid', '?')}"
    return f"{name} on {record['host']}" if record.get("host") else name


def published_records(record: Mapping[str, Any], correlation_id: str) -> Iterator[dict[str, Any]]:
    """A relay batch line as one ``outbox_published`` record per message of the saga.

    The other sagas' ids are left out: they are none of this trace's business, and
    a batch holds up to hundreds of them.
    """
    message_ids, correlation_ids = record.get("message_ids"), record.get("correlation_ids")
    if not isinstance(message_ids, list) or not isinstance(correlation_ids, list):
        return
    common = {k: v for k, v in record.items() if k not in ("message_ids", "correlation_ids")}
    common |= {"event": PUBLISHED_EVENT, "batch_event": BATCH_EVENT}
    common |= {"correlation_id": correlation_id, "published_by": relay_name(record)}
    for message_id, owner in zip(message_ids, correlation_ids, strict=False):
        if owner == correlation_id and isinstance(message_id, str):
            yield {**common, "message_id": message_id}


def _per_message(
    records: Sequence[Mapping[str, Any]], correlation_id: str | None
) -> list[Mapping[str, Any]]:
    """Batch lines split per message of the saga; a debug ``outbox_published`` line
    saying the same as a batch line is dropped."""
    split: list[Mapping[str, Any]] = []
    for record in records:
        if record.get("event") == BATCH_EVENT and correlation_id is not None:
            split += published_records(record, correlation_id)
    in_batches = {r["message_id"] for r in split}
    for record in records:
        if record.get("event") == BATCH_EVENT:
            continue
        if record.get("event") == PUBLISHED_EVENT and record.get("message_id") in in_batches:
            continue
        split.append(record)
    return split


def _published_detail(record: Mapping[str, Any]) -> str:
    batch = f"batch of {record.get('count', '?')} from {record.get('database', '?')}"
    if record.get("confirm_ms") is not None:
        batch += f", confirmed in {record['confirm_ms']}ms"
    return f"published by {record['published_by']}; message_id={record['message_id'][:8]}; {batch}"


def _published_entry(logged: datetime, record: Mapping[str, Any]) -> Entry:
    """One message of a relay batch line, at the time the batch went out: the relay
    logs the line only once the batch's last confirm is in."""
    at = logged
    confirm_ms = record.get("confirm_ms")
    if isinstance(confirm_ms, int | float) and not isinstance(confirm_ms, bool):
        at -= timedelta(milliseconds=confirm_ms)
    where = str(record.get("service", "?"))
    detail = _published_detail(record)
    return Entry(at, "log", where, PUBLISHED_EVENT, None, record["message_id"], detail, record)


def log_entries(
    records: Sequence[Mapping[str, Any]], correlation_id: str | None = None
) -> list[Entry]:
    """Timeline entries of log lines; relay batch lines give one per message of
    ``correlation_id`` (none without it)."""
    skip = {"event", "timestamp", "correlation_id", "service", "pid", "level", "step", "saga"}
    skip |= {"version"}
    entries = []
    for record in _per_message(records, correlation_id):
        at = _time(record.get("timestamp"))
        if at is None:
            continue
        if record.get("batch_event") == BATCH_EVENT:
            entries.append(_published_entry(at, record))
            continue
        extra = " ".join(
            f"{k}={str(v)[:8] if k.endswith('_id') and v else v}"
            for k, v in record.items()
            if k not in skip
        )
        entries.append(
            Entry(at, "log", str(record.get("service", "?")), str(record.get("event", "?")),
                  record.get("step"), record.get("message_id"), extra, dict(record))
        )  # fmt: skip
    return entries


def hops(entries: Sequence[Entry]) -> list[Hop]:
    """Each command or compensation the history says was emitted, and each command a
    participant forwarded down a routing slip, timed hop by hop."""
    found: dict[str, Hop] = {}
    history = [e for e in entries if e.source == "history"]
    for entry in history:
        for message_id in entry.data.get("emitted") or []:
            found.setdefault(message_id, Hop(message_id, entry.at))
    for entry in entries:
        forwarded = entry.data.get("next_message_id") if entry.what == FORWARDED_EVENT else None
        if isinstance(forwarded, str):
            step = entry.data.get("next_step")
            sent = found.setdefault(forwarded, Hop(forwarded, entry.at, step))
            if entry.data.get("local") and sent.published is None:
                # Handled by the participant that forwarded it, in the same transaction:
                # no outbox row, relay or broker in between.
                sent.published, sent.published_by = entry.at, IN_PROCESS
    for entry in sorted(entries, key=lambda e: e.at):
        hop = found.get(entry.message_id or "")
        if hop is None:
            if entry.source == "log" and entry.what in REPLY_EVENTS:
                hop = found.get(str(entry.data.get("causation_id")))
                if hop is not None and hop.replied is None:
                    hop.replied = entry.at
                    hop.outcome = str(entry.data.get("saga_event") or entry.what)
            continue
        _learn(hop, entry)
    for hop in found.values():
        if hop.replied is None and hop.step is not None:
            _reply_from_history(hop, history)
    return sorted(found.values(), key=lambda h: h.written)


def _learn(hop: Hop, entry: Entry) -> None:
    data = entry.data
    hop.step = hop.step or entry.step
    if entry.source == "outbox":
        hop.pending = True
        kind, _, type_ = entry.detail.partition(" to ")[0].partition(" ")
        hop.kind, hop.type = hop.kind or kind or None, hop.type or type_ or None
    elif entry.source == "inbox":
        if data.get("status") != "tombstone":
            hop.kind = hop.kind or str(data.get("action"))
        hop.received = min(filter(None, (hop.received, entry.at)))
        hop.outcome = hop.outcome or data.get("reply_type")
    elif entry.source == "log":
        hop.type = hop.type or data.get("type")
        if isinstance(data.get("attempt"), int):
            hop.attempt = hop.attempt or data["attempt"]
        if entry.what == FORWARDED_EVENT and hop.replied is None:
            # Its answer was the next command, not a reply.
            where = f" ({IN_PROCESS})" if data.get("local") else ""
            hop.replied, hop.outcome = entry.at, f"forwarded to {data.get('next_step')}{where}"
        if entry.what == PUBLISHED_EVENT:
            if hop.published is None:
                hop.published = entry.at
                hop.published_by = str(data.get("published_by") or relay_name(data))
        elif entry.where not in NON_PARTICIPANTS:
            hop.received = min(filter(None, (hop.received, entry.at)))
            if entry.what in HANDLED_EVENTS and hop.handled is None:
                hop.handled = entry.at


def _reply_from_history(hop: Hop, history: Sequence[Entry]) -> None:
    for entry in history:
        if (
            entry.at >= hop.written
            and entry.step == hop.step
            and entry.message_id
            and (hop.attempt is None or entry.data.get("attempt") == hop.attempt)
        ):
            hop.replied, hop.outcome = entry.at, entry.what
            return


def build(
    correlation_id: str,
    databases: Sequence[store.DatabaseRows],
    records: Sequence[Mapping[str, Any]],
) -> Trace:
    """The trace of ``correlation_id`` from what the databases and logs hold (pure)."""
    saga = next((d.saga for d in databases if d.saga), None)
    entries: list[Entry] = []
    for db in databases:
        entries += history_entries(db.database, db.history)
        entries += outbox_entries(db.database, db.outbox)
        entries += inbox_entries(db.database, db.inbox)
    entries += log_entries(records, correlation_id)
    if saga is None and not entries:
        raise TraceError(f"no database or log knows saga {correlation_id}")
    entries.sort(key=lambda e: e.at)
    entries = _with_steps(entries)
    return Trace(correlation_id, saga, entries, hops(entries))


def _with_steps(entries: list[Entry]) -> list[Entry]:
    """The relay's lines know no step: name it from another line of the same message."""
    steps = {e.message_id: e.step for e in entries if e.message_id and e.step}
    return [
        replace(e, step=steps.get(e.message_id or ""))
        if e.what == PUBLISHED_EVENT and not e.step
        else e
        for e in entries
    ]


def collect(correlation_id: str, database_urls: Sequence[str], logs: Sequence[str]) -> Trace:
    """Read every database and log named, and build the trace."""
    correlation_id = parse_id(correlation_id)
    rows = []
    for url in dict.fromkeys(database_urls):
        name = describe_database(url)
        try:
            rows.append(store.saga_rows(url, name, correlation_id))
        except psycopg.Error as e:
            raise TraceError(f"cannot read database {name}: {str(e).strip()}") from e
    return build(correlation_id, rows, read_logs(logs, correlation_id) if logs else [])


def _ms(start: datetime | None, end: datetime | None) -> str:
    if start is None or end is None:
        return "-"
    return f"{(end - start).total_seconds() * 1000:.0f}ms"


def _sent(hop: Hop) -> str:
    kind = {"command": "cmd", "compensation": "comp"}.get(hop.kind or "", hop.kind or "?")
    return f"{kind} {hop.type or ''}".strip()


def render_text(trace: Trace) -> str:
    """The trace for a human: the saga, the timeline, then the time per hop."""
    out: list[str] = []
    saga = trace.saga
    if saga:
        out.append(
            f"saga {trace.correlation_id} {saga['name']} v{saga['version']}: {saga['status']}"
            f" (created {saga['created_at']:%Y-%m-%d %H:%M:%S.%f}, updated"
            f" {saga['updated_at']:%H:%M:%S.%f})"
        )
    else:
        out.append(f"saga {trace.correlation_id}: not in the orchestrator database given")
    start = trace.entries[0].at if trace.entries else None
    out.append("")
    out.append("timeline:")
    for e in trace.entries:
        out.append(
            f"  +{_ms(start, e.at):>8}  {e.at:%H:%M:%S.%f}  {e.source:<7} {e.where:<28}"
            f" {e.what:<24} {e.step or '':<18} {e.detail}".rstrip()
        )
    out.append("")
    out.append("where time went (per command sent):")
    out.append(
        f"  {'step':<18} {'message':<8} {'sent':<24} {'att':>3} {'published':>10}"
        f" {'received':>9} {'handled':>8} {'replied':>8} {'total':>8}  outcome"
    )
    for hop in trace.hops:
        after_publish = hop.published or hop.written
        out.append(
            f"  {hop.step or '?':<18} {hop.message_id[:8]:<8} {_sent(hop):<24}"
            f" {hop.attempt or '':>3} {_ms(hop.written, hop.published):>10}"
            f" {_ms(after_publish, hop.received):>9} {_ms(hop.received, hop.handled):>8}"
            f" {_ms(hop.handled or hop.received, hop.replied):>8}"
            f" {_ms(hop.written, hop.replied):>8}"
            f"  {hop.outcome or ('pending in outbox' if hop.pending else '-')}"
        )
    return "\n".join(out)


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def render_json(trace: Trace) -> str:
    """The trace for machines: ``{"correlation_id", "saga", "timeline", "hops"}``."""
    return json.dumps(
        _jsonable(
            {
                "correlation_id": trace.correlation_id,
                "saga": trace.saga,
                "timeline": [asdict(e) for e in trace.entries],
                "hops": [asdict(h) for h in trace.hops],
            }
        ),
        default=str,
    )
