"""The per-request difficulty scorer: how much does this request need the large model?

A linear model over hashed word n-grams, hashed character n-grams (they catch formulas, numbers
and word stems that whole words miss), a few length buckets and (when the caller knows it) the
request's subject, then a final layer that adds how alike the prompt's answer options are
(``policies/prompt_choices.py``). It predicts ``E[correct_large - correct_small]`` for a prompt, trained by
``wattplane/train_router.py`` on RouteLLM's MMLU correctness labels; a higher score means the large
model is more likely to be right where the small one is wrong. Scoring is a few dozen CRC32
hashes and a dictionary sum, so one CPU core scores thousands of requests per second, with no
model download (the weights are a small JSON file with their provenance inside).

Pure: the weights arrive as a :class:`RouterWeights` value; reading the file is the caller's job
(``load_weights_text`` names where the packaged file lives).
"""

from __future__ import annotations

import base64
import math
import re
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
from pydantic import Field

from policies.prompt_choices import SIMILARITY_FEATURES, choice_overlap, choice_similarity, split_choices
from policies.snapshot import Frozen, PosInt
from policies.text_encoder import SentenceEncoder

WEIGHTS_PACKAGE = "policies"
WEIGHTS_RESOURCE = "data/router_weights.json"
EMBEDDING_WEIGHTS_RESOURCE = "data/router_weights_embedding.json"  # n-gram + embedding head (heavier)

_TOKEN = re.compile(r"[a-z0-9]+")
LENGTH_BUCKETS = (16, 32, 64, 128, 256, 512, 1024)  # token-count edges for the length feature
MAX_CHARS = 2048  # character n-grams look at the first this many characters (bounds scoring time)


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


BlendTermName = Literal[
    "ngram", "choice_overlap_max", "choice_overlap_mean", "choice_overlap_min",
    "embedding_ridge", "embedding_knn", "choice_similarity_max", "choice_similarity_mean", "choice_similarity_min",
]


class BlendTerm(Frozen):
    """One input of a scorer's final linear layer (the light layer's or the embedding head's):
    ``weight * (x - mean) / std``.

    ``mean``/``std`` are the input's out-of-fold mean and spread on the training half, so the
    weights are comparable; an input a prompt does not have (no answer options) counts as its mean.
    """

    name: BlendTermName
    mean: float
    std: float = Field(gt=0)
    weight: float


class EmbeddingHead(Frozen):
    """The optional heavier half of the scorer: readings of sentence embeddings, stacked with the n-gram score.

    ``ridge``: a linear model on the prompt's embedding; ``knn``: the mean target of the ``k`` most
    similar training prompts (cosine in a PCA of the embeddings, stored at float16); the
    similarities between the prompt's answer options (``policies/prompt_choices.py``). The score is
    ``bias + sum(term.weight * z(term))`` over ``terms``: a least-squares fit of the target on the
    terms' out-of-fold values inside the training half (stacking), not a hand-set mix.
    Vectors are base64 little-endian float16.
    """

    version: Literal[2] = 2
    encoder: str  # which encoder produced the embeddings (model id @ revision # weights digest)
    dim: PosInt
    ridge_f16: str
    ridge_bias: float = 0.0
    knn_mean_f16: str  # centring vector (dim)
    knn_projection_f16: str  # dim x proj, row-major
    knn_bank_f16: str  # n x proj unit rows: the training prompts
    knn_targets: tuple[int, ...]  # their targets (correct_large - correct_small)
    k: PosInt
    terms: tuple[BlendTerm, ...]
    bias: float = 0.0


