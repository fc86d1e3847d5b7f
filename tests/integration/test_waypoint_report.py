"""A waypoint reports its requests to its node's agent: numbered records on its admin
listener (the pod's loopback, which the agent reaches from inside the pod's network
namespace; never on the metrics listener, which other pods reach), collected once each
into a flow history, and from there suggested and simulated as `ambit policy
suggest|simulate` do."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from agent.history import Filter, FlowHistory, RequestCursor, request_row
from agent.simulate import Observed, group_changes, judge, simulate, snapshot_pair
from agent.suggest import render, suggest
from ambit.http import get_json
from ambit.sources import LocalDirSource
from ambit.wire.snapshot import encode_snapshot
from tests.integration.test_waypoint import Rig, rig  # noqa: F401  (the fixture)


async def report(r: Rig, after: int = 0) -> Any:
    host, port = r.wp.addresses["admin"]
    status, body = await get_json(host, port, f"/requests?after={after}")
    assert status == 200, body
    return body


async def test_the_agent_collects_each_request_once_and_suggests_from_them(rig: Rig, tmp_path: Path) -> None:  # noqa: F811
    c = await rig.h1(f"{rig.mesh.prefix}.61")
    try:
        assert (await c.request("POST", "/api/v1/charges")).status == 200
        assert (await c.request("POST", "/api/v1/charges/42/refund")).status == 200
        assert (await c.request("GET", "/api/v1/charges")).status == 403
    finally:
        c.close()
    first = await report(rig)
    items = first["items"]
    assert [i["seq"] for i in items] == [1, 2, 3] and first["last"] == 3
    assert {i["dst_port"] for i in items} == {8080}  # the workload's port, as policy saw it
    assert items[0]["dst_identity"].endswith("/ns/pay/sa/charges") and items[0]["waypoint"] == "pay/wp"
    # only what is new; a bad cursor is a 400
    assert (await report(rig, after=3))["items"] == []
    host, port = rig.wp.addresses["admin"]
    assert (await get_json(host, port, "/requests?after=x"))[0] == 400
    # who called what is not for other pods: the metrics listener (the pod's IP) does not serve it
    host, port = rig.wp.addresses["metrics"]
    assert (await get_json(host, port, "/requests?after=0"))[0] == 404

    history = FlowHistory(tmp_path / "flows.db")
    history.open()
    try:
        cur = RequestCursor()
        history.add(request_row(x, "node-a", first["instance"]) for x in cur.take(first))
        assert cur.take(await report(rig, cur.after)) == []  # asked again: nothing twice
        assert history.flush()
        rows = history.aggregate(Filter(namespace="pay"))
    finally:
        history.close()
    observed = [Observed.from_row(r, "node-a") for r in rows]
    assert sum(o.count for o in observed) == 3
    snap = rig.wp.store.current
    result = suggest(observed, snap, "pay")
    text = render(result, "ambit policy suggest --namespace pay")
    [policy] = [d for d in yaml.safe_load_all(text) if d]
    assert policy["spec"]["selector"] == {"matchLabels": {"app": "charges"}}
    assert policy["spec"]["rules"][0]["to"] == [
        {"operation": {"ports": ["8080"], "methods": ["POST"], "paths": ["/api/v1/charges", "/api/v1/charges/*"]}}]
    # replayed with the suggestion applied: nothing observed breaks; another client is denied
    agent_objects = {"snapshot": [[k, ns, n, v] for (k, ns, n), v in encode_snapshot(snap).items()],
                     "objects": list(LocalDirSource(rig.mesh.cluster_dir).current().objects.values())}
    pair = snapshot_pair(agent_objects, [policy])
    sim = simulate(observed, {}, pair)
    assert not sim.breaks, group_changes(sim.newly_denied)
    other = Observed(**{**observed[0].__dict__, "src_identity": "spiffe://cluster.local/ns/shop/sa/client",
                        "src_workload": "shop/client"})
    d = judge(other, pair[1])
    assert not isinstance(d, str) and not d.allowed
