"""ASGI middleware recording request count, latency and in-flight requests.

Pure ASGI rather than ``BaseHTTPMiddleware``: the latter runs the app in a task group,
which would wrap errors raised while streaming the body (e.g. the upload limit).
"""

from __future__ import annotations

import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.serving.metrics import Metrics

UNRECORDED = ("/metrics", "/healthz", "/readyz", "/v2/health/live", "/v2/health/ready")


class RequestMetrics:
    def __init__(self, app: ASGIApp, metrics: Metrics, known_models) -> None:
        self.app, self.metrics, self.known_models = app, metrics, known_models

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.monotonic(), 500

        async def send_recording(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_recording)
        finally:
            self.metrics.in_flight.dec()
            path = getattr(scope.get("route"), "path", "unmatched")
            if path not in UNRECORDED:
                model = scope.get("state", {}).get("model", "")
                labels = (model if model in self.known_models() else "", path, str(status))
                self.metrics.requests.labels(*labels).inc()
                self.metrics.request_latency.labels(*labels).observe(time.monotonic() - started)
