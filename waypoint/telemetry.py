"""What the waypoint tells about every request: Istio's HTTP metrics, one JSON access-log line,
and a W3C trace span carrying the security facts.

- Metrics, with Istio's names and labels (`reporter="waypoint"`; an ingress gateway, which
  reuses this module, reports as `gateway`):
  `istio_requests_total`, `istio_request_duration_milliseconds`, `istio_request_bytes`,
  `istio_response_bytes`; plus `ambit_waypoint_denials_total{source_workload,...,policy}`,
  `ambit_policy_dry_run_decisions_total{policy,decision}` and
  `ambit_waypoint_ext_authz_checks_total{provider,result}`.
- Access log: one JSON line per request (method, authority, path, status, both identities,
  client IP, the deciding policy and rule, duration, trace id; `dry_run` and `ext_authz`
  when dry-run policies or external authorizers had a say).
- Tracing: the OpenTelemetry SDK. A request's `traceparent` (and `tracestate`) is continued,
  or a trace started; one span per request holds source principal, destination, decision
  and policy; with `--otlp-endpoint` spans are exported over OTLP/gRPC, else only their ids
  appear (in the access log, and in the `traceparent` sent on to the destination).
"""

from __future__ import annotations

import json
import logging
import secrets
import sys
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.trace import (
    NonRecordingSpan,
    Span,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
)
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from prometheus_client import CollectorRegistry, Counter, Histogram

from ambit.http import Response
from ambit.policy import DryRun

log = logging.getLogger("ambit.waypoint.telemetry")

REQUEST_LABELS = (
    "reporter",
    "source_workload",
    "source_workload_namespace",
    "source_principal",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_service",
    "destination_service_name",
    "destination_service_namespace",
    "request_protocol",
    "response_code",
    "response_flags",
    "connection_security_policy",
)
# Istio's default buckets for request durations (ms) and sizes (bytes)
DURATION_BUCKETS = (0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 300000,
                    600000, 1800000, 3600000)
SIZE_BUCKETS = (1, 10, 100, 1000, 10000, 100000, 1000000, 10000000, 100000000)


@dataclass
class RequestFacts:
    """Everything the telemetry says about one request; filled as the request goes."""

    method: str = ""
    authority: str = ""
    path: str = ""
    protocol: str = "http"  # Istio's request_protocol: http or grpc
    status: int = 0
    response_flags: str = "-"
    client_ip: str = ""
    source_workload: str | None = None  # ns/name
    source_principal: str | None = None
    destination_workload: str | None = None
    destination_principal: str | None = None
    destination_service: str | None = None  # ns/name
    decision: str = "pending"  # allow | deny
    policy: str | None = None
    rule: int | None = None
    reason: str = ""
    request_principal: str | None = None  # from a JWT
    request_bytes: int = 0
    response_bytes: int = 0
    duration_ms: float = 0.0
    trace_id: str | None = None
    error: str | None = None
    connection_security_policy: str = "mutual_tls"  # Istio's label: mutual_tls | none
    extra: dict[str, Any] = field(default_factory=dict)


def _split(uid: str | None) -> tuple[str, str]:
    if not uid or "/" not in uid:
        return "unknown", "unknown"
    ns, name = uid.split("/", 1)
    return name, ns


