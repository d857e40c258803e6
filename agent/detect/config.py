"""Configuration of one machine's detector: how its state is derived, downtime and scrap rules.

Detection's own config piece: it names tags by id only (which source serves a tag is the
wiring's business), so detection never imports a protocol.
"""

from __future__ import annotations

from enum import StrEnum

from pydantic import Field, field_validator, model_validator

from config.base import Strict, check_id
from config.units import Duration, DurationOrZero

__all__ = ["AlarmReason", "AlarmsRule", "CategoryName", "DowntimeRule", "MachineConfig",
           "ScrapRule", "StateName", "StateRule"]


class StateName(StrEnum):
    RUNNING = "running"
    IDLE = "idle"
    DOWN = "down"
    PLANNED = "planned"


class CategoryName(StrEnum):
    UNPLANNED = "unplanned"
    PLANNED = "planned"
    IDLE = "idle"


class StateRule(Strict):
    tag: str | None = Field(None, description="Tag that gives the machine state (may be left "
                            "out when only a production counter's stall rule decides).")
    map: dict[str, StateName] | None = Field(None, min_length=1, description="Tag value -> "
                                             "running / idle / down / planned. Keys are "
                                             "compared as text, so 1 and '1' are the same.")
    default: StateName | None = Field(None, description="State for a value not in 'map' "
                                      "(without it an unmapped value leaves the state unknown).")
    running_above: float | None = Field(None, description="Numeric tag: running when the value "
                                        "is above this, otherwise down.")
    running_below: float | None = Field(None, description="Numeric tag: running when the value "
                                        "is below this, otherwise down.")
    production_counter: str | None = Field(None, description="Counter of good output; with "
                                           "'stalled_after' a running machine whose counter "
                                           "does not increase is down (reason 'no-output').")
    stalled_after: Duration | None = Field(None, description="How long without an increase of "
                                           "'production_counter' counts as a stall.")

    @field_validator("map", mode="before")
    @classmethod
    def _keys_as_text(cls, v: object) -> object:
        if isinstance(v, dict):
            return {str(k).strip(): s for k, s in v.items()}
        return v

    @model_validator(mode="after")
    def _one_rule(self) -> StateRule:
        rules = [r for r in ("map", "running_above", "running_below")
                 if getattr(self, r) is not None]
        if (self.production_counter is None) != (self.stalled_after is None):
            raise ValueError("'production_counter' and 'stalled_after' go together")
        if self.tag is None:
            if rules:
                raise ValueError(f"'{rules[0]}' needs 'tag'")
            if self.production_counter is None:
                raise ValueError("give 'tag' with one of 'map', 'running_above' or "
                                 "'running_below', or a 'production_counter' with "
                                 "'stalled_after'")
        elif len(rules) != 1:
            raise ValueError("give exactly one of 'map', 'running_above' or 'running_below'")
        if self.default is not None and self.map is None:
            raise ValueError("'default' goes with 'map'")
        return self


class AlarmReason(Strict):
    """One alarm-to-reason rule: every given field must match (condition and source compare
    with the alarm's ConditionName and SourceName or SourceNode, event_type with its
    EventType node id, e.g. 'i=10637' for OffNormalAlarmType)."""

    condition: str | None = Field(None, description="ConditionName of the alarm.")
    source: str | None = Field(None, description="SourceName or SourceNode (node id text) of "
                               "the alarm.")
    event_type: str | None = Field(None, description="EventType node id, e.g. 'i=10637' or "
                                   "'ns=2;i=5001'.")
    code: str = Field(min_length=1, description="Reason code reported for the stop.")
    text: str | None = Field(None, description="Reason text (default: downtime.reasons[code], "
                             "else the alarm's message).")
    category: CategoryName | None = Field(None, description="Category of a stop that "
                                              "begins while this alarm is active (default: "
                                              "from the machine state).")

    @model_validator(mode="after")
    def _something(self) -> AlarmReason:
        if self.condition is None and self.source is None and self.event_type is None:
            raise ValueError("give at least one of 'condition', 'source' or 'event_type'")
        return self


class AlarmsRule(Strict):
    tag: str = Field(description="An OPC UA tag of kind: alarms (the alarm events of a "
                     "notifier).")
    sources: list[str] = Field(default_factory=list, description="Only alarms whose "
                               "SourceName or SourceNode is one of these belong to this "
                               "machine (default: every alarm of the tag).")
    reasons: list[AlarmReason] = Field(default_factory=list, description="Alarm -> reason "
                                       "code rules, first match wins. An active alarm no rule "
                                       "matches gives its ConditionName as the code and its "
                                       "message as the text.")


