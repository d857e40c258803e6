"""MQTT source: JSON / raw payloads and Sparkplug B from a broker (paho-mqtt on asyncio)."""