class RouterWeights(Frozen):
    """The trained scorer: hashed-feature weights plus provenance (data files, seed, split, metrics)."""

    version: PosInt = 1
    buckets: PosInt  # hashed feature space size (a power of two)
    ngram: PosInt = 2  # word n-grams 1..ngram
    char_ngrams: tuple[PosInt, ...] = ()  # character n-gram lengths (a second, separately normalised block)
    bias: float = 0.0
    weights: Mapping[int, float] = Field(default_factory=dict)  # bucket -> weight (zeros omitted)
    # the same weights, compact: base64 of one little-endian float16 per bucket (~6x smaller file than
    # the mapping; float16 keeps 3 significant digits, below the weights' own estimation noise).
    # When set it takes precedence over ``weights``.
    dense_f16: str = ""
    subject_weights: Mapping[str, float] = Field(default_factory=dict)
    length_weights: Mapping[int, float] = Field(default_factory=dict)  # length bucket -> weight
    # the light score's final layer: the n-gram score stacked with the answer options' character overlap
    # (``choice_overlap_*``), fitted like the embedding head's; empty: the score is the n-gram score
    terms: tuple[BlendTerm, ...] = ()
    terms_bias: float = 0.0
    calibration: tuple[CalibrationBin, ...] = ()
    embedding: EmbeddingHead | None = None  # set: scores need the prompt's sentence embedding too
    provenance: dict[str, Any] = Field(default_factory=dict)


def hashed_vector(weights: RouterWeights) -> np.ndarray:
    """The hashed-feature weights as one dense float64 vector of length ``buckets``."""
    if weights.dense_f16:
        dense = np.frombuffer(base64.b64decode(weights.dense_f16), dtype="<f2").astype(np.float64)
        if len(dense) != weights.buckets:
            raise ValueError(f"dense_f16 holds {len(dense)} weights for {weights.buckets} buckets")
        return dense
    dense = np.zeros(weights.buckets)
    for k, v in weights.weights.items():
        dense[int(k)] = v
    return dense


def decode_f16(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype="<f2").astype(np.float64)


class EmbeddingScorer:
    """The embedding head, decoded once: its inputs from embeddings, and the stacked score."""

    def __init__(self, head: EmbeddingHead) -> None:
        self.head = head
        self.ridge = decode_f16(head.ridge_f16)
        self.mean = decode_f16(head.knn_mean_f16)
        self.projection = decode_f16(head.knn_projection_f16).reshape(head.dim, -1)
        self.bank = decode_f16(head.knn_bank_f16).reshape(-1, self.projection.shape[1])
        self.targets = np.asarray(head.knn_targets, dtype=np.float64)
        if len(self.ridge) != head.dim or len(self.mean) != head.dim or len(self.targets) != len(self.bank):
            raise ValueError("embedding head: vector sizes disagree with dim / bank")

    def parts(self, embeddings: np.ndarray, k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Raw (ridge, kNN) scores; ``k`` overrides the head's neighbour count (the trainer's search)."""
        e = np.atleast_2d(np.asarray(embeddings, dtype=np.float64))
        ridge = e @ self.ridge + self.head.ridge_bias
        p = (e - self.mean) @ self.projection
        p /= np.maximum(np.linalg.norm(p, axis=1, keepdims=True), 1e-12)
        sims = p @ self.bank.T
        k = min(k or self.head.k, len(self.bank))
        nearest = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        return ridge, self.targets[nearest].mean(axis=1)

    def combine(self, ngram: np.ndarray | Sequence[float], embeddings: np.ndarray,
                option_similarity: np.ndarray) -> np.ndarray:
        """The stacked score from the n-gram scores, the prompts' embeddings and their options'
        similarities (``n x 3``: max, mean, min; NaN rows for prompts without options)."""
        ridge, knn = self.parts(embeddings)
        out: np.ndarray = blend(self.head.terms, self.head.bias, term_inputs(ngram, ridge, knn, option_similarity))
        return out


def term_inputs(ngram: np.ndarray | Sequence[float], ridge: np.ndarray, knn: np.ndarray,
                option_similarity: np.ndarray) -> dict[str, np.ndarray]:
    """Every :class:`BlendTerm` input by name (NaN: the prompt does not have it)."""
    sims = np.asarray(option_similarity, dtype=np.float64).reshape(-1, len(SIMILARITY_FEATURES))
    out = {"ngram": np.asarray(ngram, dtype=np.float64), "embedding_ridge": ridge, "embedding_knn": knn}
    for j, name in enumerate(SIMILARITY_FEATURES):
        out[f"choice_similarity_{name}"] = sims[:, j]
    return out


def blend(terms: Sequence[BlendTerm], bias: float, inputs: Mapping[str, Any]) -> Any:
    """``bias + sum(weight * z)`` over ``terms``; a missing (NaN) input contributes nothing.

    Inputs are arrays (one value per prompt: an array comes back) or floats (one prompt: the router's
    per-request path, without building arrays)."""
    out: Any = bias
    for t in terms:
        z = (inputs[t.name] - t.mean) / t.std
        if isinstance(z, float):  # numpy's nan_to_num costs ~8 us on a scalar
            out = out + t.weight * (0.0 if math.isnan(z) else z)
        else:
            out = out + t.weight * np.nan_to_num(z, nan=0.0)
    return out


def overlap_values(text: str) -> dict[str, float]:
    """The options' character overlap of one prompt by term name (NaN: the prompt has no options)."""
    parsed = split_choices(text)
    values = choice_overlap(parsed[1]) if parsed is not None else (math.nan,) * len(SIMILARITY_FEATURES)
    return {f"choice_overlap_{name}": v for name, v in zip(SIMILARITY_FEATURES, values, strict=True)}


