"""The per-request difficulty scorer: how much does this request need the large model?

A linear model over hashed word n-grams, a few length buckets and (when the caller knows it) the
request's subject. It predicts ``E[correct_large - correct_small]`` for a prompt, trained by
``wattplane/train_router.py`` on RouteLLM's MMLU correctness labels; a higher score means the large
model is more likely to be right where the small one is wrong. Scoring is a few dozen CRC32
hashes and a dictionary sum, so one CPU core scores thousands of requests per second, with no
model download (the weights are a small JSON file with their provenance inside).

Pure: the weights arrive as a :class:`RouterWeights` value; reading the file is the caller's job
(``load_weights_text`` names where the packaged file lives).
"""

from __future__ import annotations

import math
import re
import zlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from pydantic import Field

from policies.snapshot import Frozen, PosInt

WEIGHTS_PACKAGE = "policies"
WEIGHTS_RESOURCE = "data/router_weights.json"

_TOKEN = re.compile(r"[a-z0-9]+")
LENGTH_BUCKETS = (16, 32, 64, 128, 256, 512, 1024)  # token-count edges for the length feature


class CalibrationBin(Frozen):
    """One score band of the training split: what each model scored on questions in it.

    ``upper`` is the band's upper score edge (inclusive); the bands tile the score line in order.
    ``share`` is the fraction of training questions in the band; ``quality_large`` and
    ``quality_small`` are the two models' accuracies there. The routing LP uses these as its
    request classes.
    """

    lower: float
    upper: float
    share: float = Field(ge=0, le=1)
    quality_large: float = Field(ge=0, le=1)
    quality_small: float = Field(ge=0, le=1)


class RouterWeights(Frozen):
    """The trained scorer: hashed-feature weights plus provenance (data files, seed, split, metrics)."""

    version: PosInt = 1
    buckets: PosInt  # hashed feature space size (a power of two)
    ngram: PosInt = 2  # word n-grams 1..ngram
    bias: float = 0.0
    weights: Mapping[int, float] = Field(default_factory=dict)  # bucket -> weight (zeros omitted)
    subject_weights: Mapping[str, float] = Field(default_factory=dict)
    length_weights: Mapping[int, float] = Field(default_factory=dict)  # length bucket -> weight
    calibration: tuple[CalibrationBin, ...] = ()
    provenance: dict[str, Any] = Field(default_factory=dict)


def tokens(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


def length_bucket(n_tokens: int) -> int:
    """Index of the first edge of :data:`LENGTH_BUCKETS` at or above ``n_tokens`` (len() if none)."""
    for i, edge in enumerate(LENGTH_BUCKETS):
        if n_tokens <= edge:
            return i
    return len(LENGTH_BUCKETS)


def hashed_features(text: str, buckets: int, ngram: int = 2) -> dict[int, float]:
    """Signed hashed n-gram counts, L2-normalised, so long prompts do not dominate by length alone."""
    toks = tokens(text)
    feats: dict[int, float] = {}
    mask = buckets - 1
    for n in range(1, ngram + 1):
        for i in range(len(toks) - n + 1):
            h = zlib.crc32(" ".join(toks[i : i + n]).encode())
            idx = h & mask
            sign = 1.0 if (h >> 31) & 1 else -1.0
            feats[idx] = feats.get(idx, 0.0) + sign
    norm = math.sqrt(sum(v * v for v in feats.values()))
    if norm > 0:
        for k in feats:
            feats[k] /= norm
    return feats


def score(weights: RouterWeights, text: str, subject: str | None = None) -> float:
    """Predicted quality gain of the large model over the small one for this prompt (higher = harder)."""
    feats = hashed_features(text, weights.buckets, weights.ngram)
    w = weights.weights
    s = weights.bias + sum(v * w.get(k, 0.0) for k, v in feats.items())
    s += weights.length_weights.get(length_bucket(len(tokens(text))), 0.0)
    if subject is not None:
        s += weights.subject_weights.get(subject, 0.0)
    return s


def score_many(
    weights: RouterWeights, texts: Sequence[str], subjects: Sequence[str | None] | None = None
) -> list[float]:
    subs: Iterable[str | None] = subjects if subjects is not None else [None] * len(texts)
    return [score(weights, t, s) for t, s in zip(texts, subs, strict=True)]


def weights_from_json(text: str | bytes) -> RouterWeights:
    """Parse a weights file (JSON keys are strings; bucket ids are ints)."""
    return RouterWeights.model_validate_json(text)


__all__ = [
    "LENGTH_BUCKETS", "WEIGHTS_PACKAGE", "WEIGHTS_RESOURCE", "CalibrationBin", "RouterWeights",
    "hashed_features", "length_bucket", "score", "score_many", "tokens", "weights_from_json",
]
