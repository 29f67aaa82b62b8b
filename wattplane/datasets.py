"""Where the real public traces live, and loaders that turn them into domain data.

Data is never copied into the repository. A data directory is chosen, in order, from an explicit
``--data-dir``, the ``WATTPLANE_DATA`` environment variable, or ``../shared/data`` next to the
working copy. A missing file raises :class:`MissingDataError` naming where the original comes from.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from policies.snapshot import AcceleratorSpec, Node, Pod, Pool, Snapshot

ENV_VAR = "WATTPLANE_DATA"

# Where a user downloads each data set (shown when a file is missing).
SOURCES: dict[str, str] = {
    "azure-llm-2023": "Azure/AzurePublicDataset, data/AzureLLMInferenceTrace_conv.csv (CC-BY 4.0)",
    "alibaba-gpu-2023": "alibaba/clusterdata, cluster-trace-gpu-v2023/csv/openb_*.csv",
    "power": "Mutinifni/splitwise-sim data/perf_model.csv and ml-energy/leaderboard public/data/models/",
    "routing": "lm-sys/RouteLLM routellm/evals/mmlu/ (per-question correctness + contaminated_prompts.jsonl)",
}


class MissingDataError(FileNotFoundError):
    """A data file that a benchmark or test needs is not there."""


def default_data_dir() -> Path | None:
    """The data directory when none is given: $WATTPLANE_DATA, else ../shared/data if it exists."""
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env)
    here = Path(__file__).resolve().parent.parent
    for base in (Path.cwd(), here):
        candidate = base.parent / "shared" / "data"
        if candidate.is_dir():
            return candidate
    return None


def resolve_data_dir(explicit: str | os.PathLike[str] | None = None) -> Path | None:
    return Path(explicit) if explicit else default_data_dir()


def data_file(relative: str, data_dir: str | os.PathLike[str] | None = None) -> Path:
    """Path of ``relative`` under the data directory, or :class:`MissingDataError` naming its source."""
    base = resolve_data_dir(data_dir)
    folder = relative.split("/", 1)[0]
    source = SOURCES.get(folder, "see ../shared/data/README.md")
    if base is None:
        raise MissingDataError(
            f"no data directory: pass --data-dir or set {ENV_VAR} (needed: {relative}; original: {source})"
        )
    path = base / relative
    if not path.exists():
        raise MissingDataError(f"missing data file {path} (original: {source})")
    return path


# -- Alibaba GPU cluster trace 2023 (FGD paper) ------------------------------------------------

# model -> (memory GiB, dense fp16/bf16 TFLOP/s, HBM GB/s, TDP W, min power limit W), from public spec
# sheets. The trace anonymises G2/G3; they are treated as V100-class (G2) and A100-40GB-class (G3).
ALIBABA_GPU_SPECS: dict[str, tuple[float, float, float, float, float]] = {
    "G2": (32.0, 125.0, 900.0, 300.0, 150.0),
    "G3": (40.0, 312.0, 1555.0, 400.0, 150.0),
    "T4": (16.0, 65.0, 320.0, 70.0, 60.0),
    "P100": (16.0, 19.0, 732.0, 250.0, 125.0),
    "V100M32": (32.0, 125.0, 900.0, 300.0, 150.0),
    "V100M16": (16.0, 125.0, 900.0, 300.0, 150.0),
    "A10": (24.0, 125.0, 600.0, 150.0, 100.0),
}


def alibaba_accelerator(model: str) -> AcceleratorSpec:
    mem, tflops, hbm, tdp, min_w = ALIBABA_GPU_SPECS.get(model, (16.0, 50.0, 500.0, 250.0, 100.0))
    return AcceleratorSpec(model=model, memory_gib=mem, bf16_tflops=tflops, hbm_gbps=hbm, tdp_w=tdp,
                           min_power_w=min_w, max_power_w=tdp)


def alibaba_snapshot(
    nodes_path: str | os.PathLike[str],
    pods_path: str | os.PathLike[str] | None = None,
    cost_per_device_hour: float = 1.0,
) -> Snapshot:
    """A Snapshot of the Alibaba GPU cluster: one pool per GPU model, CPU-only nodes pool-less,
    and (when a pod list is given) every pod pending, for a scheduler replay to place."""
    nodes = load_alibaba_nodes(nodes_path)
    by_model: dict[str, list[Node]] = {}
    for n in nodes:
        if n.accelerator_model:
            by_model.setdefault(n.accelerator_model, []).append(n)
    pools = tuple(
        Pool(
            name=model.lower(),
            accelerator=alibaba_accelerator(model),
            gpus_per_node=max(n.gpus for n in members),
            cost_per_device_hour=cost_per_device_hour,
        )
        for model, members in sorted(by_model.items())
    )
    placed = tuple(
        n.model_copy(update={"pool": n.accelerator_model.lower()}) if n.accelerator_model else n for n in nodes
    )
    pods = pending(load_alibaba_pods(pods_path)) if pods_path is not None else ()
    return Snapshot(pools=pools, nodes=placed, pods=pods)


def load_alibaba_nodes(path: str | os.PathLike[str]) -> tuple[Node, ...]:
    """Nodes from ``openb_node_list_*.csv`` (columns ``sn,cpu_milli,memory_mib,gpu,model``)."""
    nodes = []
    for row in _csv_rows(path, ("sn", "cpu_milli", "memory_mib", "gpu", "model")):
        model = row["model"].strip() or None
        nodes.append(
            Node(
                name=row["sn"],
                accelerator_model=model,
                gpus=int(row["gpu"]),
                cpu_milli=int(row["cpu_milli"]),
                memory_mib=int(row["memory_mib"]),
                labels={"alibaba/gpu-model": model} if model else {},
            )
        )
    return tuple(nodes)


@dataclass(frozen=True)
class TracePod:
    """A pod of the Alibaba trace with its lifetime (seconds from trace start)."""

    pod: Pod
    creation_time: int
    deletion_time: int | None
    qos: str


def load_alibaba_pods(path: str | os.PathLike[str]) -> tuple[TracePod, ...]:
    """Pods from ``openb_pod_list_*.csv``; all start unplaced (the replay decides nodes)."""
    cols = ("name", "cpu_milli", "memory_mib", "num_gpu", "gpu_milli", "gpu_spec", "qos", "creation_time")
    pods = []
    for row in _csv_rows(path, cols):
        num_gpu = int(row["num_gpu"])
        gpu_milli = int(row["gpu_milli"]) if num_gpu else 0
        spec = row["gpu_spec"].strip() or None
        qos = row["qos"].strip()
        deletion = row.get("deletion_time", "").strip()
        pods.append(
            TracePod(
                pod=Pod(
                    name=row["name"],
                    cpu_milli=int(row["cpu_milli"]),
                    memory_mib=int(row["memory_mib"]),
                    num_gpu=num_gpu,
                    gpu_milli=min(gpu_milli, 1000),
                    gpu_model=spec.split("|")[0] if spec else None,
                ),
                creation_time=int(row["creation_time"] or 0),
                deletion_time=int(deletion) if deletion else None,
                qos=qos,
            )
        )
    return tuple(pods)


def pending(pods: tuple[TracePod, ...]) -> tuple[Pod, ...]:
    return tuple(p.pod.model_copy(update={"node": None}) for p in pods)


# -- Azure LLM inference trace 2023 (Splitwise) ------------------------------------------------

@dataclass(frozen=True)
class Request:
    """One request of an arrival trace: seconds from trace start, prompt and output tokens."""

    t: float
    input_tokens: int
    output_tokens: int


def load_azure_trace(path: str | os.PathLike[str]) -> tuple[Request, ...]:
    """Requests from ``AzureLLMInferenceTrace_*.csv`` (``TIMESTAMP,ContextTokens,GeneratedTokens``)."""
    out: list[Request] = []
    t0: datetime | None = None
    for row in _csv_rows(path, ("TIMESTAMP", "ContextTokens", "GeneratedTokens")):
        ts = _parse_ts(row["TIMESTAMP"])
        t0 = t0 or ts
        out.append(Request((ts - t0).total_seconds(), int(row["ContextTokens"]), int(row["GeneratedTokens"])))
    out.sort(key=lambda r: r.t)
    return tuple(out)


def _parse_ts(text: str) -> datetime:
    # The trace has 7 fractional digits; datetime takes at most 6.
    head, _, frac = text.strip().partition(".")
    return datetime.fromisoformat(f"{head}.{(frac + '000000')[:6]}" if frac else head)


def _csv_rows(path: str | os.PathLike[str], required: tuple[str, ...]) -> Iterator[dict[str, str]]:
    p = Path(path)
    if not p.exists():
        raise MissingDataError(f"missing data file {p}")
    with p.open(newline="") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{p}: missing columns {missing} (has {reader.fieldnames})")
        for lineno, row in enumerate(reader, start=2):
            if None in row.values():
                raise ValueError(f"{p}:{lineno}: short row")
            yield row


__all__ = [
    "ENV_VAR", "MissingDataError", "Request", "TracePod", "alibaba_accelerator", "alibaba_snapshot",
    "data_file", "default_data_dir", "load_alibaba_nodes", "load_alibaba_pods", "load_azure_trace", "pending",
    "resolve_data_dir",
]
