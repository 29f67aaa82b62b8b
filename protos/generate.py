"""Regenerate the Python code for ``protos/**/*.proto`` with grpc_tools and mypy-protobuf.

``python -m protos.generate`` rewrites ``*_pb2.py``, ``*_pb2_grpc.py`` and their ``.pyi`` stubs next
to each proto; ``--check`` generates into a temporary directory and exits 1, naming the stale files,
when the committed code differs (so a proto edit without regeneration fails the tests).

Protos are compiled with the repository root as include path, so generated imports read
``from protos.wattplane.v1 import agent_pb2`` and never collide with the ``wattplane`` CLI package,
while the proto package (and the gRPC method names on the wire) stays ``wattplane.v1``.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = Path(__file__).resolve().parent
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


class GenerateError(RuntimeError):
    """protoc or a plugin failed, or a tool is missing."""


def proto_files() -> list[Path]:
    return sorted(PROTO_DIR.rglob("*.proto"))


def _plugin(name: str) -> str:
    """Path of a protoc plugin: next to this interpreter first (a venv), then on PATH."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise GenerateError(f"{name} not found: install the dev extras (mypy-protobuf) into this environment")
    return found


def generate(out_dir: Path) -> list[Path]:
    """Compile every proto into ``out_dir`` (mirroring ``protos/...``); return the files written."""
    try:
        from grpc_tools import protoc
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise GenerateError("grpcio-tools is not installed: install the dev extras") from exc
    include = Path(protoc.__file__).resolve().parent / "_proto"
    protos = [str(p.relative_to(ROOT)) for p in proto_files()]
    args = [
        "grpc_tools.protoc",
        f"-I{ROOT}",
        f"-I{include}",
        f"--plugin=protoc-gen-mypy={_plugin('protoc-gen-mypy')}",
        f"--plugin=protoc-gen-mypy_grpc={_plugin('protoc-gen-mypy_grpc')}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--mypy_out={out_dir}",
        f"--mypy_grpc_out={out_dir}",
        *protos,
    ]
    code = protoc.main(args)
    if code != 0:
        raise GenerateError(f"protoc exited with {code} for {protos}")
    return [out_dir / (proto.removesuffix(".proto") + suffix) for proto in protos for suffix in GENERATED_SUFFIXES]


def stale_files() -> list[str]:
    """Generated files whose committed copy is missing or differs from a fresh generation."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        stale = []
        for path in fresh:
            rel = path.relative_to(tmp)
            committed = ROOT / rel
            if not committed.exists() or not filecmp.cmp(path, committed, shallow=False):
                stale.append(str(rel))
        return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m protos.generate", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the committed generated code is stale")
    args = parser.parse_args(argv)
    try:
        if args.check:
            stale = stale_files()
            if stale:
                sys.stderr.write(
                    "stale generated protocol code (run python -m protos.generate): " + ", ".join(stale) + "\n"
                )
                return 1
            return 0
        written = generate(ROOT)
    except GenerateError as exc:
        sys.stderr.write(f"protos.generate: {exc}\n")
        return 2
    for path in written:
        sys.stdout.write(f"wrote {path.relative_to(ROOT)}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
