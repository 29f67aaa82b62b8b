"""Build profile rows from the public power data in ``../shared/data/power`` (I/O lives here, not in policies/).

``load_mlenergy`` turns ML.ENERGY v3 leaderboard JSONs into :class:`policies.profiles.Profile` rows
with the same rule the built-in table uses (the configuration with the highest output throughput
whose p99 inter-token latency stays under the TPOT SLO); ``load_splitwise`` reads the A100 / H100 /
power-capped H100 token and prompt times. ``python -m wattplane.profile_data`` prints the rows as
Python literals, which is how ``policies.profiles.DEFAULT_PROFILES`` was produced.
"""

from __future__ import annotations

import csv
import json
import os
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from policies.profiles import (
    CALIBRATION_TPOT_P99_MS,
    PREFILL_MFU,
    REFERENCE_GPUS,
    TYPICAL_PROMPT_TOKENS,
    Profile,
    ProfileTable,
    canonical_gpu,
    canonical_model,
)
from wattplane.datasets import MissingDataError, data_file

MLENERGY_DIR = "power/mlenergy-v3"
SPLITWISE_CSV = "power/splitwise_perf_model.csv"


@dataclass(frozen=True)
class MLEnergyRow:
    """The chosen configuration of one (model, GPU, num_gpus) and where it came from."""

    file: str
    model: str
    active_params_b: float
    gpu: str
    num_gpus: int
    max_num_seqs: int
    output_tokens_per_s: float
    power_total_w: float
    median_itl_ms: float
    p99_itl_ms: float


def best_mlenergy_rows(path: str | os.PathLike[str], tpot_p99_ms: float = CALIBRATION_TPOT_P99_MS) -> list[MLEnergyRow]:
    """Per (GPU, num_gpus) in one ML.ENERGY file: the highest-throughput config with p99 ITL <= SLO."""
    p = Path(path)
    doc = json.loads(p.read_text())
    model = canonical_model(str(doc["model_id"]))
    best: dict[tuple[str, int], MLEnergyRow] = {}
    for c in doc["configurations"]:
        if float(c["p99_itl_ms"]) > tpot_p99_ms:
            continue
        gpu = canonical_gpu(str(c["gpu_model"]))
        row = MLEnergyRow(
            file=p.name, model=model, active_params_b=float(doc["activated_params_billions"]), gpu=gpu,
            num_gpus=int(c["num_gpus"]), max_num_seqs=int(c["max_num_seqs"]),
            output_tokens_per_s=float(c["output_throughput_tokens_per_sec"]),
            power_total_w=float(c["avg_power_watts"]), median_itl_ms=float(c["median_itl_ms"]),
            p99_itl_ms=float(c["p99_itl_ms"]),
        )
        key = (gpu, row.num_gpus)
        if key not in best or row.output_tokens_per_s > best[key].output_tokens_per_s:
            best[key] = row
    return [best[k] for k in sorted(best)]


def to_profile(row: MLEnergyRow) -> Profile:
    """A profile from a chosen row; prefill from the documented MFU estimate (ML.ENERGY has no TTFT)."""
    spec = REFERENCE_GPUS[row.gpu]
    inp = row.num_gpus * PREFILL_MFU * spec.bf16_tflops * 1e12 / (2 * row.active_params_b * 1e9)
    return Profile(
        model=row.model, gpu=row.gpu, tp=row.num_gpus,
        output_tokens_per_s=round(row.output_tokens_per_s, 1), input_tokens_per_s=round(inp, 1),
        power_w=round(row.power_total_w / row.num_gpus, 1), idle_power_w=round(spec.idle_fraction * spec.tdp_w, 1),
        ttft_ms=round(1000 * TYPICAL_PROMPT_TOKENS / inp, 1), tpot_ms=round(row.median_itl_ms, 1),
        source=f"ML.ENERGY v3 {row.file} ({row.gpu}, {row.num_gpus} GPUs, max_num_seqs {row.max_num_seqs})",
    )


def load_mlenergy(
    data_dir: str | os.PathLike[str] | None = None, tpot_p99_ms: float = CALIBRATION_TPOT_P99_MS,
    bf16_only: bool = True,
) -> ProfileTable:
    """A table from every ML.ENERGY v3 file (bf16 weights only by default: deployments assume 2 bytes/param)."""
    folder = data_file(MLENERGY_DIR, data_dir)
    profiles: list[Profile] = []
    for f in sorted(folder.glob("*.json")):
        doc = json.loads(f.read_text())
        if bf16_only and doc.get("weight_precision") != "bfloat16":
            continue
        if doc.get("task") not in ("lm-arena-chat", "gpqa"):
            continue
        for row in best_mlenergy_rows(f, tpot_p99_ms):
            if row.gpu in REFERENCE_GPUS:
                profiles.append(to_profile(row))
    if not profiles:
        raise MissingDataError(f"no usable ML.ENERGY v3 configurations under {folder}")
    # chat rows win over gpqa rows for the same key (added later)
    chat_first = sorted(profiles, key=lambda p: "lm-arena-chat" in p.source)
    return ProfileTable().with_overrides(chat_first)


@dataclass(frozen=True)
class SplitwiseTimes:
    """Mean prompt and token times (ms) of one (model, hardware, TP, prompt size, batch size) cell."""

    prompt_ms: float
    token_ms: float


SplitwiseKey = tuple[str, str, int, int, int]


def load_splitwise(data_dir: str | os.PathLike[str] | None = None) -> dict[SplitwiseKey, SplitwiseTimes]:
    """Splitwise's perf model: (model, hardware, TP, prompt_size, batch_size) -> mean times."""
    path = data_file(SPLITWISE_CSV, data_dir)
    cells: dict[SplitwiseKey, list[tuple[float, float]]] = defaultdict(list)
    with path.open(newline="") as fh:
        for r in csv.DictReader(fh):
            key = (r["model"], r["hardware"], int(r["tensor_parallel"]), int(r["prompt_size"]), int(r["batch_size"]))
            cells[key].append((float(r["prompt_time"]), float(r["token_time"])))
    return {
        k: SplitwiseTimes(statistics.fmean(v[0] for v in vs), statistics.fmean(v[1] for v in vs))
        for k, vs in cells.items()
    }


def main() -> int:
    table = load_mlenergy(sys.argv[1] if len(sys.argv) > 1 else None)
    for p in table.profiles:
        print(f"    {p!r},")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
