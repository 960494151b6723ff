"""Sensor gateway: MQTT in, validated storage, rules, SSE and a REST API, on Trio."""

__version__ = "0.1.0"
