"""Waypoint: the opt-in L7 proxy (HTTP authorization, metrics, access logs).

The HTTP engine sits between two byte streams (the client's, the destination's)
and knows nothing of HBONE, identities or policy: the rest of the package (the
process) is its glue, and hands it callbacks (`exchange.Hooks`). The engine:
  paths       request targets: parsed and normalized for policy matching (pure)
  sniff       which protocol a connection speaks, from its first bytes (pure)
  exchange    what the engine and the glue exchange: Request, Verdict, RequestRecord,
              Limits, Hooks (pure)
  headers     per-hop fields, what may be forwarded, the text view (pure)
  admission   one request head judged: the engine's checks, then the glue's decision (pure)
  streams     the byte-stream interface, an adapter for callback-style legs, memory pipes
  h1peer      one side of the HTTP/1 proxy: an h11 connection on a byte stream
  http1       HTTP/1.x downstream to HTTP/1.1 upstream
  h2input     HTTP/2 input before h2 sees it: frames split, floods counted, GOAWAY kept
  h2side      one side of the HTTP/2 proxy: h2 on a byte stream, flow control, back-pressure
  h2upstream  the upstream HTTP/2 connections of one downstream connection
  h2exchange  one HTTP/2 request: a downstream stream and its upstream stream
  http2       HTTP/2 downstream to HTTP/2 upstream
  engine      one connection: sniff, then the matching proxy
"""

from __future__ import annotations

from ambit import AmbitError


class WaypointError(AmbitError):
    """Base of every error the waypoint raises."""
