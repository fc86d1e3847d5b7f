"""Ingress gateway: the edge of the mesh (`ambit gateway run`).

It terminates HTTP and HTTPS from clients outside the mesh, decides every request
(routes, Istio's JWT and authorization, rate limits, input validation, CORS) and hands
allowed ones into the mesh over HBONE with its own SPIFFE identity. The HTTP engine is
the waypoint's (`waypoint.engine` and the modules it drives): the gateway is its glue.

Pure modules (tested by tables):
  spec        reading Kubernetes-shaped specs: errors that name the object and field
  routes      HTTPRoute: compiled, attached to listeners, matched with Gateway API precedence
  filters     the request and response edits of a rule: header modifiers, redirects, rewrites
  cors        the CORS filter: preflights answered, response headers for allowed origins
  ratelimit   RateLimitPolicy (ambit.dev/v1alpha1): compiled, and token buckets per key
  listeners   the Gateway (class ambit-ingress): ports, listeners, hostnames, certificates
  view        everything the gateway serves, compiled from the cluster (last good kept)
  backends    where a backend Service is dialed: its waypoint, or an endpoint's node
  decide      one request, from route to verdict: the gateway's pipeline
I/O:
  tls         TLS contexts from the Secrets (in memory), chosen by SNI
  telemetry   the waypoint's metrics, access log and tracing, reporter "gateway"
  server      the process: listeners, the engine's hooks, HBONE into the mesh, admin
  cli         `ambit gateway run`
"""

from __future__ import annotations

from ambit import AmbitError


class GatewayError(AmbitError):
    """Base of every error the gateway raises."""