def overlap_inputs(ngram: np.ndarray | Sequence[float], texts: Sequence[str]) -> dict[str, np.ndarray]:
    """The light layer's inputs for many prompts: n-gram scores and the options' character overlap."""
    rows = [overlap_values(t) for t in texts]
    out = {"ngram": np.asarray(ngram, dtype=np.float64)}
    for name in SIMILARITY_FEATURES:
        key = f"choice_overlap_{name}"
        out[key] = np.asarray([r[key] for r in rows], dtype=np.float64)
    return out


def option_similarities(texts: Sequence[str], embed: Callable[[Sequence[str]], np.ndarray]) -> np.ndarray:
    """``n x 3`` (max, mean, min) similarity of each prompt's answer options; NaN rows without options.

    The options of all prompts go through ``embed`` (the encoder's, or the trainer's on-disk cache)
    in one batch (they are short).
    """
    options = [split_choices(t) for t in texts]
    flat = [o for parsed in options if parsed is not None for o in parsed[1]]
    return similarities_from(options, embed(flat) if flat else np.zeros((0, 1)))


def similarities_from(options: Sequence[tuple[str, tuple[str, ...]] | None], vectors: np.ndarray) -> np.ndarray:
    """The similarity rows from option embeddings laid out in order (``vectors``: every option of every
    prompt that has options, prompt by prompt)."""
    out = np.full((len(options), len(SIMILARITY_FEATURES)), np.nan)
    at = 0
    for i, parsed in enumerate(options):
        if parsed is None:
            continue
        n = len(parsed[1])
        out[i] = choice_similarity(vectors[at:at + n])
        at += n
    if at != len(vectors):
        raise ValueError(f"{len(vectors)} option embeddings for {at} options")
    return out


def encode_f16(dense: np.ndarray) -> str:
    """The compact form of a dense weight vector (see :attr:`RouterWeights.dense_f16`)."""
    return base64.b64encode(np.asarray(dense, dtype="<f2").tobytes()).decode()


