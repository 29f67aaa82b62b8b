"""DeepSeek's EPLB (expert-parallelism load balancer), re-implemented with numpy.

A faithful port of the published algorithm (deepseek-ai/EPLB, ``eplb.py``) so benchmarks compare
against the anchor's own method and the MoE policy can use it as a from-scratch reference:

* ``replicate_experts``: add redundant replicas one at a time to the expert with the heaviest
  per-replica load.
* ``balanced_packing``: place items heaviest-first into the lightest pack that still has room
  (every pack gets exactly n / m items).
* ``rebalance_experts_hierarchical``: pack expert groups to nodes, replicate within nodes, pack
  replicas to GPUs of the node; ``rebalance_experts`` uses it when ``num_groups % num_nodes == 0``
  and otherwise runs it with one group and one node (the global policy).

EPLB ignores the current placement, so a rebalance rewrites nearly every slot: that is the
behaviour the MoE policy is measured against. Loops that the original runs per layer in Python are
vectorised over layers here; ties break the same way (stable descending sort, first minimum).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]


def balanced_packing(weight: FloatArray, num_packs: int) -> tuple[IntArray, IntArray]:
    """Pack ``n`` weighted items of each row into ``num_packs`` packs of exactly ``n / num_packs`` items.

    Returns ``(pack_index, rank_in_pack)``, both ``[X, n]``.
    """
    num_layers, num_items = weight.shape
    if num_items % num_packs:
        raise ValueError(f"{num_items} items do not split evenly into {num_packs} packs")
    per_pack = num_items // num_packs
    if per_pack == 1:
        pack_index = np.broadcast_to(np.arange(num_items, dtype=np.int64), weight.shape).copy()
        return pack_index, np.zeros(weight.shape, dtype=np.int64)
    order = np.argsort(-weight, axis=-1, kind="stable")
    pack_index = np.full(weight.shape, -1, dtype=np.int64)
    rank_in_pack = np.full(weight.shape, -1, dtype=np.int64)
    pack_weights = np.zeros((num_layers, num_packs), dtype=np.float64)
    pack_items = np.zeros((num_layers, num_packs), dtype=np.int64)
    rows = np.arange(num_layers)
    for j in range(num_items):
        item = order[:, j]
        # the lightest pack with room; argmin returns the first minimum, as Python's min() does
        pack = np.argmin(np.where(pack_items < per_pack, pack_weights, np.inf), axis=-1)
        pack_index[rows, item] = pack
        rank_in_pack[rows, item] = pack_items[rows, pack]
        pack_weights[rows, pack] += weight[rows, item]
        pack_items[rows, pack] += 1
    return pack_index, rank_in_pack


def replicate_experts(weight: FloatArray, num_phy: int) -> tuple[IntArray, IntArray, IntArray]:
    """Replicate ``num_log`` experts to ``num_phy`` replicas, minimising the heaviest replica load.

    Returns ``(phy2log [X, num_phy], rank [X, num_phy], logcnt [X, num_log])``.
    """
    num_layers, num_log = weight.shape
    if num_phy < num_log:
        raise ValueError(f"{num_phy} physical slots cannot hold {num_log} experts")
    phy2log = np.broadcast_to(np.arange(num_phy, dtype=np.int64), (num_layers, num_phy)).copy()
    rank = np.zeros((num_layers, num_phy), dtype=np.int64)
    logcnt = np.ones((num_layers, num_log), dtype=np.int64)
    rows = np.arange(num_layers)
    for i in range(num_log, num_phy):
        hottest = np.argmax(weight / logcnt, axis=-1)
        phy2log[:, i] = hottest
        rank[:, i] = logcnt[rows, hottest]
        logcnt[rows, hottest] += 1
    return phy2log, rank, logcnt


def _inverse(perm: IntArray) -> IntArray:
    inv = np.empty_like(perm)
    np.put_along_axis(inv, perm, np.broadcast_to(np.arange(perm.shape[1], dtype=np.int64), perm.shape), axis=1)
    return inv


def rebalance_experts_hierarchical(
    weight: FloatArray, num_physical_experts: int, num_groups: int, num_nodes: int, num_gpus: int
) -> tuple[IntArray, IntArray, IntArray]:
    """Groups -> nodes, replicas within nodes, replicas -> GPUs. Returns ``(phy2log, phyrank, logcnt)``."""
    num_layers, num_logical = weight.shape
    if num_logical % num_groups or num_groups % num_nodes or num_gpus % num_nodes or num_physical_experts % num_gpus:
        raise ValueError(
            f"EPLB shape: experts {num_logical}, groups {num_groups}, nodes {num_nodes}, gpus {num_gpus}, "
            f"slots {num_physical_experts} must divide evenly"
        )
    group_size = num_logical // num_groups
    groups_per_node = num_groups // num_nodes
    phy_per_gpu = num_physical_experts // num_gpus

    # Step 1: pack groups to nodes
    tokens_per_group = weight.reshape(num_layers, num_groups, group_size).sum(-1)
    group_pack, group_rank = balanced_packing(tokens_per_group, num_nodes)
    log2mlog = (
        ((group_pack * groups_per_node + group_rank) * group_size)[:, :, None] + np.arange(group_size, dtype=np.int64)
    ).reshape(num_layers, num_logical)
    mlog2log = _inverse(log2mlog)

    # Step 2: replicate experts within nodes; rows are (layer, node)
    tokens_per_mlog = np.take_along_axis(weight, mlog2log, axis=-1).reshape(-1, num_logical // num_nodes)
    phy2mlog, phyrank, mlogcnt = replicate_experts(tokens_per_mlog, num_physical_experts // num_nodes)

    # Step 3: pack physical experts to the GPUs of their node
    tokens_per_phy = np.take_along_axis(tokens_per_mlog / mlogcnt, phy2mlog, axis=-1)
    pack, rank_in_pack = balanced_packing(tokens_per_phy, num_gpus // num_nodes)
    phy2pphy = pack * phy_per_gpu + rank_in_pack
    pphy2phy = _inverse(phy2pphy)

    pphy2mlog = np.take_along_axis(phy2mlog, pphy2phy, axis=-1)
    node_offset = np.arange(0, num_logical, num_logical // num_nodes, dtype=np.int64).reshape(1, -1, 1)
    pphy2mlog = (pphy2mlog.reshape(num_layers, num_nodes, -1) + node_offset).reshape(num_layers, -1)
    pphy2log = np.take_along_axis(mlog2log, pphy2mlog, axis=-1)
    pphyrank = np.take_along_axis(phyrank, pphy2phy, axis=-1).reshape(num_layers, -1)
    logcnt = np.take_along_axis(mlogcnt.reshape(num_layers, -1), log2mlog, axis=-1)
    return pphy2log, pphyrank, logcnt


def rebalance_experts(
    weight: npt.ArrayLike, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int
) -> tuple[IntArray, IntArray, IntArray]:
    """EPLB's entry point. Returns ``(phy2log [L, R], log2phy [L, E, max_cnt] (-1 padded), logcnt [L, E])``.

    Weights are cast to float32 first, as the original does, so ties and orders match it.
    """
    w = np.asarray(weight, dtype=np.float32).astype(np.float64)
    num_layers, num_logical = w.shape
    if num_groups % num_nodes == 0:
        phy2log, phyrank, logcnt = rebalance_experts_hierarchical(w, num_replicas, num_groups, num_nodes, num_gpus)
    else:
        phy2log, phyrank, logcnt = rebalance_experts_hierarchical(w, num_replicas, 1, 1, num_gpus)
    max_cnt = int(logcnt.max())
    log2phy = np.full((num_layers, num_logical * max_cnt), -1, dtype=np.int64)
    np.put_along_axis(
        log2phy,
        phy2log * max_cnt + phyrank,
        np.broadcast_to(np.arange(num_replicas, dtype=np.int64), (num_layers, num_replicas)),
        axis=-1,
    )
    return phy2log, log2phy.reshape(num_layers, num_logical, max_cnt), logcnt
