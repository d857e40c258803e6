"""Classifying downtime episodes after the fact: late PLC reasons and operator/API reasons.

Part of one machine's detector, so pure like it: no clock (the caller passes every time), no
I/O; its state is saved with the detector's snapshot, in the same transaction as the events.

A classification is its own event, ``plantedge.downtime.classified``, with the episode's
``episode_id``: events already sent (``started``, ``ended``) are never changed. Each
classification gets a deterministic id (UUIDv5 over the source, the type, the episode, the
code, who classified, and the machine's saved sequence number), so re-detecting it after a
crash gives the same id. The receiver takes the latest classification of an episode.

Where a reason comes from and what it classifies::

    PLC reason tag changes to a code  ─┬─ an episode is open ──> that episode (the ended event
                                       │                         carries it; no extra event)
                                       ├─ no episode open, the last reported one ended at most
                                       │  reason_grace ago, and no stop began since
                                       │      ──> classified(by plc) for that episode
                                       └─ otherwise ──> not attributed: counted, in /status,
                                                        logged by the runtime (never silent)
    operator / API: (episode, code)    ──> the open (reported) episode or one of the last
                                           ``RECENT`` ended ones: classified(by operator|api)

Invariants:
- A classification identical to the episode's latest one (same code, text and author) makes
  no event: the same request twice gives one event (and the same answer).
- A PLC code equal to the episode's latest code makes no event (a latched reason re-read after
  a restart is not news).
- The grace period of an episode ends when the next stop begins (even a micro-stop): a reason
  seen after that cannot be told apart from a reason for the new stop.
- Codes from the operator or the API are checked against the machine's ``reasons`` map when it
  has one; PLC codes are taken as they come (an unmapped code is still a fact).
- A request with an idempotency key answers as it did the first time for as long as the key is
  among the machine's last ``KEYS`` keys (saved with the state): a client retrying request A
  after someone else classified with B does not make A the latest again. The same key with a
  different request is refused (KeyReused), changing nothing.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any

from agent.detect.config import DowntimeRule
from agent.detect.episode import Episode
from config.model import EventType, format_time, parse_time

__all__ = [
    "KEYS",
    "RECENT",
    "Classification",
    "Classifier",
    "EpisodeNotFound",
    "EpisodeRecord",
    "KeyReused",
    "UnknownCode",
    "key_digest",
]

# Ended episodes remembered per machine for listing and classification: a shift's worth of
# stops on a busy line, a few kilobytes of detector state.
RECENT = 20
# Idempotency keys remembered per machine: far more than the requests a client retries at
# once, a few kilobytes of detector state.
KEYS = 64

Emit = Callable[[EventType, datetime, tuple[object, ...], dict[str, Any]], str]


@dataclass(slots=True)
class EpisodeRecord:
    """An ended, reported episode (what a classification needs to know about it)."""

    episode_id: str
    category: str
    started_at: str  # RFC 3339, as sent
    ended_at: str
    duration_seconds: float
    reason_code: str | None  # the latest code: first PLC code, then each classification
    order_id: str | None
    classified_by: str | None = None
    classified_at: str | None = None
    text: str | None = None
    classification_id: str | None = None


# The fields of a record, in order: a record is saved with every detector state commit (up to
# RECENT of them), and ``dataclasses.asdict`` deep-copies each value of each one; the values
# are plain strings and numbers, so the same dict is built directly.
_RECORD_FIELDS = tuple(f.name for f in fields(EpisodeRecord))


@dataclass(frozen=True, slots=True)
class Classification:
    """The answer to a classification request: the event that carries it."""

    episode_id: str
    event_id: str
    reason_code: str
    created: bool  # False: identical to the episode's latest classification, no new event


class UnknownCode(ValueError):
    """The code is not in the machine's ``reasons`` map."""

    def __init__(self, code: str, known: list[str]) -> None:
        super().__init__(f"unknown reason code {code!r}; known codes: {', '.join(known)}")
        self.code, self.known = code, known


class EpisodeNotFound(LookupError):
    """No such episode among the open (reported) one and the recent ended ones."""


def key_digest(key: str) -> str:
    """How an idempotency key is remembered."""
    return _digest([key])


def _digest(parts: list[str]) -> str:
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:32]


class KeyReused(ValueError):
    """An idempotency key seen before with a different request."""


