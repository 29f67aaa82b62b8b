"""The EPLB port: the README's worked example, and the invariants of both policies."""

from __future__ import annotations

import numpy as np
import pytest

from policies.baselines.eplb import balanced_packing, rebalance_experts, replicate_experts

README_WEIGHT = [
    [90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
    [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27],
]
README_PHY2LOG = [
    [5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
    [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1],
]


def test_readme_example_hierarchical() -> None:
    phy2log, log2phy, logcnt = rebalance_experts(README_WEIGHT, 16, 4, 2, 8)
    assert phy2log.tolist() == README_PHY2LOG
    # log2phy lists, for every expert, exactly the slots that hold it
    for layer in range(2):
        for e in range(12):
            slots = sorted(int(s) for s in log2phy[layer, e] if s >= 0)
            assert slots == sorted(np.flatnonzero(phy2log[layer] == e).tolist())
            assert len(slots) == logcnt[layer, e]


@pytest.mark.parametrize("groups,nodes,gpus,replicas", [(4, 2, 8, 16), (3, 2, 4, 16), (8, 4, 32, 288)])
def test_invariants(groups: int, nodes: int, gpus: int, replicas: int) -> None:
    rng = np.random.default_rng(groups * 100 + gpus)
    experts = 12 if replicas == 16 else 256
    w = rng.lognormal(0, 1, size=(3, experts)) * 100
    phy2log, _, logcnt = rebalance_experts(w, replicas, groups if experts % groups == 0 else 1, nodes, gpus)
    assert phy2log.shape == (3, replicas)
    assert (logcnt >= 1).all() and (logcnt.sum(-1) == replicas).all()
    for layer in range(3):
        assert np.bincount(phy2log[layer], minlength=experts).tolist() == logcnt[layer].tolist()


def test_hierarchical_keeps_groups_on_nodes() -> None:
    rng = np.random.default_rng(1)
    w = rng.lognormal(0, 1, size=(4, 64)) * 100
    phy2log, _, _ = rebalance_experts(w, 96, 8, 4, 16)  # 8 groups of 8 experts, 4 nodes of 4 GPUs
    per_node = 96 // 4
    for layer in range(4):
        for node in range(4):
            groups = {int(e) // 8 for e in phy2log[layer, node * per_node : (node + 1) * per_node]}
            assert len(groups) == 2  # each node holds exactly groups/nodes whole groups


def test_replicate_experts_minimises_heaviest_replica() -> None:
    w = np.array([[10.0, 1.0, 1.0, 1.0]])
    _, _, cnt = replicate_experts(w, 7)
    assert cnt.tolist() == [[4, 1, 1, 1]]


def test_balanced_packing_equal_counts_and_greedy_balance() -> None:
    w = np.array([[5.0, 4.0, 3.0, 3.0, 2.0, 1.0]])
    pack, rank = balanced_packing(w, 2)
    assert sorted(np.bincount(pack[0]).tolist()) == [3, 3]
    loads = [w[0][pack[0] == p].sum() for p in range(2)]
    assert abs(loads[0] - loads[1]) <= 1.0
    assert sorted(rank[0][pack[0] == 0].tolist()) == [0, 1, 2]
