"""FGD's GPU fragmentation, VMR2L's fragment rate, and the packing state that methods share."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policies.fragmentation import (
    WHOLE,
    Form,
    Packing,
    TaskClass,
    apply_moves,
    fgd_node_fragment,
    numa_fragment,
    task_mix,
)
from policies.snapshot import Node, Pod, Snapshot


def task(num_gpu: int = 1, milli: int = WHOLE, cpu: int = 0, mem: int = 0, model: str | None = None,
         weight: float = 1.0) -> TaskClass:
    return TaskClass(num_gpu, milli, cpu, mem, model, weight)


@pytest.mark.parametrize(
    ("free", "t", "cpu_free", "expected"),
    [
        ((1000, 300), task(milli=500), 8000, 300),  # the 300 left on a device is too small for a half GPU
        ((1000, 600), task(milli=500), 8000, 0),  # both devices can take a half GPU
        ((1000, 300), task(), 8000, 300),  # a whole-GPU task cannot use the partly used device
        ((1000, 300), task(num_gpu=2), 8000, 1300),  # the task does not fit: all free GPU is lost to it
        ((200, 300), task(milli=500), 8000, 500),  # no device fits: everything counts
        ((1000, 1000), task(cpu=16000), 8000, 2000),  # not enough CPU: everything counts
        ((0, 0), task(), 8000, 0),  # nothing free, nothing fragmented
    ],
)
def test_fgd_node_fragment_cases(free: tuple[int, ...], t: TaskClass, cpu_free: int, expected: float) -> None:
    assert fgd_node_fragment("V100", cpu_free, 10**6, free, [t]) == pytest.approx(expected)


def test_fgd_fragment_is_the_expectation_over_the_mix() -> None:
    free = (1000, 250, 700)
    a, b = task(milli=500, weight=0.25), task(num_gpu=1, weight=0.75)
    alone_a = fgd_node_fragment(None, 1000, 1000, free, [task(milli=500)])
    alone_b = fgd_node_fragment(None, 1000, 1000, free, [task()])
    assert fgd_node_fragment(None, 1000, 1000, free, [a, b]) == pytest.approx(0.25 * alone_a + 0.75 * alone_b)


def test_model_mismatch_fragments_everything() -> None:
    assert fgd_node_fragment("T4", 1000, 1000, (1000, 500), [task(model="V100")]) == 1500


@pytest.mark.parametrize(("free_milli", "expected"), [(37000, 5), (32000, 0), (15000, 15), (16999, 0), (0, 0)])
def test_numa_fragment(free_milli: int, expected: int) -> None:
    assert numa_fragment(free_milli, 16) == expected


def test_task_mix_weights_pending_and_ignores_cpu_only() -> None:
    pods = [
        Pod(name="a", node="n", num_gpu=1, gpu_milli=500),
        Pod(name="b", node="n", num_gpu=1, gpu_milli=1000),
        Pod(name="c", node=None, num_gpu=1, gpu_milli=1000),
        Pod(name="cpu", node="n", cpu_milli=4000),
    ]
    mix = task_mix(pods, pending_weight=2.0)
    assert sum(t.weight for t in mix) == pytest.approx(1.0)
    weights = {t.gpu_milli: t.weight for t in mix}
    assert set(weights) == {500, 1000}
    assert weights[1000] == pytest.approx(3 / 4)  # one running + one pending counted twice


def small_cluster(pods: list[Pod], gpus: int = 4) -> Snapshot:
    nodes = tuple(Node(name=f"n{k}", gpus=gpus, cpu_milli=32000, memory_mib=65536, accelerator_model="V100")
                  for k in range(3))
    return Snapshot(nodes=nodes, pods=tuple(pods))


def test_packing_honours_pinned_devices_and_capacity() -> None:
    snap = small_cluster([
        Pod(name="p0", node="n0", num_gpu=1, gpu_milli=500, gpu_indices=(2,), cpu_milli=1000),
        Pod(name="p1", node="n0", num_gpu=2, gpu_milli=1000, cpu_milli=2000),
    ])
    p = Packing.from_snapshot(snap, Form.GPU)
    assert p.gpu_free[0][2] == 500
    assert sorted(p.gpu_free[0]) == [0, 0, 500, 1000]
    assert p.cpu_free[0] == 29000
    assert p.whole_gpus_free() == 1 + 4 + 4


def test_frag_rate_falls_when_halves_share_a_device() -> None:
    pods = [Pod(name=f"h{k}", node=f"n{k}", num_gpu=1, gpu_milli=500) for k in range(2)]
    pods.append(Pod(name="w", node=None, num_gpu=4, gpu_milli=1000))  # pending: wants a whole node
    p = Packing.from_snapshot(small_cluster(pods), Form.GPU)
    before = p.frag_rate()
    assert 0 < before <= 1
    assert apply_moves(p, [("h1", 0)]) == 1
    assert p.frag_rate() < before
    assert p.moved() == [1]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 2)), max_size=12))
def test_moves_conserve_capacity(moves: list[tuple[int, int]]) -> None:
    pods = [Pod(name=f"p{k}", node=f"n{k % 3}", num_gpu=1, gpu_milli=(250, 500, 1000)[k % 3], cpu_milli=1000,
                memory_mib=1024) for k in range(6)]
    p = Packing.from_snapshot(small_cluster(pods), Form.GPU)
    total_gpu, total_cpu = sum(map(sum, p.gpu_free)), sum(p.cpu_free)
    for i, b in moves:
        p.move(i, b)
        assert all(f >= 0 for gs in p.gpu_free for f in gs)
        assert sum(map(sum, p.gpu_free)) == total_gpu
        assert sum(p.cpu_free) == total_cpu
        assert 0.0 <= p.frag_rate() <= 1.0 + 1e-9


def test_numa_form_splits_nodes() -> None:
    snap = Snapshot(
        nodes=(Node(name="pm", cpu_milli=64000, memory_mib=65536, numa_nodes=2),),
        pods=(Pod(name="vm", node="pm", numa=1, cpu_milli=8000, memory_mib=1024),),
    )
    p = Packing.from_snapshot(snap, Form.NUMA)
    assert [b.name for b in p.bins] == ["pm/numa0", "pm/numa1"]
    assert p.cpu_free == [32000, 24000]
    assert p.fragment() == 0 + 8  # 32 free cores are two 16-core VMs; 24 leave 8
    assert p.frag_rate() == pytest.approx(8 / 56)
