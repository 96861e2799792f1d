"""Where shard actors go: round robin over the nodes that offer CPUs, as a soft affinity."""

from typing import Any

import pytest
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from engine.shell import ray_actor


def _node(node_id: str, cpus: float, alive: bool = True) -> dict[str, Any]:
    return {"NodeID": node_id, "Alive": alive, "Resources": {"CPU": cpus} if cpus else {}}


def test_actors_go_round_robin_over_the_alive_nodes_with_cpus(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    head, w1, w2, gone = ("0" * 55 + str(n) for n in range(4))
    nodes = [_node(head, 0), _node(w2, 2), _node(w1, 1), _node(gone, 4, alive=False)]
    monkeypatch.setattr(ray_actor.ray, "nodes", lambda: nodes)
    assert ray_actor.placement_nodes() == [w1, w2]
    placed = [ray_actor._placement(shard) for shard in range(4)]
    assert all(isinstance(p, NodeAffinitySchedulingStrategy) and p.soft for p in placed)
    assert [p.node_id for p in placed] == [w1, w2, w1, w2]


def test_without_a_node_offering_cpus_every_alive_node_takes_actors(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(ray_actor.ray, "nodes", lambda: [_node("b", 0), _node("a", 0)])
    assert ray_actor.placement_nodes() == ["a", "b"]


def test_when_the_nodes_cannot_be_listed_ray_spreads_the_actors(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def unlisted() -> list[dict[str, Any]]:
        raise ConnectionError("no GCS")

    monkeypatch.setattr(ray_actor.ray, "nodes", unlisted)
    assert ray_actor._placement(0) == "SPREAD"