class WaypointMetrics:
    """The waypoint's families in their own registry (`reporter` names who reports)."""

    def __init__(self, reporter: str = "waypoint") -> None:
        self.reporter = reporter
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("istio_requests_total", "Requests handled by the waypoint", REQUEST_LABELS,
                                registry=r)
        self.duration = Histogram("istio_request_duration_milliseconds", "Request duration (ms)",
                                  REQUEST_LABELS, buckets=DURATION_BUCKETS, registry=r)
        self.request_bytes = Histogram("istio_request_bytes", "Request body sizes (bytes)", REQUEST_LABELS,
                                       buckets=SIZE_BUCKETS, registry=r)
        self.response_bytes = Histogram("istio_response_bytes", "Response body sizes (bytes)", REQUEST_LABELS,
                                        buckets=SIZE_BUCKETS, registry=r)
        self.denials = Counter("ambit_waypoint_denials_total",
                               "Requests the waypoint denied, by source workload and deciding policy",
                               ("source_workload", "source_workload_namespace", "destination_workload",
                                "destination_workload_namespace", "response_code", "policy"), registry=r)
        self.dry_run = Counter("ambit_policy_dry_run_decisions",
                               "What dry-run AuthorizationPolicies would have decided on requests (never enforced)",
                               ("policy", "decision"), registry=r)
        self._children: dict[tuple[str, ...], tuple[Any, Any, Any, Any]] = {}
        self.ext_authz = Counter("ambit_waypoint_ext_authz_checks",
                                 "Requests an external authorizer was asked about (CUSTOM policies), by result",
                                 ("provider", "result"), registry=r)

    def note_dry_run(self, f: RequestFacts, dry_run: Sequence[DryRun]) -> None:
        """What dry-run policies would have decided on a request: into its log line and the metric."""
        if dry_run:
            f.extra["dry_run"] = [x.to_dict() for x in dry_run]
            for x in dry_run:
                self.dry_run.labels(x.policy, x.decision).inc()

    def record(self, f: RequestFacts) -> None:
        src_name, src_ns = _split(f.source_workload)
        dst_name, dst_ns = _split(f.destination_workload)
        svc_name, svc_ns = _split(f.destination_service)
        key = (  # in REQUEST_LABELS' order
            self.reporter, src_name, src_ns, f.source_principal or "unknown", dst_name, dst_ns,
            f.destination_principal or "unknown",
            f"{svc_name}.{svc_ns}.svc.cluster.local" if f.destination_service else "unknown",
            svc_name, svc_ns, f.protocol, str(f.status), f.response_flags, f.connection_security_policy,
        )
        children = self._children.get(key)
        if children is None:
            # prometheus_client's labels() validates and locks on every call (~8 us each, four
            # per request); the children of one label set are kept, as many as the series
            children = self._children[key] = (
                self.requests.labels(*key), self.duration.labels(*key),
                self.request_bytes.labels(*key), self.response_bytes.labels(*key))
        requests, duration, request_bytes, response_bytes = children
        requests.inc()
        duration.observe(f.duration_ms)
        request_bytes.observe(f.request_bytes)
        response_bytes.observe(f.response_bytes)
        if f.decision == "deny":
            self.denied(f, str(f.status))

    def denied(self, f: RequestFacts, response_code: str) -> None:
        """Count a denial by source and destination workload and the deciding policy."""
        src_name, src_ns = _split(f.source_workload)
        dst_name, dst_ns = _split(f.destination_workload)
        self.denials.labels(src_name, src_ns, dst_name, dst_ns, response_code, f.policy or "-").inc()


# Envoy's response flags for how an exchange failed (RequestRecord.failure), as both proxies
# report them; a request they answered themselves is flagged by the proxy (DENY, UAEX, RL, ...)
FAILURE_FLAGS = {"upstream_connect": "UF", "upstream_reset": "UR", "upstream_protocol": "UPE",
                 "upstream_timeout": "UT", "client_reset": "DC", "bad_request": "DPE", "client_protocol": "DPE",
                 "headers_too_large": "DPE", "body_too_large": "DPE", "decide_error": "-"}


def failure_flag(failure: object) -> str:
    return FAILURE_FLAGS.get(str(failure or ""), "-")


RECENT_REQUESTS = 512  # request records kept for /requests (ambit flows, the node's history)


class RecentRequests:
    """The last request records of a waypoint or gateway, numbered, served on its admin
    listener (the pod's loopback only: they say who called what) as `/requests?after=N`: those
    numbered past N, with the process's `instance`. `ambit flows` lists them; the node's agent,
    which enters the pod's network namespace to ask, takes each once into its flow history."""

    def __init__(self, size: int = RECENT_REQUESTS) -> None:
        self.instance = secrets.token_hex(8)  # a restarted proxy numbers from 1 again
        self._items: deque[dict[str, Any]] = deque(maxlen=size)
        self._seq = 0

    def append(self, record: dict[str, Any]) -> None:
        self._seq += 1
        self._items.append({**record, "seq": self._seq})

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self._items)

    def report(self, method: str, query: dict[str, str]) -> Response:
        try:
            after = int(query.get("after", "0"))
        except ValueError:
            return Response.json({"error": "use ?after=N (the last sequence number taken)"}, 400)
        return Response.json({"instance": self.instance, "last": self._seq,
                              "items": [r for r in self._items if r["seq"] > after]})


