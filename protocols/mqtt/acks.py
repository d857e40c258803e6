"""Acknowledging QoS 1 messages after their commit, reading backpressure, redelivery memory.

- QoS 1 messages are acknowledged only after the commit that holds their effect (events and
  detector states): each read burst's acknowledgements go to the sink's ``when_committed``
  (``flush``). A kill before that commit leaves them unacknowledged, and the broker redelivers
  them to the next session of the persistent session. A sink with nothing durable behind it
  (no ``when_committed``) gets them acknowledged at once.
- While more than ``_MAX_OUTSTANDING`` wait for a commit (commits fail: disk full), the
  connection stops reading rather than pile them up in memory; it reads again once half of
  them are acknowledged. Past ``_ACK_SOON`` waiting, the commit is asked for without waiting
  out the group commit interval: the broker's in-flight window (Mosquitto's default is 20)
  would otherwise run dry.
- A redelivery (DUP flag, same packet id, topic and payload as a message this process already
  applied in the previous connection) is not applied twice; it is acknowledged after the next
  commit. This memory belongs to the broker and client id, not the instance, so a new instance
  after a reload recognises what the old one applied; a skipped redelivery stays remembered
  until a later connection has acknowledged it. Only the last ``_DEDUP_WINDOW`` messages of a
  connection are remembered: the broker's window of unacknowledged messages is far smaller,
  and packet ids are reused only after 65535 others. A message committed but killed before
  its PUBACK left is counted again after the restart (at least once: the window is the write
  of one packet).

Everything here runs on the event loop thread (paho's callbacks and the commit callbacks).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable

import paho.mqtt.client as mqtt

from protocols.mqtt.bridge import PahoConnection

__all__ = ["Acks"]

log = logging.getLogger(__name__)

# QoS 1 messages applied but not yet acknowledged (their commit is pending): past this the
# connection stops reading until commits catch up.
_MAX_OUTSTANDING = 2000
# Ask for a commit without waiting out the group commit interval once this many wait.
_ACK_SOON = 16
_DEDUP_WINDOW = 4096


class _Applied:
    """QoS 1 messages one client id applied in this process: the current connection's (packet
    id -> digest of topic and payload) and the previous one's, which the broker may redeliver
    (DUP) to the next connection."""

    __slots__ = ("recent", "redelivery")

    def __init__(self) -> None:
        self.recent: OrderedDict[int, int] = OrderedDict()
        self.redelivery: dict[int, int] = {}


_APPLIED: dict[tuple[str, int, str], _Applied] = {}


class Acks:
    """The acknowledgement bookkeeping of one source; see the module docstring.

    ``begin(conn)`` at the start of each connection, ``end()`` when it is over; ``redelivered``
    for each QoS 1 message as it arrives, ``flush`` after each read burst."""

    def __init__(self, name: str, broker: tuple[str, int, str]) -> None:
        """``broker``: (host, port, client id), the key of the redelivery memory."""
        self._name = name
        # Shared by every instance for this broker and client id in this process: a reload
        # that changes the source builds a new instance, and the broker redelivers to it.
        self._applied = _APPLIED.setdefault(broker, _Applied())
        self._burst: list[int] = []
        self._conn: PahoConnection | None = None
        self.outstanding = 0  # QoS 1 messages applied, acknowledgement waiting for a commit
        self.redeliveries_skipped = 0

    def begin(self, conn: PahoConnection) -> None:
        applied = self._applied
        applied.redelivery.update(applied.recent)
        applied.recent = OrderedDict()
        self._burst = []
        self._conn = conn

    def end(self) -> None:
        self._conn = None

    def flush(self, conn: PahoConnection, when_committed: Callable[..., None] | None) -> None:
        """The read burst is handed to the sink: its acknowledgements wait for the commit."""
        if self._burst:
            mids, self._burst = self._burst, []
            if when_committed is None:  # nothing durable behind this sink
                conn.ack(mids)
            else:
                self._defer(conn, mids, when_committed)

    def _defer(self, conn: PahoConnection, mids: list[int],
               when_committed: Callable[..., None]) -> None:
        count = len(mids)
        self.outstanding += count

        def committed() -> None:
            self.outstanding -= count
            conn.ack(mids)  # nothing if that connection has ended: the broker redelivers
            current = self._conn
            if current is not None and current.paused \
                    and self.outstanding <= _MAX_OUTSTANDING // 2:
                current.resume_reading()

        when_committed(committed, soon=self.outstanding >= _ACK_SOON)

    def redelivered(self, msg: mqtt.MQTTMessage) -> bool:
        """Remember an applied QoS 1 message; True for a redelivery already applied."""
        mid = msg.mid
        digest = hash((msg.topic, bytes(msg.payload)))
        self._burst.append(mid)
        conn = self._conn
        if self.outstanding + len(self._burst) >= _MAX_OUTSTANDING and conn is not None \
                and not conn.paused:
            log.warning("source %s: %d messages wait for a commit; reading paused until the "
                        "buffer commits again", self._name,
                        self.outstanding + len(self._burst))
            conn.pause_reading()
        applied = self._applied
        if applied.redelivery:
            if msg.dup and applied.redelivery.get(mid) == digest:
                del applied.redelivery[mid]
                self.redeliveries_skipped += 1
                # Until its PUBACK is out it stays a candidate for the next connection.
                applied.recent[mid] = digest
                return True
            if not msg.dup:  # the broker resends before anything new: redelivery is over
                applied.redelivery.clear()
        recent = applied.recent
        recent[mid] = digest
        recent.move_to_end(mid)
        if len(recent) > _DEDUP_WINDOW:
            recent.popitem(last=False)
        return False
