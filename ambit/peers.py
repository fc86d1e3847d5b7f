"""Who is on the other end of an HBONE connection, as far as the snapshot lets a receiver trust it.

Pure. Both receivers of HBONE use it: the destination ztunnel (from a source
ztunnel or a waypoint) and the waypoint (from a source ztunnel). The peer's
identity is proven by its certificate; what it says about its client (the
`forwarded` header) is taken only when the snapshot backs the claim.
"""

from __future__ import annotations

from dataclasses import dataclass

from ambit.snapshot import Snapshot, WaypointInfo, Workload
from ambit.spiffe import SpiffeId


@dataclass(frozen=True)
class ClientAddress:
    """Who the client of an HBONE stream is, as far as the receiver can trust it."""

    ip: str | None  # the address policy sees (ipBlocks); None: refuse the stream
    workload: Workload | None
    reason: str  # why `ip` was taken, or why the claim was refused


def client_address(snap: Snapshot, peer_ip: str, peer_identity: SpiffeId | None,
                   forwarded_for: str | None) -> ClientAddress:
    """The client IP of an HBONE stream for policy and logs.

    A source ztunnel names its client in `forwarded: for=`; the receiver takes it only when
    the claim is consistent with what the TLS handshake proved: the address belongs to a
    workload whose identity is the peer's certificate identity, and the HBONE connection comes
    from that workload's node. A waypoint passes on the address its own peer proved, so a
    waypoint's claim is taken when the peer is a waypoint of the snapshot (its identity, from
    one of its pods' addresses). A stream without the header is judged by the peer's address
    (a client that does not say, e.g. a plain HBONE client); a claim that cannot be verified is
    refused, since taking it would let a peer pick the address an `ipBlocks` rule sees.
    """
    if forwarded_for is None:
        return ClientAddress(peer_ip, None, "no forwarded header: the HBONE peer's address")
    w = snap.workload_by_ip(forwarded_for)
    wp = waypoint_at(snap, peer_identity, peer_ip)
    if wp is not None:
        return ClientAddress(forwarded_for, w, f"forwarded by waypoint {wp.uid}")
    if w is None:
        return ClientAddress(None, None, f"the HBONE peer {peer_ip} ({peer_identity}) claims client "
                             f"{forwarded_for}, which is no workload this node knows")
    if peer_identity is None or w.identity != peer_identity:
        return ClientAddress(None, w, f"the HBONE peer {peer_ip} presented {peer_identity} but claims client "
                             f"{forwarded_for}, which is {w.uid} ({w.identity})")
    if w.node_address != peer_ip:
        return ClientAddress(None, w, f"the HBONE peer {peer_ip} claims client {forwarded_for} ({w.uid}), "
                             f"which runs on node {w.node} at {w.node_address or 'an unknown address'}")
    return ClientAddress(forwarded_for, w, f"forwarded by {w.node}'s ztunnel for {w.uid}")


def waypoint_at(snap: Snapshot, identity: SpiffeId | None, ip: str | None) -> WaypointInfo | None:
    """The waypoint whose pods have this identity (and, given `ip`, one of them this address)."""
    if identity is None:
        return None
    for wp in snap.waypoints.values():
        if wp.identity == identity and (ip is None or ip in wp.addresses):
            return wp
    return None


def serving_waypoint(snap: Snapshot, identity: SpiffeId | None, dst: Workload) -> WaypointInfo | None:
    """The waypoint that `identity` proves the peer to be, if that waypoint may call `dst`: the
    waypoint `dst` uses, or the waypoint of a Service whose endpoint `dst` is. Such a peer has
    enforced `dst`'s policies with the original client's identity."""
    wp = waypoint_at(snap, identity, None)
    if wp is None or wp.namespace != dst.namespace:
        return None
    if dst.waypoint == wp.name:
        return wp
    for svc in snap.services.values():
        if svc.waypoint == wp.name and svc.namespace == wp.namespace and dst.uid in svc.endpoints:
            return wp
    return None
