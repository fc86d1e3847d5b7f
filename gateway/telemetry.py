"""What the gateway tells about every request: the waypoint's telemetry (Istio's metrics, one JSON
access-log line, a span) with `reporter="gateway"`, plus the requests it answered itself.

- `istio_requests_total` and friends (waypoint.telemetry), `reporter="gateway"`,
  `connection_security_policy` `none` (HTTP) or `tls` (HTTPS);
- `ambit_gateway_rejections_total{listener, route, reason, response_code}`: every request
  answered at the gateway instead of reaching a backend, by why (no_route, jwt_invalid,
  denied, rate_limited, body_too_large, cors_refused...);
- the access log's line has, besides the waypoint's fields, the listener, the route and rule,
  how the client address was found, the JWT's subject, the rate limit that refused, the
  backend and the hop into the mesh.
"""

from __future__ import annotations

from prometheus_client import Counter

from waypoint.telemetry import RecentRequests, RequestFacts, RequestLog, Tracing, WaypointMetrics

__all__ = ["GatewayMetrics", "RecentRequests", "RequestFacts", "RequestLog", "Tracing"]

REPORTER = "gateway"


class GatewayMetrics(WaypointMetrics):
    """The waypoint's families (reporter "gateway") and the gateway's own, in one registry."""

    def __init__(self) -> None:
        super().__init__(reporter=REPORTER)
        self.rejections = Counter(
            "ambit_gateway_rejections_total",
            "Requests the gateway answered itself instead of forwarding, by reason",
            ("listener", "route", "reason", "response_code"), registry=self.registry)

    def rejected(self, listener: str | None, route: str | None, reason: str, status: int) -> None:
        self.rejections.labels(listener or "-", route or "-", reason, str(status)).inc()
