"""Where a broker sink puts an event: the placeholders of a topic or subject template.

An event's ``source`` is ``/sites/{site}/lines/{line}/machines/{machine}`` (machine events) or
``/sites/{site}/agents/{agent}`` (the agent's own events, such as data gaps: line ``_agent``,
machine = the agent id). ``{type}`` is the event type without the ``plantedge.`` prefix
(``downtime.started``). Ids are limited by the config schema to letters, digits, ``.``, ``_``
and ``-``, so they never contain MQTT wildcards or separators.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from agent.sinks.base import OutboundEvent

__all__ = ["Address", "address_of", "event_type_of", "render"]

_TYPE_KEY = '"type":"'
_PREFIX = "plantedge."


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