class RequestLog:
    """One JSON line per request, to a file path or stdout ("-")."""

    def __init__(self, target: str = "-", reporter: str = "waypoint") -> None:
        self.target = target
        self.reporter = reporter
        if target != "-":
            Path(target).parent.mkdir(parents=True, exist_ok=True)
        self._out: IO[str] = sys.stdout if target == "-" else open(target, "a", buffering=1)  # noqa: SIM115

    def write(self, f: RequestFacts) -> None:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "reporter": self.reporter,
            "method": f.method, "authority": f.authority, "path": f.path, "protocol": f.protocol,
            "status": f.status, "response_flags": f.response_flags,
            "client_ip": f.client_ip, "src_workload": f.source_workload, "src_identity": f.source_principal,
            "dst_workload": f.destination_workload, "dst_identity": f.destination_principal,
            "dst_service": f.destination_service, "request_principal": f.request_principal,
            "decision": f.decision, "policy": f.policy, "rule": f.rule, "reason": f.reason,
            "bytes_received": f.request_bytes, "bytes_sent": f.response_bytes,
            "duration_ms": round(f.duration_ms, 3), "trace_id": f.trace_id, "error": f.error, **f.extra,
        }
        try:
            self._out.write(json.dumps(entry, separators=(",", ":")) + "\n")
        except (OSError, ValueError) as e:  # a full disk must not stop the proxy
            log.warning("access log %s: %s", self.target, e)

    def close(self) -> None:
        if self._out is not sys.stdout:
            self._out.close()


_KNOWN_FLAGS = 0x03  # W3C trace-flags: sampled (0x01) and random trace id (0x02)


class Tracing:
    """W3C trace context in and out, and one span per request (exported when configured)."""

    def __init__(self, service_name: str, otlp_endpoint: str | None = None) -> None:
        self.provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
        self.exporting = otlp_endpoint is not None
        if otlp_endpoint is not None:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            self.provider.add_span_processor(
                BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_endpoint, insecure=True),
                                   schedule_delay_millis=500))
        self.tracer = self.provider.get_tracer("ambit.waypoint")
        self.propagator = TraceContextTextMapPropagator()
        self._ids = RandomIdGenerator()

    def start(self, name: str, headers: Mapping[str, str], attributes: Mapping[str, Any]) -> Span:
        """A server span continuing the request's `traceparent` (or starting a trace)."""
        ctx = self.propagator.extract(carrier=dict(headers))
        if not self.exporting:
            # Nothing would read a recorded span: continue the trace (or start one) with a span
            # id of our own and record nothing (an SDK span per request cost ~30 us here). The
            # flags are what the SDK's default sampler sends: the parent's sampled and random
            # bits (W3C's other bits are reserved, sent as zero), a new trace sampled and random.
            parent = trace.get_current_span(ctx).get_span_context()
            if parent.is_valid:
                trace_id, flags, state = parent.trace_id, TraceFlags(parent.trace_flags & _KNOWN_FLAGS), parent.trace_state
            else:
                trace_id, flags, state = self._ids.generate_trace_id(), TraceFlags(_KNOWN_FLAGS), None
            return NonRecordingSpan(SpanContext(trace_id, self._ids.generate_span_id(), is_remote=False,
                                                trace_flags=flags, trace_state=state))
        return self.tracer.start_span(name, context=ctx, kind=SpanKind.SERVER,
                                      attributes={k: v for k, v in attributes.items() if v is not None})

    def outgoing(self, span: Span) -> list[tuple[str, str]]:
        """The `traceparent` (and `tracestate`) to send on, with `span` as the parent."""
        carrier: dict[str, str] = {}
        self.propagator.inject(carrier, context=trace.set_span_in_context(span))
        return sorted(carrier.items())

    @staticmethod
    def trace_id(span: Span) -> str:
        return format(span.get_span_context().trace_id, "032x")

    @staticmethod
    def finish(span: Span, f: RequestFacts) -> None:
        if not span.is_recording():
            return
        values: dict[str, str | int | None] = {
            "http.request.method": f.method, "url.path": f.path, "server.address": f.authority,
            "http.response.status_code": f.status, "ambit.decision": f.decision,
            "ambit.policy": f.policy, "ambit.rule": f.rule, "ambit.reason": f.reason,
            "ambit.source.principal": f.source_principal, "ambit.destination.workload": f.destination_workload,
            "ambit.request.principal": f.request_principal, "ambit.response_flags": f.response_flags,
        }
        attrs = {k: v for k, v in values.items() if v is not None}
        span.set_attributes(attrs)
        if f.status >= 500 or f.error:
            span.set_status(Status(StatusCode.ERROR, f.error or str(f.status)))
        span.end()

    def close(self) -> None:
        self.provider.shutdown()
