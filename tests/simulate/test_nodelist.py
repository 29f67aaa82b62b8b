"""A scenario's ``nodes:`` (a real node list) becomes the fleet's pools; bad paths fail clearly."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import pytest
import yaml

from policies.snapshot import BadInputError
from tests.simulate.conftest import SMALL
from wattplane.cli import main
from wattplane.datasets import MissingDataError
from wattplane.simulate.nodelist import with_node_list
from wattplane.simulate.scenario import Scenario, parse_scenario

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "scenarios" / "real-data" / "alibaba-fleet.yaml"
NODE_LIST = "alibaba-gpu-2023/openb_node_list_gpu_node.csv"


def _scenario(tmp_path: Path, nodes: object, deployments: list[dict[str, object]] | None = None,
              **extra: object) -> tuple[Scenario, Path]:
    data = {k: v for k, v in SMALL.items() if k not in ("pools", "power_domains")}
    data["nodes"] = nodes
    data["deployments"] = deployments or [
        {"name": "small", "model": "llama-3.1-8b", "min_replicas": 1, "max_replicas": 4,
         "initial_replicas": {"big": 1}}]
    data.update(extra)
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(data))
    return parse_scenario(path.read_text(), source=str(path)), path


def _write_nodes(path: Path, rows: list[tuple[str, int, str]]) -> None:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["sn", "cpu_milli", "memory_mib", "gpu", "model"])
        for name, gpus, model in rows:
            w.writerow([name, 64000, 262144, gpus, model])


def test_pools_follow_the_files_gpu_models_and_node_sizes(tmp_path: Path) -> None:
    _write_nodes(tmp_path / "nodes.csv", [("n0", 8, "BIG"), ("n1", 8, "BIG"), ("n2", 4, "MIX"), ("n3", 8, "MIX"),
                                          ("n4", 0, ""), ("n5", 4, "MIX")])
    sc, path = _scenario(tmp_path, {"path": "nodes.csv", "cost_per_device_hour": {"BIG": 3.0}})
    fleet = with_node_list(sc, path.parent)
    pools = {p.name: (p.nodes, p.gpus_per_node, p.accelerator.model, p.cost_per_device_hour) for p in fleet.pools}
    # one pool per model, split by node size where a model has several; CPU-only nodes left out
    assert pools == {"big": (2, 8, "BIG", 3.0), "mix-4gpu": (2, 4, "MIX", 1.0), "mix-8gpu": (1, 8, "MIX", 1.0)}
    assert fleet.nodes is None and with_node_list(fleet) is fleet


def test_a_deployment_naming_a_pool_the_file_lacks_fails_with_the_pools_it_has(tmp_path: Path) -> None:
    _write_nodes(tmp_path / "nodes.csv", [("n0", 8, "BIG")])
    sc, path = _scenario(tmp_path, "nodes.csv", [{"name": "small", "model": "llama-3.1-8b",
                                                  "initial_replicas": {"nope": 1}}])
    with pytest.raises(BadInputError, match=r"pools of the node list \(big\).*unknown pool 'nope'"):
        with_node_list(sc, path.parent)


def test_bad_node_list_paths_and_files_give_clear_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sc, path = _scenario(tmp_path, "missing.csv")
    with pytest.raises(MissingDataError, match=r"nodes.path: 'missing.csv' -> .*missing.csv: no such file"):
        with_node_list(sc, path.parent)
    assert main(["simulate", str(path), "--json"]) == 2
    assert "nodes.path" in capsys.readouterr().err
    (tmp_path / "wrong.csv").write_text("a,b\n1,2\n")
    sc, path = _scenario(tmp_path, "wrong.csv")
    with pytest.raises(BadInputError, match=r"not an Alibaba node list.*missing columns"):
        with_node_list(sc, path.parent)
    _write_nodes(tmp_path / "nodes.csv", [("n0", 8, "BIG")])
    sc, path = _scenario(tmp_path, {"path": "nodes.csv", "models": ["H100"]})
    with pytest.raises(BadInputError, match=r"nodes.models: \['H100'\] not in nodes.csv \(it has \['BIG'\]\)"):
        with_node_list(sc, path.parent)
    sc, path = _scenario(tmp_path, "data:alibaba-gpu-2023/no-such.csv")
    with pytest.raises(MissingDataError, match=r"no-such\.csv"):
        with_node_list(sc, path.parent, str(tmp_path))


def test_a_scenario_needs_pools_or_nodes_and_pods_once() -> None:
    data = {k: v for k, v in SMALL.items() if k != "pools"}
    with pytest.raises(BadInputError, match="give pools, nodes"):
        parse_scenario(yaml.safe_dump(data))
    with pytest.raises(BadInputError, match="give the pod list once"):
        parse_scenario(yaml.safe_dump({**SMALL, "pods": "a.csv", "background": {"pods_csv": "b.csv"}}))
    assert parse_scenario(yaml.safe_dump({**SMALL, "pods": "a.csv"})).background.pods_csv == "a.csv"


def test_real_alibaba_node_list_as_a_fleet(data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The example scenario on the real trace files (read in place under --data-dir)."""
    with (data_dir / NODE_LIST).open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    want = Counter(r["model"] for r in rows if r["model"] in ("G2", "G3") and int(r["gpu"]) == 8)
    assert main(["simulate", str(EXAMPLE), "--json", "--duration", "90", "--data-dir", str(data_dir)]) == 0
    doc = json.loads(capsys.readouterr().out)
    entry = doc["policy_sets"]["wattplane"]
    assert entry["invariant_violations"] == []
    assert entry["metrics"]["requests"] > 0 and entry["metrics"]["energy_kwh"] > 0
    from wattplane.simulate.scenario import load_scenario

    fleet = with_node_list(load_scenario(EXAMPLE), EXAMPLE.parent, str(data_dir))
    assert {p.name: p.nodes for p in fleet.pools} == {"g2": min(want["G2"], 60), "g3": min(want["G3"], 60)}
    assert all(p.power_domain == "hall" for p in fleet.pools)
