"""Fragmentation measures and the packing state that rescheduling methods share.

Two measures, one per paper we compare with:

* **FGD** ("Beware of Fragmentation", ATC'23): a node's GPU fragmentation for a task is the free GPU
  capacity the task cannot use (all of it when the task does not fit the node; for a fractional
  task the GPUs with less free share than it asks; for a whole-GPU task the partly used GPUs).
  The node's fragmentation is the expectation over the task mix. CPU-only tasks are left out of
  the mix: they would add every free GPU, a constant that no migration changes.
* **VMR2L** (EuroSys'25): per NUMA node, the free CPU cores a 16-core VM cannot use
  (``free mod 16``); the fragment rate is their sum over the total free cores.

:class:`Packing` is a small mutable working copy of a snapshot (bins = nodes, or NUMA nodes in the
VMR2L form; items = pods) so that greedy, LNS and the baselines score moves the same way. It lives
only inside one policy call; policies still take and return frozen data.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from policies.snapshot import Node, Pod, Snapshot

WHOLE = 1000  # gpu_milli of a whole device


class Form(StrEnum):
    """Which fragmentation the rescheduler minimises."""

    GPU = "gpu"  # FGD: bins are nodes with per-device GPU shares
    NUMA = "numa"  # VMR2L: bins are NUMA nodes, fragment = free cores mod vm_cores


@dataclass(frozen=True, order=True)
class TaskClass:
    """One kind of task in the expected mix; ``weight`` is its share (weights sum to 1)."""

    num_gpu: int
    gpu_milli: int
    cpu_milli: int
    memory_mib: int
    gpu_model: str | None
    weight: float


def task_mix(pods: Iterable[Pod], *, pending_weight: float = 1.0, limit: int = 24) -> tuple[TaskClass, ...]:
    """The expected task mix: GPU-requesting pods grouped by shape, ``limit`` most common kept.

    Pending pods count ``pending_weight`` times, so the mix leans towards what is waiting.
    """
    counts: Counter[tuple[int, int, int, int, str]] = Counter()
    for p in pods:
        if p.num_gpu == 0 or p.gpu_milli == 0:
            continue
        key = (p.num_gpu, p.gpu_milli, p.cpu_milli, p.memory_mib, p.gpu_model or "")
        counts[key] += 1 if p.node is not None else pending_weight  # type: ignore[assignment]
    top = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:limit]
    total = sum(c for _, c in top)
    if total <= 0:
        return ()
    return tuple(sorted(TaskClass(k[0], k[1], k[2], k[3], k[4] or None, c / total) for k, c in top))


def fgd_node_fragment(
    model: str | None, cpu_free: int, mem_free: int, gpu_free: Sequence[int], mix: Sequence[TaskClass]
) -> float:
    """FGD: expected free GPU milli on one node that a task drawn from ``mix`` cannot use."""
    total = sum(gpu_free)
    if total == 0:
        return 0.0
    full = sum(1 for g in gpu_free if g >= WHOLE)
    frag = 0.0
    for t in mix:
        if (t.gpu_model is not None and t.gpu_model != model) or t.cpu_milli > cpu_free or t.memory_mib > mem_free:
            frag += t.weight * total
        elif t.gpu_milli < WHOLE:
            unusable = sum(g for g in gpu_free if g < t.gpu_milli)
            frag += t.weight * (total if unusable == total else unusable)
        elif full < t.num_gpu:
            frag += t.weight * total
        else:
            frag += t.weight * (total - WHOLE * full)
    return frag


def numa_fragment(cpu_free_milli: int, vm_cores: int = 16) -> int:
    """VMR2L: free cores of one NUMA node that a ``vm_cores`` VM cannot use."""
    return (cpu_free_milli // 1000) % vm_cores


@dataclass(frozen=True)
class Bin:
    """Where items go: a node (GPU form) or one NUMA node of a node (NUMA form)."""

    name: str
    node: str
    numa: int | None
    model: str | None
    cpu_milli: int
    memory_mib: int
    gpus: int
    schedulable: bool


@dataclass(frozen=True)
class Item:
    """A pod or VM as the packing sees it; ``origin`` is its bin in the snapshot (-1: pending)."""

    name: str
    cpu_milli: int
    memory_mib: int
    num_gpu: int
    gpu_milli: int
    gpu_model: str | None
    movable: bool
    pdb: str | None
    deployment: str | None
    origin: int

    @property
    def shape(self) -> tuple[int, int, int, int, str | None]:
        return (self.cpu_milli, self.memory_mib, self.num_gpu, self.gpu_milli, self.gpu_model)


Signature = tuple[str | None, int, int, tuple[int, ...]]  # (model, cpu_free, mem_free, sorted gpu_free)


@dataclass
class Packing:
    """Mutable assignment of items to bins with free capacity per bin and per GPU."""

    form: Form
    bins: list[Bin]
    items: list[Item]
    mix: tuple[TaskClass, ...]
    vm_cores: int = 16
    assign: list[int] = field(default_factory=list)  # assign[i] = bin of item i, -1 when unplaced
    gpu_of: list[tuple[int, ...]] = field(default_factory=list)  # device indices item i uses on its bin
    cpu_free: list[int] = field(default_factory=list)
    mem_free: list[int] = field(default_factory=list)
    gpu_free: list[list[int]] = field(default_factory=list)
    log: list[int] = field(default_factory=list)  # items in the order ``move`` moved them
    _frag_memo: dict[Signature, float] = field(default_factory=dict)

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_snapshot(
        cls, snapshot: Snapshot, form: Form, *, vm_cores: int = 16, pending_weight: float = 1.0
    ) -> Packing:
        bins: list[Bin] = []
        index: dict[tuple[str, int | None], int] = {}
        for n in snapshot.nodes:
            for b in _bins_of(n, form):
                index[(b.node, b.numa)] = len(bins)
                bins.append(b)
        items: list[Item] = []
        placements: list[tuple[int, tuple[int, ...]]] = []
        for p in sorted(snapshot.pods, key=lambda p: p.name):
            numa = (p.numa or 0) if form is Form.NUMA else None
            origin = index.get((p.node, numa), -1) if p.node is not None else -1
            items.append(
                Item(p.name, p.cpu_milli, p.memory_mib, p.num_gpu, p.gpu_milli if p.num_gpu else 0, p.gpu_model,
                     p.movable, p.pdb, p.deployment, origin)
            )
            placements.append((origin, p.gpu_indices))
        mix = task_mix(snapshot.pods, pending_weight=pending_weight) if form is Form.GPU else ()
        packing = cls(form, bins, items, mix, vm_cores)
        packing.cpu_free = [b.cpu_milli for b in bins]
        packing.mem_free = [b.memory_mib for b in bins]
        packing.gpu_free = [[WHOLE] * b.gpus for b in bins]
        packing.assign = [-1] * len(items)
        packing.gpu_of = [()] * len(items)
        # Pinned devices first, so that items without known indices fill around them.
        order = sorted(range(len(items)), key=lambda i: (not placements[i][1], i))
        for i in order:
            at, pinned = placements[i]
            if at < 0:
                continue
            pinned_ok = bool(pinned) and packing._pinned_fits(i, at, pinned)
            gpus = pinned if pinned_ok else packing.fit(i, at, ignore_resources=True)
            packing.place(i, at, gpus if gpus is not None else ())
        return packing

    def _pinned_fits(self, i: int, b: int, gpus: tuple[int, ...]) -> bool:
        it = self.items[i]
        return len(gpus) == it.num_gpu and all(0 <= g < len(self.gpu_free[b]) for g in gpus)

    # -- state changes ------------------------------------------------------------------------
    def place(self, i: int, b: int, gpus: tuple[int, ...]) -> None:
        it = self.items[i]
        self.assign[i] = b
        self.gpu_of[i] = gpus
        self.cpu_free[b] -= it.cpu_milli
        self.mem_free[b] -= it.memory_mib
        for g in gpus:
            self.gpu_free[b][g] -= it.gpu_milli

    def remove(self, i: int) -> None:
        b = self.assign[i]
        if b < 0:
            return
        it = self.items[i]
        self.cpu_free[b] += it.cpu_milli
        self.mem_free[b] += it.memory_mib
        for g in self.gpu_of[i]:
            self.gpu_free[b][g] += it.gpu_milli
        self.assign[i] = -1
        self.gpu_of[i] = ()

    def move(self, i: int, b: int) -> bool:
        """Move item ``i`` to bin ``b`` with the least-fragmenting device choice; False if it does not fit."""
        a = self.assign[i]
        self.remove(i)
        gpus = self.fit(i, b)
        if gpus is None:
            if a >= 0:
                self.place(i, a, self.fit(i, a, ignore_resources=True) or ())
            return False
        self.place(i, b, gpus)
        self.log.append(i)
        return True

    # -- fitting ------------------------------------------------------------------------------
    def fit(self, i: int, b: int, *, ignore_resources: bool = False) -> tuple[int, ...] | None:
        """Devices item ``i`` would use on bin ``b`` (best for fragmentation), or None if it cannot go there."""
        it = self.items[i]
        bn = self.bins[b]
        if not ignore_resources:
            if not bn.schedulable or it.cpu_milli > self.cpu_free[b] or it.memory_mib > self.mem_free[b]:
                return None
            if it.num_gpu and it.gpu_model is not None and it.gpu_model != bn.model:
                return None
        return _choose_gpus(self.gpu_free[b], it.num_gpu, it.gpu_milli)

    # -- measures -----------------------------------------------------------------------------
    def signature(self, b: int) -> Signature:
        return (self.bins[b].model, self.cpu_free[b], self.mem_free[b], tuple(sorted(self.gpu_free[b])))

    def bin_fragment(self, b: int) -> float:
        if self.form is Form.NUMA:
            return float(numa_fragment(self.cpu_free[b], self.vm_cores))
        return self.signature_fragment(self.signature(b))

    def signature_fragment(self, sig: Signature) -> float:
        if self.form is Form.NUMA:
            return float(numa_fragment(sig[1], self.vm_cores))
        got = self._frag_memo.get(sig)
        if got is None:
            got = fgd_node_fragment(sig[0], sig[1], sig[2], sig[3], self.mix)
            self._frag_memo[sig] = got
        return got

    def fragment(self) -> float:
        """Total fragment: GPU milli (GPU form) or cores (NUMA form)."""
        return sum(self.bin_fragment(b) for b in range(len(self.bins)))

    def free_capacity(self) -> float:
        if self.form is Form.NUMA:
            return float(sum(max(c, 0) // 1000 for c in self.cpu_free))
        return float(sum(sum(g) for g in self.gpu_free))

    def frag_rate(self) -> float:
        """Fragment over free capacity, in [0, 1] (0 when nothing is free)."""
        free = self.free_capacity()
        return self.fragment() / free if free > 0 else 0.0

    def whole_gpus_free(self) -> int:
        """Devices with no share taken: what whole-GPU jobs can use."""
        return sum(1 for gs in self.gpu_free for g in gs if g >= WHOLE)

    def moved(self) -> list[int]:
        """Items placed on a node other than their snapshot node (a NUMA change counts in the NUMA form)."""
        return [i for i, it in enumerate(self.items) if it.origin >= 0 and self.assign[i] != it.origin]

    def copy(self) -> Packing:
        return Packing(
            self.form, self.bins, self.items, self.mix, self.vm_cores, list(self.assign), list(self.gpu_of),
            list(self.cpu_free), list(self.mem_free), [list(g) for g in self.gpu_free], list(self.log),
            self._frag_memo,
        )


def _bins_of(n: Node, form: Form) -> list[Bin]:
    ok = n.ready and n.schedulable
    if form is Form.GPU:
        return [Bin(n.name, n.name, None, n.accelerator_model, n.cpu_milli, n.memory_mib, n.gpus, ok)]
    k = n.numa_nodes
    return [
        Bin(f"{n.name}/numa{j}", n.name, j, n.accelerator_model, n.cpu_milli // k, n.memory_mib // k, 0, ok)
        for j in range(k)
    ]


def _choose_gpus(free: list[int], num_gpu: int, milli: int) -> tuple[int, ...] | None:
    """Devices for a request: a fractional share goes to the fullest device it fits (best fit keeps
    whole devices free); whole devices are the lowest-indexed free ones."""
    if num_gpu == 0 or milli == 0:
        return ()
    if milli < WHOLE:
        best = -1
        for g, f in enumerate(free):
            if f >= milli and (best < 0 or f < free[best]):
                best = g
        return (best,) if best >= 0 else None
    whole = [g for g, f in enumerate(free) if f >= WHOLE]
    return tuple(whole[:num_gpu]) if len(whole) >= num_gpu else None


def apply_moves(packing: Packing, moves: Iterable[tuple[str, int]]) -> int:
    """Run (item name, bin) migrations in order with eviction semantics; return how many landed.

    A migration whose target has no room yet evicts the pod anyway (it waits, pending, as an evicted
    pod would) and it lands as soon as a later migration makes room; pods still waiting at the end go
    back to where they were (the migration did not happen).
    """
    by_name = {it.name: i for i, it in enumerate(packing.items)}
    waiting: list[tuple[int, int, int]] = []  # (item, target, origin)
    landed = 0
    for name, b in moves:
        i = by_name.get(name)
        if i is None or packing.assign[i] < 0:
            continue
        origin = packing.assign[i]
        if packing.move(i, b):
            landed += 1
            landed += _land_waiting(packing, waiting)
        else:
            packing.remove(i)
            waiting.append((i, b, origin))
            landed += _land_waiting(packing, waiting)
    for i, _, origin in waiting:
        packing.place(i, origin, packing.fit(i, origin, ignore_resources=True) or ())
    return landed


def _land_waiting(packing: Packing, waiting: list[tuple[int, int, int]]) -> int:
    landed = 0
    progress = True
    while progress:
        progress = False
        for entry in list(waiting):
            i, b, _ = entry
            gpus = packing.fit(i, b)
            if gpus is not None:
                packing.place(i, b, gpus)
                packing.log.append(i)
                waiting.remove(entry)
                landed += 1
                progress = True
    return landed