def tokens(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


def length_bucket(n_tokens: int) -> int:
    """Index of the first edge of :data:`LENGTH_BUCKETS` at or above ``n_tokens`` (len() if none)."""
    for i, edge in enumerate(LENGTH_BUCKETS):
        if n_tokens <= edge:
            return i
    return len(LENGTH_BUCKETS)


def hashed_features(text: str, buckets: int, ngram: int = 2, char_ngrams: tuple[int, ...] = ()) -> dict[int, float]:
    """Signed hashed n-gram counts; the word block and the character block are each L2-normalised,
    so long prompts do not dominate by length alone."""
    toks = tokens(text)
    feats = _word_features(toks, buckets - 1, ngram)
    if char_ngrams:
        idx, vals = _char_features(toks, buckets - 1, char_ngrams)
        for k, v in zip(idx.tolist(), vals.tolist(), strict=True):
            feats[k] = feats.get(k, 0.0) + v
    return feats


def _word_features(toks: list[str], mask: int, ngram: int) -> dict[int, float]:
    words: dict[int, float] = {}
    for n in range(1, ngram + 1):
        for i in range(len(toks) - n + 1):
            h = zlib.crc32(" ".join(toks[i : i + n]).encode())
            idx = h & mask
            words[idx] = words.get(idx, 0.0) + (1.0 if h & 0x80000000 else -1.0)
    norm = math.sqrt(sum(v * v for v in words.values()))
    return {k: v / norm for k, v in words.items()} if norm > 0 else words


_M64 = np.uint64(0xFF51AFD7ED558CCD)  # MurmurHash3's 64-bit finaliser constants
_C64 = np.uint64(0xC4CEB9FE1A85EC53)
_PRIME = np.uint64(1099511628211)  # FNV-1a 64-bit prime, as the polynomial base


def _char_features(toks: list[str], mask: int, char_ngrams: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(bucket ids, L2-normalised signed counts) of character n-grams, vectorised.

    The hash of an n-gram is a base-``_PRIME`` polynomial over its bytes (uint64, wrapping), salted
    with ``n`` and mixed by MurmurHash3's finaliser; bucket = low bits, sign = top bit. Pure uint64
    arithmetic, so the same on every platform.
    """
    data = np.frombuffer(" ".join(toks)[:MAX_CHARS].encode(), dtype=np.uint8).astype(np.uint64)
    parts = []
    with np.errstate(over="ignore"):
        for n in char_ngrams:
            m = len(data) - n + 1
            if m <= 0:
                continue
            h = np.full(m, np.uint64(n) * _C64, dtype=np.uint64)
            for j in range(n):
                h = h * _PRIME + data[j : j + m]
            h ^= h >> np.uint64(33)
            h *= _M64
            h ^= h >> np.uint64(33)
            h *= _C64
            h ^= h >> np.uint64(33)
            parts.append(h)
    if not parts:
        return np.zeros(0, dtype=np.int64), np.zeros(0)
    h = np.concatenate(parts)
    idx = (h & np.uint64(mask)).astype(np.int64)
    sign = np.where(h >> np.uint64(63), 1.0, -1.0)
    uniq, inv = np.unique(idx, return_inverse=True)
    sums = np.bincount(inv, weights=sign, minlength=len(uniq))
    norm = float(np.sqrt(np.dot(sums, sums)))
    return uniq, (sums / norm if norm > 0 else sums)


class Scorer:
    """Fast scoring with the hashed weights as one dense vector (built once per weights value).

    Weights with an embedding head need the sentence ``encoder`` (the heavier option: the encoder
    costs tens of milliseconds of CPU per prompt, the n-gram part microseconds).
    """

    def __init__(self, weights: RouterWeights, encoder: SentenceEncoder | None = None) -> None:
        self.weights = weights
        self.dense = hashed_vector(weights)
        self.encoder = encoder
        self.embedding = EmbeddingScorer(weights.embedding) if weights.embedding is not None else None
        if self.embedding is not None and encoder is None:
            raise ValueError(f"these router weights have an embedding head: they need the encoder "
                             f"{weights.embedding.encoder if weights.embedding else ''}")

    def score(self, text: str, subject: str | None = None) -> float:
        if self.embedding is None:  # the router's per-request path: no batch lists
            return self.light_score(text, subject)
        return self.score_batch([text], [subject])[0]

    def score_batch(self, texts: Sequence[str], subjects: Sequence[str | None] | None = None) -> list[float]:
        """Scores of many prompts (the encoder, when used, runs once over the batch)."""
        subs: Sequence[str | None] = subjects if subjects is not None else [None] * len(texts)
        if self.embedding is None or self.encoder is None or not texts:
            return [self.light_score(t, s) for t, s in zip(texts, subs, strict=True)]
        ngram = [self.ngram_score(t, s) for t, s in zip(texts, subs, strict=True)]
        return [float(x) for x in self.embedding.combine(ngram, self.encoder.embed(texts),
                                                         option_similarities(texts, self.encoder.embed))]

    def light_score(self, text: str, subject: str | None = None) -> float:
        """The score without an encoder: the n-gram score, stacked with the options' overlap when trained so."""
        ngram = self.ngram_score(text, subject)
        w = self.weights
        if not w.terms:
            return ngram
        return float(blend(w.terms, w.terms_bias, {"ngram": ngram, **overlap_values(text)}))

    def ngram_score(self, text: str, subject: str | None = None) -> float:
        """The hashed n-gram model alone: n-grams, length and subject."""
        w = self.weights
        toks = tokens(text)
        s = w.bias + sum(v * self.dense[k] for k, v in _word_features(toks, w.buckets - 1, w.ngram).items())
        if w.char_ngrams:
            idx, vals = _char_features(toks, w.buckets - 1, w.char_ngrams)
            s += float(np.dot(self.dense[idx], vals))
        s += w.length_weights.get(length_bucket(len(toks)), 0.0)
        if subject is not None:
            s += w.subject_weights.get(subject, 0.0)
        return float(s)


def score(weights: RouterWeights, text: str, subject: str | None = None) -> float:
    """Predicted quality gain of the large model over the small one for this prompt (higher = harder).

    For many requests build a :class:`Scorer` once instead (dense weights, same result).
    """
    feats = hashed_features(text, weights.buckets, weights.ngram, weights.char_ngrams)
    if weights.dense_f16:
        dense = hashed_vector(weights)
        s = weights.bias + sum(v * float(dense[k]) for k, v in feats.items())
    else:
        w = weights.weights
        s = weights.bias + sum(v * w.get(k, 0.0) for k, v in feats.items())
    s += weights.length_weights.get(length_bucket(len(tokens(text))), 0.0)
    if subject is not None:
        s += weights.subject_weights.get(subject, 0.0)
    if weights.terms:
        return float(blend(weights.terms, weights.terms_bias, {"ngram": s, **overlap_values(text)}))
    return s


def score_many(
    weights: RouterWeights, texts: Sequence[str], subjects: Sequence[str | None] | None = None
) -> list[float]:
    """Light scores of many prompts (an embedding head, if any, is not applied: see :class:`Scorer`)."""
    scorer = Scorer(weights.model_copy(update={"embedding": None}))
    subs: Iterable[str | None] = subjects if subjects is not None else [None] * len(texts)
    return [scorer.light_score(t, s) for t, s in zip(texts, subs, strict=True)]


def ngram_many(
    weights: RouterWeights, texts: Sequence[str], subjects: Sequence[str | None] | None = None
) -> list[float]:
    """The n-gram model's scores alone (the embedding head stacks these, not the light layer's)."""
    scorer = Scorer(weights.model_copy(update={"embedding": None}))
    subs: Iterable[str | None] = subjects if subjects is not None else [None] * len(texts)
    return [scorer.ngram_score(t, s) for t, s in zip(texts, subs, strict=True)]


def weights_from_json(text: str | bytes) -> RouterWeights:
    """Parse a weights file (JSON keys are strings; bucket ids are ints)."""
    return RouterWeights.model_validate_json(text)


__all__ = [
    "EMBEDDING_WEIGHTS_RESOURCE",
    "LENGTH_BUCKETS",
    "WEIGHTS_PACKAGE",
    "WEIGHTS_RESOURCE",
    "BlendTerm",
    "BlendTermName",
    "CalibrationBin",
    "EmbeddingHead",
    "EmbeddingScorer",
    "RouterWeights",
    "Scorer",
    "blend",
    "decode_f16",
    "encode_f16",
    "hashed_features",
    "hashed_vector",
    "length_bucket",
    "ngram_many",
    "option_similarities",
    "overlap_inputs",
    "overlap_values",
    "score",
    "score_many",
    "similarities_from",
    "term_inputs",
    "tokens",
    "weights_from_json",
]
