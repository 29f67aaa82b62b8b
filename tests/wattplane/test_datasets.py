"""Loaders read the real public traces (from ../shared/data or $WATTPLANE_DATA) into domain data."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from wattplane.datasets import (
    MissingDataError,
    alibaba_snapshot,
    data_file,
    load_alibaba_pods,
    load_azure_trace,
)


def test_alibaba_node_list_becomes_pools_and_nodes(data_dir: Path) -> None:
    snap = alibaba_snapshot(
        data_dir / "alibaba-gpu-2023/openb_node_list_all_node.csv",
        data_dir / "alibaba-gpu-2023/openb_pod_list_default.csv",
    )
    # Published figures of the trace (../shared/data/README.md): 1,523 nodes, 6,212 GPUs, 8,152 pods.
    assert len(snap.nodes) == 1523
    assert sum(n.gpus for n in snap.nodes) == 6212
    assert len(snap.pods) == 8152
    assert {p.name for p in snap.pools} == {"g2", "g3", "t4", "p100", "v100m32", "v100m16", "a10"}
    g2 = [n for n in snap.nodes if n.pool == "g2"]
    assert len(g2) == 549 and all(n.gpus == 8 for n in g2)
    assert all(n.pool is None for n in snap.nodes if n.gpus == 0)
    assert all(p.node is None for p in snap.pods)


def test_alibaba_pods_keep_fractional_shares(data_dir: Path) -> None:
    pods = load_alibaba_pods(data_dir / "alibaba-gpu-2023/openb_pod_list_default.csv")
    fractional = [p for p in pods if p.pod.num_gpu == 1 and 0 < p.pod.gpu_milli < 1000]
    assert len(fractional) == 3078  # the README's count of fractional-GPU pods
    assert all(p.creation_time >= 0 for p in pods)


def test_azure_trace_is_sorted_relative_seconds(data_dir: Path) -> None:
    reqs = load_azure_trace(data_dir / "azure-llm-2023/AzureLLMInferenceTrace_conv.csv")
    assert len(reqs) == 19366
    assert reqs[0].t == 0.0
    assert all(a.t <= b.t for a, b in itertools.pairwise(reqs))
    assert 3000 < reqs[-1].t < 4000  # about one hour
    assert reqs[0].input_tokens == 374 and reqs[0].output_tokens == 44


def test_missing_file_names_the_original_source(tmp_path: Path) -> None:
    with pytest.raises(MissingDataError, match="AzurePublicDataset"):
        data_file("azure-llm-2023/AzureLLMInferenceTrace_conv.csv", tmp_path)


def test_bad_columns_are_reported(tmp_path: Path) -> None:
    bad = tmp_path / "trace.csv"
    bad.write_text("when,prompt\n1,2\n")
    with pytest.raises(ValueError, match="missing columns"):
        load_azure_trace(bad)
