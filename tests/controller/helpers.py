"""Builders for API objects in controller tests: ``make_md(**overrides)`` style, plain dicts on the wire."""

from __future__ import annotations

import copy
from typing import Any

from controller.api import models as api


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def pool_obj(name: str = "h100", gpus: int = 8, **spec: Any) -> dict[str, Any]:
    base = {
        "apiVersion": api.API_VERSION,
        "kind": "AcceleratorPool",
        "metadata": {"name": name, "uid": f"uid-{name}", "generation": 1},
        "spec": {
            "nodeSelector": {"wattplane.io/pool": name},
            "accelerator": {"model": "H100-80GB", "memoryGiB": 80, "bf16Tflops": 989, "hbmGBps": 3350,
                            "tdpW": 700, "minPowerW": 200, "maxPowerW": 700},
            "gpusPerNode": gpus,
            "costPerDeviceHour": 2.5,
        },
    }
    return merge(base, {"spec": spec})


def md_obj(name: str = "llama", ns: str = "ns1", **spec: Any) -> dict[str, Any]:
    base = {
        "apiVersion": api.API_VERSION,
        "kind": "ModelDeployment",
        "metadata": {"name": name, "namespace": ns, "uid": f"uid-{ns}-{name}", "generation": 1},
        "spec": {
            "model": {"name": "llama-3.1-70b", "paramsB": 70, "activeParamsB": 70},
            "engine": {"modelPath": "meta-llama/Llama-3.1-70B-Instruct"},
            "parallelism": {"tp": 4},
            "minReplicas": 2,
            "maxReplicas": 4,
        },
    }
    return merge(base, {"spec": spec})


def node_obj(name: str, pool: str, gpus: int = 8, ready: bool = True) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": {"wattplane.io/pool": pool, "nvidia.com/gpu.product": "H100-80GB"}},
        "spec": {},
        "status": {
            "allocatable": {"nvidia.com/gpu": str(gpus), "cpu": "96", "memory": "1Ti"},
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        },
    }
