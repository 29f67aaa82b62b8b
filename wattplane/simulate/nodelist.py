"""A real node list as the simulated fleet: a scenario's ``nodes:`` resolved into pools.

The Alibaba GPU cluster trace 2023 (``openb_node_list_*.csv``, read in place from the data
directory) lists each node's GPU model and count; pools follow the models so a user can ask "what
would Wattplane do on a fleet shaped like this one". Node names in the simulation are the pool's
(``g3-0000``...): the trace's node names carry no information beyond their order.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from pydantic import ValidationError

from policies.snapshot import BadInputError
from wattplane.datasets import MissingDataError, alibaba_accelerator, data_file, load_alibaba_nodes
from wattplane.simulate.load import resolve_path
from wattplane.simulate.scenario import NodeListSpec, PoolSpec, Scenario


def pools_from_node_list(spec: NodeListSpec, base_dir: Path | None = None, data_dir: str | None = None
                         ) -> tuple[PoolSpec, ...]:
    """One pool per (GPU model, GPUs per node) of the file; errors name the field and the file."""
    path = resolve_path(spec.path, base_dir, data_dir, data_file)  # data: paths raise MissingDataError
    if not path.is_file():
        raise MissingDataError(f"nodes.path: {spec.path!r} -> {path}: no such file (a node list CSV such as "
                               "data:alibaba-gpu-2023/openb_node_list_gpu_node.csv)")
    try:
        nodes = load_alibaba_nodes(path)
    except (ValueError, KeyError) as exc:
        raise BadInputError(f"nodes.path: {path}: not an Alibaba node list (sn,cpu_milli,memory_mib,gpu,model): "
                            f"{exc}") from exc
    gpu_nodes = [n for n in nodes if n.accelerator_model and n.gpus > 0]
    models = Counter(str(n.accelerator_model) for n in gpu_nodes)
    unknown = [m for m in spec.models if m not in models]
    if unknown:
        raise BadInputError(f"nodes.models: {unknown} not in {path.name} (it has {sorted(models)})")
    keep = set(spec.models) or set(models)
    sizes: dict[str, Counter[int]] = {}
    for n in gpu_nodes:
        if n.accelerator_model in keep:
            sizes.setdefault(str(n.accelerator_model), Counter())[n.gpus] += 1
    if not sizes:
        raise BadInputError(f"nodes.path: {path}: no GPU nodes")
    default_cost = spec.cost_per_device_hour.get("default", 1.0)
    pools = []
    for model in sorted(sizes):
        for gpus, count in sorted(sizes[model].items()):
            name = model.lower() if len(sizes[model]) == 1 else f"{model.lower()}-{gpus}gpu"
            size = min(count, spec.max_nodes_per_pool) if spec.max_nodes_per_pool else count
            pools.append(PoolSpec(name=name, accelerator=alibaba_accelerator(model), nodes=size, gpus_per_node=gpus,
                                  cost_per_device_hour=spec.cost_per_device_hour.get(model, default_cost),
                                  power_domain=spec.power_domain))
    return tuple(pools)


def with_node_list(scenario: Scenario, base_dir: Path | None = None, data_dir: str | None = None) -> Scenario:
    """The scenario with its node list read into pools (unchanged when it has none).

    The result is validated again, so a deployment naming a pool the file does not have fails here
    with the pools that do exist.
    """
    if scenario.nodes is None:
        return scenario
    pools = pools_from_node_list(scenario.nodes, base_dir, data_dir)
    clash = {p.name for p in pools} & {p.name for p in scenario.pools}
    if clash:
        raise BadInputError(f"nodes: pools {sorted(clash)} from the node list clash with pools of the same name")
    data = scenario.model_dump()
    data["pools"] = [*data["pools"], *(p.model_dump() for p in pools)]
    data["nodes"] = None
    try:
        return Scenario.model_validate(data)
    except ValidationError as exc:
        names = ", ".join(p.name for p in pools)
        problems = "; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())
        raise BadInputError(f"nodes: with the pools of the node list ({names}): {problems}") from exc


__all__ = ["pools_from_node_list", "with_node_list"]