class Classifier:
    def __init__(self, rule: DowntimeRule, emit: Emit) -> None:
        self.rule = rule
        self._emit = emit
        self.recent: list[EpisodeRecord] = []  # oldest first
        self.grace_open = False  # the newest record may still take a late PLC reason
        # The open episode's latest classification (code, text, by, event id), if any.
        self.open_classification: tuple[str, str | None, str, str] | None = None
        self.unattributed_total = 0
        self.last_unattributed: dict[str, Any] | None = None
        self.notes: list[str] = []  # for the runtime's log; not saved
        # digest of an idempotency key -> [digest of the request, code, episode id, event id]
        # (digests: a 255-character key and a 500-character text would make each record up
        # to 1 KB, rewritten with every state commit of the machine), oldest first.
        self.keys: dict[str, list[str]] = {}

    # ------------------------------------------------------------------ episode lifecycle

    def on_opened(self) -> None:
        self.grace_open = False
        self.open_classification = None

    def on_ended(self, ep: Episode, ended_at: datetime, duration: float) -> None:
        rec = EpisodeRecord(ep.episode_id, ep.category, format_time(ep.started_at),
                            format_time(ended_at), round(duration, 3), ep.last_reason_code,
                            ep.order_id)
        if self.open_classification is not None:
            code, text, by, eid = self.open_classification
            rec.reason_code, rec.text, rec.classified_by = code, text, by
            rec.classification_id = eid
        self.open_classification = None
        self.recent.append(rec)
        del self.recent[:-RECENT]
        self.grace_open = True

    def on_unannounced_end(self) -> None:
        """A micro-stop ended: it was a stop, so the previous episode's grace is over."""
        self.grace_open = False
        self.open_classification = None

    # ------------------------------------------------------------------ PLC reasons

    def on_plc_reason(self, code: str, t: datetime) -> bool:
        """A new reason code while no episode is open; True when it belongs to the last
        ended episode (it classified it, or it is that episode's code already)."""
        rec = self.recent[-1] if self.recent else None
        if rec is None:  # no reported stop yet (a fresh state): still never silent
            self._unattributed(code, t, None, None, "no stop has been reported yet")
            return False
        if code == rec.reason_code:
            return self.grace_open
        late = (t - parse_time(rec.ended_at)).total_seconds()
        grace = self.rule.reason_grace
        if self.grace_open and grace > 0 and late <= grace:  # 0 is off, even at late == 0
            self._classify_record(rec, code, None, "plc", t)
            return True
        why = ("another stop began since" if not self.grace_open
               else f"{late:.0f}s after it ended, grace {self.rule.reason_grace:g}s")
        self._unattributed(code, t, rec.episode_id, late, why)
        return False

    def _unattributed(self, code: str, t: datetime, episode_id: str | None,
                      late: float | None, why: str) -> None:
        self.unattributed_total += 1
        self.last_unattributed = {"code": code, "at": format_time(t),
                                  "last_episode_id": episode_id,
                                  "seconds_after_end": None if late is None else round(late, 3)}
        target = f"to episode {episode_id}" if episode_id else "to a stop"
        self.notes.append(f"reason code {code!r} at {format_time(t)} not attributed {target} "
                          f"({why}); classify it with `edge-agent reason set` if it belongs "
                          "there")

    # ------------------------------------------------------------------ operator / API

    def check_code(self, code: str) -> None:
        reasons = self.rule.reasons
        if reasons and code not in reasons:
            raise UnknownCode(code, sorted(reasons))

    def find(self, episode_id: str) -> EpisodeRecord | None:
        return next((r for r in self.recent if r.episode_id == episode_id), None)

    def classify(self, open_ep: Episode | None, episode_id: str | None, code: str,
                 text: str | None, by: str, at: datetime,
                 key: str | None = None) -> Classification:
        """Classify the named episode (or, with None, the open reported one, else the latest
        ended one). Raises EpisodeNotFound, UnknownCode or KeyReused; nothing changes then."""
        kd = key_digest(key) if key is not None else None
        asked = _digest([episode_id or "", code, text or "", by])
        seen = self.keys.get(kd) if kd is not None else None
        if seen is not None:
            if seen[0] != asked:
                raise KeyReused(f"Idempotency-Key {key!r} was used for another request "
                                f"(episode {seen[2]}, code {seen[1]!r})")
            return Classification(seen[2], seen[3], seen[1], False)
        result = self._classify(open_ep, episode_id, code, text, by, at)
        if kd is not None:
            self.keys[kd] = [asked, code, result.episode_id, result.event_id]
            for old in list(self.keys)[:-KEYS]:
                del self.keys[old]
        return result

    def _classify(self, open_ep: Episode | None, episode_id: str | None, code: str,
                  text: str | None, by: str, at: datetime) -> Classification:
        self.check_code(code)
        if open_ep is not None and open_ep.announced and episode_id in (None,
                                                                          open_ep.episode_id):
            return self.classify_open(open_ep, code, text, by, at)
        if episode_id is None:
            if not self.recent:
                raise EpisodeNotFound("no reported episode to classify yet")
            return self.classify_ended(self.recent[-1], code, text, by, at)
        rec = self.find(episode_id)
        if rec is None:
            if open_ep is not None and open_ep.episode_id == episode_id:
                raise EpisodeNotFound(f"episode {episode_id} is not reported yet (shorter "
                                      "than min_duration so far)")
            raise EpisodeNotFound(f"no episode {episode_id} (only the open one and the last "
                                  f"{RECENT} ended ones can be classified)")
        return self.classify_ended(rec, code, text, by, at)

    def listing(self, open_ep: Episode | None, recent: int) -> list[dict[str, Any]]:
        """The open episode (if reported) and the ``recent`` latest ended ones, newest first."""
        out: list[dict[str, Any]] = []
        if open_ep is not None and open_ep.announced:
            oc = self.open_classification
            out.append({"episode_id": open_ep.episode_id, "open": True,
                        "category": open_ep.category,
                        "started_at": format_time(open_ep.started_at), "ended_at": None,
                        "duration_seconds": None, "reason_code": open_ep.reason_code,
                        "reason": self._text(open_ep.reason_code, oc[1] if oc else None),
                        "order_id": open_ep.order_id, "classified_by": oc[2] if oc else None})
        for rec in reversed(self.recent[-recent:] if recent > 0 else []):
            out.append({"episode_id": rec.episode_id, "open": False,
                        "category": rec.category, "started_at": rec.started_at,
                        "ended_at": rec.ended_at, "duration_seconds": rec.duration_seconds,
                        "reason_code": rec.reason_code,
                        "reason": self._text(rec.reason_code, rec.text),
                        "order_id": rec.order_id, "classified_by": rec.classified_by,
                        "classified_at": rec.classified_at})
        return out

    def _text(self, code: str | None, text: str | None) -> str | None:
        return self.rule.reasons.get(code or "") or text

    def open_reason_text(self, ep: Episode) -> str | None:
        """The open episode's reason as people read it: the configured name of its code, else
        the text an operator gave with it."""
        oc = self.open_classification
        return self._text(ep.reason_code, oc[1] if oc else None)

    def classify_open(self, ep: Episode, code: str, text: str | None, by: str,
                      at: datetime) -> Classification:
        latest = self.open_classification
        if latest is not None and latest[:3] == (code, text, by):
            return Classification(ep.episode_id, latest[3], code, False)
        eid = self._emit(EventType.DOWNTIME_CLASSIFIED, at, (ep.episode_id, code, by),
                         self._data(ep.episode_id, format_time(ep.started_at), None,
                                    ep.order_id, code, ep.last_reason_code, text, by, at))
        ep.reason_code = ep.last_reason_code = code
        self.open_classification = (code, text, by, eid)
        return Classification(ep.episode_id, eid, code, True)

    def classify_ended(self, rec: EpisodeRecord, code: str, text: str | None, by: str,
                       at: datetime) -> Classification:
        if rec.classification_id is not None and (rec.reason_code, rec.text,
                                                  rec.classified_by) == (code, text, by):
            return Classification(rec.episode_id, rec.classification_id, code, False)
        eid = self._classify_record(rec, code, text, by, at)
        return Classification(rec.episode_id, eid, code, True)

    # ------------------------------------------------------------------ output and state

    def _classify_record(self, rec: EpisodeRecord, code: str, text: str | None, by: str,
                         at: datetime) -> str:
        eid = self._emit(EventType.DOWNTIME_CLASSIFIED, at, (rec.episode_id, code, by),
                         self._data(rec.episode_id, rec.started_at, rec.ended_at, rec.order_id,
                                    code, rec.reason_code, text, by, at))
        rec.reason_code, rec.text, rec.classified_by = code, text, by
        rec.classified_at, rec.classification_id = format_time(at), eid
        return eid

    def _data(self, episode_id: str, started_at: str, ended_at: str | None,
              order_id: str | None, code: str, previous: str | None, text: str | None,
              by: str, at: datetime) -> dict[str, Any]:
        data: dict[str, Any] = {
            "episode_id": episode_id, "reason_code": code, "classified_by": by,
            "classified_at": format_time(at), "started_at": started_at, "ended_at": ended_at,
            "order_id": order_id, "previous_reason_code": previous,
        }
        mapped = self.rule.reasons.get(code)
        if mapped or text:
            data["reason"] = mapped or text
        if text and mapped and text != mapped:
            data["comment"] = text
        category = self.rule.reason_categories.get(code)
        if category is not None:
            data["category"] = category.value
        return data

    def take_notes(self) -> list[str]:
        notes, self.notes = self.notes, []
        return notes

    def to_json(self) -> dict[str, Any]:
        return {"recent": [{f: getattr(r, f) for f in _RECORD_FIELDS} for r in self.recent],
                "grace_open": self.grace_open,
                "open": list(self.open_classification) if self.open_classification else None,
                "unattributed_total": self.unattributed_total,
                "last_unattributed": self.last_unattributed,
                "keys": [[k, *v] for k, v in self.keys.items()]}

    def restore(self, d: dict[str, Any] | None) -> None:
        if not d:
            return  # a snapshot from before classification existed
        self.recent = [EpisodeRecord(**r) for r in d.get("recent", [])]
        self.grace_open = bool(d.get("grace_open", False))
        oc = d.get("open")
        self.open_classification = (str(oc[0]), oc[1], str(oc[2]), str(oc[3])) if oc else None
        self.unattributed_total = int(d.get("unattributed_total", 0))
        self.last_unattributed = d.get("last_unattributed")
        self.keys = {str(k[0]): [str(v) for v in k[1:]] for k in d.get("keys", [])}
