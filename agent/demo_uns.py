"""``edge-agent demo --sink mqtt``: the demo's events go to a Unified Namespace on the local
Mosquitto instead of the reference receiver, and a watcher prints what arrives on the topics.

The sink is a plain ``type: mqtt`` sink (QoS 1, default topic layout
``{site}/{line}/{machine}/events/{type}``, retained state per machine); the watcher is an
ordinary MQTT subscriber on ``demo-plant/#`` that prints each event once (by its id) with its
topic, and each retained state change, as a UNS consumer would see them.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

__all__ = ["UNS_SINK_YAML", "UnsWatcher"]

UNS_SINK_YAML = """\
sinks:
  uns:
    type: mqtt
    url: "{mqtt_url}"
    client_id: demo-edge-01-uns
    topic: "{site}/{line}/{machine}/events/{type}"
    state_topic: "{site}/{line}/{machine}/state"
    batch_max_events: 50
    retry: {initial_backoff: 200ms, max_backoff: 5s}
"""


class UnsWatcher:
    """Subscribes to ``demo-plant/#`` on the broker and prints events and states."""

    def __init__(self, port: int, describe: Callable[[dict[str, Any]], str]) -> None:
        self._describe = describe
        self._lock = threading.Lock()
        self.ids: set[str] = set()
        self.copies = 0
        self._subscribed = threading.Event()
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="demo-uns-watcher",
                             protocol=mqtt.MQTTv5)
        client.on_connect = lambda c, *_a: c.subscribe("demo-plant/#", qos=1)
        client.on_subscribe = lambda *_a: self._subscribed.set()
        client.on_message = self._on_message
        client.connect("127.0.0.1", port, keepalive=30)
        client.loop_start()
        self._client = client
        self._subscribed.wait(10)

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        if "/events/" not in msg.topic and not msg.topic.endswith("/state"):
            return  # the sealer's own status and reject messages
        try:
            doc = json.loads(msg.payload)
        except ValueError:
            return
        with self._lock:
            if msg.topic.endswith("/state"):
                down = doc.get("downtime") or {}
                print(f"  UNS {msg.topic:<42} state={doc.get('state')}"
                      + (f" episode={down.get('episode_id', '')[:8]}" if down else "")
                      + (f" order={doc['order_id']}" if doc.get("order_id") else ""),
                      flush=True)
                return
            self.copies += 1
            if doc.get("id") in self.ids:
                return  # a re-send after a lost PUBACK: a UNS consumer dedups by id
            self.ids.add(doc.get("id", ""))
        print(f"  UNS {msg.topic:<42}{self._describe(doc)}", flush=True)

    def received(self) -> int:
        with self._lock:
            return len(self.ids)

    def close(self) -> None:
        self._client.loop_stop()
        self._client.disconnect()
