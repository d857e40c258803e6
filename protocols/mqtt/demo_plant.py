"""The demo plant's MQTT machine: a local Mosquitto broker and a sealer that publishes JSON.

``MqttDemoMachine.create(workdir)`` starts Mosquitto on a free loopback port (None when the
binary is not installed; the demo then says so and runs without it). The machine ``sealer-5``
publishes its status (retained, QoS 1) and one reject message per rejected batch, on a 30 s
script like the demo's other machines; ``SOURCE_YAML`` and ``MACHINE_YAML`` are the matching
configuration blocks, loaded by the demo through the same loader as a plant's own file.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from config.tasks import wait_event
from protocols.mqtt.broker import MosquittoBroker, find_mosquitto

__all__ = ["MACHINE_YAML", "SOURCE_YAML", "MqttDemoMachine"]

_STATUS = "demo-plant/line4/sealer/status"
_REJECT = "demo-plant/line4/sealer/reject"

SOURCE_YAML = """\
  plant-broker:
    type: mqtt
    url: "{mqtt_url}"
    client_id: demo-edge-01
    protocol: "5"
    backoff: {initial: 200ms, max: 2s}
    tags:
      sealer.state:  {topic: demo-plant/line4/sealer/status, value: $.state}
      sealer.reason: {topic: demo-plant/line4/sealer/status, value: $.reason}
      sealer.reject: {topic: demo-plant/line4/sealer/reject, value: $.qty, value_type: number}
"""

MACHINE_YAML = """\
  sealer-5:
    line: line-4
    state: {tag: sealer.state, map: {RUNNING: running, STOPPED: down, MAINT: planned}}
    downtime:
      min_duration: 2s
      reason_tag: sealer.reason
      reasons: {SEAL-TEMP: Seal bar too cold}
    scrap: {quantity_tag: sealer.reject, window: 5s}
"""

# (second within the 30 s cycle, state, reason)
_SCRIPT = [(0.0, "RUNNING", ""), (7.0, "STOPPED", "SEAL-TEMP"), (14.0, "RUNNING", ""),
           (21.0, "MAINT", ""), (26.0, "RUNNING", "")]


class MqttDemoMachine:
    def __init__(self, broker: MosquittoBroker) -> None:
        self.broker = broker
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="demo-sealer-5")
        self._rng = random.Random(11)

    @classmethod
    def create(cls, workdir: Path) -> MqttDemoMachine | None:
        """Start the broker and connect the machine; None without a mosquitto binary."""
        if find_mosquitto() is None:
            return None
        broker = MosquittoBroker(workdir)
        broker.start()
        machine = cls(broker)
        machine._client.connect("127.0.0.1", broker.port)
        machine._client.loop_start()  # paho's own thread: publish() is thread-safe
        return machine

    @property
    def url(self) -> str:
        return self.broker.url

    def _status(self, state: str, reason: str) -> None:
        self._client.publish(_STATUS, json.dumps({"state": state, "reason": reason}), qos=1,
                             retain=True)

    async def run(self, stop: asyncio.Event) -> None:
        t0 = time.monotonic()
        step, cycle, state = 0, 0, "RUNNING"
        next_reject = 1.0
        while not stop.is_set():
            now = time.monotonic() - t0
            while cycle * 30 + _SCRIPT[step][0] <= now:
                _, state, reason = _SCRIPT[step]
                self._status(state, reason)
                step += 1
                if step == len(_SCRIPT):
                    step, cycle = 0, cycle + 1
            if now >= next_reject:
                if state == "RUNNING" and self._rng.random() < 0.6:
                    self._client.publish(_REJECT, json.dumps({"qty": self._rng.randint(1, 2)}),
                                         qos=1)
                next_reject += 1.5
            await wait_event(stop, 0.1)

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()
        self.broker.kill()
