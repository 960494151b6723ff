"""The REST API v1, Server-Sent Events, metrics and the dashboard, on quart-trio + hypercorn."""

from gateway.http.app import create_app, serve
from gateway.http.context import AppContext

__all__ = ["AppContext", "create_app", "serve"]