class DowntimeRule(Strict):
    min_duration: DurationOrZero = Field(0.0, description="Stops shorter than this are not "
                                         "reported as downtime episodes.")
    reason_tag: str | None = Field(None, description="Tag with the stop reason code; the first "
                                   "non-zero code seen during the stop is reported.")
    reasons: dict[str, str] = Field(default_factory=dict, description="Reason code -> text.")
    alarms: AlarmsRule | None = Field(None, description="Take the stop reason (and category) "
                                      "from the active OPC UA alarms of the machine's source "
                                      "nodes when reason_tag gives none: the most severe, "
                                      "then the earliest active alarm.")
    max_duration: Duration | None = Field(None, description="Split longer episodes: one ends "
                                          "and the next starts (continued_from) every "
                                          "max_duration, so long stops show up in reports "
                                          "before they end.")
    reason_grace: DurationOrZero = Field(300.0, description="A reason code that the PLC sets "
                                         "within this long after a stop ended classifies that "
                                         "stop (a plantedge.downtime.classified event); a later "
                                         "one is logged and counted, not attributed. 0 turns "
                                         "it off.")
    reason_categories: dict[str, CategoryName] = Field(
        default_factory=dict, description="Reason code -> the category it implies (unplanned, "
        "planned or idle); sent as 'category' on classification events.")

    @field_validator("reasons", mode="before")
    @classmethod
    def _keys_as_text(cls, v: object) -> object:
        if isinstance(v, dict):
            return {str(k).strip(): str(t) for k, t in v.items()}
        return v

    @field_validator("reason_categories", mode="before")
    @classmethod
    def _category_keys_as_text(cls, v: object) -> object:
        if isinstance(v, dict):
            return {str(k).strip(): c for k, c in v.items()}
        return v


class ScrapRule(Strict):
    counter: str | None = Field(None, description="Monotonic scrap counter tag (rollover at "
                                "the type's width and resets to zero are handled).")
    quantity_tag: str | None = Field(None, description="Tag whose every sample is a scrap "
                                     "quantity (reject messages).")
    window: Duration = Field(60.0, description="Scrap is summed over this window into one "
                             "scrap.recorded event.")
    counter_bits: int | None = Field(None, description="Counter width in bits for rollover "
                                     "(default: from the tag's type, else 32).")
    max_step: int | None = Field(None, ge=1, description="An increase larger than this in one "
                                 "sample is implausible: reported in /status, not posted as "
                                 "scrap.")
    total_counter: str | None = Field(None, description="Counter of all parts made; with "
                                      "'good_counter', scrap = total increase - good increase.")
    good_counter: str | None = Field(None, description="Counter of good parts (goes with "
                                     "'total_counter').")
    reason_tag: str | None = Field(None, description="Tag with the scrap reason code; the first "
                                   "non-zero code in a window is reported.")

    @model_validator(mode="after")
    def _one(self) -> ScrapRule:
        if (self.total_counter is None) != (self.good_counter is None):
            raise ValueError("'total_counter' and 'good_counter' go together")
        given = [r for r in ("counter", "quantity_tag", "total_counter")
                 if getattr(self, r) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of 'counter', 'quantity_tag' or "
                             "'total_counter' + 'good_counter'")
        return self


class MachineConfig(Strict):
    line: str = Field(description="Line id; part of the event source.")
    state: StateRule = Field(description="How the machine state is derived.")
    downtime: DowntimeRule = Field(default_factory=DowntimeRule, description="Downtime rules.")
    scrap: ScrapRule | None = Field(None, description="Scrap counting (optional).")
    order_tag: str | None = Field(None, description="Tag with the active production order id.")
    stale_after: Duration | None = Field(None, description="The state is unknown when its tag "
                                         "has no sample for this long (default: the source's "
                                         "stale limit).")

    @field_validator("line")
    @classmethod
    def _line(cls, v: str) -> str:
        return check_id(v, "line")

    def tag_refs(self) -> list[tuple[str, str]]:
        """(key path inside the machine, tag id) of every tag this machine reads."""
        refs: list[tuple[str, str]] = []
        if self.state.tag:
            refs.append(("state.tag", self.state.tag))
        if self.state.production_counter:
            refs.append(("state.production_counter", self.state.production_counter))
        if self.downtime.reason_tag:
            refs.append(("downtime.reason_tag", self.downtime.reason_tag))
        if self.downtime.alarms:
            refs.append(("downtime.alarms.tag", self.downtime.alarms.tag))
        if self.scrap and self.scrap.counter:
            refs.append(("scrap.counter", self.scrap.counter))
        if self.scrap:
            for key in ("quantity_tag", "total_counter", "good_counter", "reason_tag"):
                if getattr(self.scrap, key):
                    refs.append((f"scrap.{key}", getattr(self.scrap, key)))
        if self.order_tag:
            refs.append(("order_tag", self.order_tag))
        return refs
