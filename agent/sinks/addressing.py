"""Where a broker sink puts an event: the placeholders of a topic or subject template.

An event's ``source`` is ``/sites/{site}/lines/{line}/machines/{machine}`` (machine events) or
``/sites/{site}/agents/{agent}`` (the agent's own events, such as data gaps: line ``_agent``,
machine = the agent id). ``{type}`` is the event type without the ``plantedge.`` prefix
(``downtime.started``). Ids are limited by the config schema to letters, digits, ``.``, ``_``
and ``-``, so they never contain MQTT wildcards or separators; a ``.`` in an id would split a
NATS subject token, which the config loader refuses for the ids a ``nats`` subject uses.

An event that did not come from this configuration (replayed from an export, written by another
version) may still carry anything in its source or type: ``unfit`` says why its topic or
subject cannot be built, and the sinks dead-letter such an event with that reason rather than
publish it somewhere else (a wildcard, an extra level) or retry it forever.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from agent.sinks.base import ItemResult, OutboundEvent, Outcome

__all__ = ["Address", "Destinations", "address_of", "event_type_of", "placeholders", "render",
           "unfit"]

_TYPE_KEY = '"type":"'
_PREFIX = "plantedge."
_PLACEHOLDER = re.compile(r"{([a-z]+)}")
# Characters a placeholder value must not bring into a topic or subject. MQTT: level separator,
# wildcards, NUL. NATS: token separator, wildcards, whitespace (the protocol's delimiters).
_MQTT_BAD = frozenset("/+#\0")
_NATS_BAD = frozenset(".*> \t\r\n\0")


@dataclass(frozen=True, slots=True)
class Address:
    site: str
    line: str
    machine: str
    type: str
    agent: str

    @property
    def is_machine(self) -> bool:
        return self.line != "_agent"


def event_type_of(payload: str) -> str:
    """The top-level ``type`` of a CloudEvent's JSON text.

    The agent serialises compactly with sorted keys, so the top-level ``type`` is the last
    key (``data`` comes first): read it without parsing the payload; anything else is parsed.
    """
    i = payload.rfind(_TYPE_KEY)
    if i >= 0:
        start = i + len(_TYPE_KEY)
        end = payload.find('"', start)
        if end > 0 and payload[end:].rstrip() == '"}':
            return payload[start:end]
    try:
        value = json.loads(payload).get("type", "")
    except (ValueError, AttributeError):
        value = ""
    return value if isinstance(value, str) else ""


def address_of(event: OutboundEvent, agent: str) -> Address:
    parts = event.source.strip("/").split("/")
    type_ = event_type_of(event.payload)
    short = type_[len(_PREFIX):] if type_.startswith(_PREFIX) else type_ or "unknown"
    if len(parts) == 6 and parts[0] == "sites" and parts[2] == "lines" \
            and parts[4] == "machines":
        return Address(parts[1], parts[3], parts[5], short, agent)
    if len(parts) == 4 and parts[0] == "sites" and parts[2] == "agents":
        return Address(parts[1], "_agent", parts[3], short, parts[3])
    # Not ours (a replayed foreign event): keep it addressable rather than refusing it.
    return Address("_unknown", "_unknown", "_unknown", short, agent)


def render(template: str, address: Address) -> str:
    return template.format(site=address.site, line=address.line, machine=address.machine,
                           type=address.type, agent=address.agent)


def placeholders(template: str) -> frozenset[str]:
    return frozenset(_PLACEHOLDER.findall(template))


def unfit(template: str, address: Address, kind: str) -> str | None:
    """Why ``address`` cannot fill ``template`` of a ``kind`` ('mqtt' or 'nats') sink, or None.

    Every placeholder value must be one topic level (one subject token); the type may span
    several NATS tokens (``downtime.started``), none of them empty."""
    bad = _MQTT_BAD if kind == "mqtt" else _NATS_BAD
    for key in sorted(placeholders(template)):
        value: str = getattr(address, key)
        if key == "type" and kind == "nats":
            parts = value.split(".")
            if all(p and not bad.intersection(p) for p in parts):
                continue
        elif value and not bad.intersection(value):
            continue
        shown = "".join(c if c.isprintable() else repr(c)[1:-1] for c in value)[:100]
        what = "topic level" if kind == "mqtt" else "subject token"
        return (f"the event's {key} '{shown}' is empty or contains a character that splits "
                f"or widens the {what} ({' '.join(sorted(repr(c)[1:-1] for c in bad))}): "
                f"its {'topic' if kind == 'mqtt' else 'subject'} from '{template}' would "
                "address something else")
    return None


class Destinations:
    """Each event's topic (MQTT) or subject (NATS) from ``template``, cached per (source,
    type), or the dead-letter verdict of an event that has none."""

    _MAX = 10_000  # bounded: sources x types is small anyway

    def __init__(self, template: str, kind: str, agent_id: str) -> None:
        self._template, self._kind, self._agent_id = template, kind, agent_id
        self._what = "MQTT topic" if kind == "mqtt" else "NATS subject"
        self._cache: dict[tuple[str, str], str | ItemResult] = {}

    def of(self, event: OutboundEvent) -> str | ItemResult:
        key = (event.source, event_type_of(event.payload))
        found = self._cache.get(key)
        if found is None:
            if len(self._cache) > self._MAX:
                self._cache.clear()
            address = address_of(event, self._agent_id)
            why = unfit(self._template, address, self._kind)
            found = render(self._template, address) if why is None else \
                ItemResult(Outcome.REJECTED, None, f"no {self._what} for this event: {why}")
            self._cache[key] = found
        return found
