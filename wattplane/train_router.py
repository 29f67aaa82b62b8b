"""Train the difficulty scorer (``policies/difficulty.py``) on RouteLLM's MMLU labels.

``python -m wattplane.train_router [--data-dir DIR] [--seed 0] [--out policies/data/router_weights.json]``

Data: ``routing/routellm-mmlu/mmlu_<subject>.csv`` (columns ``prompt``, one boolean column per
model: Mixtral-8x7B-Instruct is the small model, gpt-4-1106-preview the large one). Prompts listed
in ``contaminated_prompts.jsonl`` (``eval_prompt``) are dropped, as RouteLLM's own evaluation does.
Questions (unique prompt texts) are split 50/50 with a fixed seed; the held-out half is never
seen by training, the regularisation strength is picked on a further split of the training half
only. Target: ``correct_large - correct_small`` in {-1, 0, 1}; model: ridge regression over the
scorer's features (word 1-2-grams, character 3-5-grams, length, subject), solved by conjugate
gradients on the sparse design (numpy only); then a final layer stacks that score with the answer
options' character overlap (``policies/prompt_choices.py``), fitted by least squares on 5-fold
out-of-fold n-gram scores of the training half. The hashed weights are stored as base64 float16
(``RouterWeights.dense_f16``: 186 KB instead of a 1.1 MB JSON mapping, same held-out metrics). The weights
file records the data files (with SHA-256), seed, split sizes, the chosen penalty and the
held-out metrics, so the blob can be audited and rebuilt.

Metrics follow RouteLLM's ``evals/evaluate.py`` exactly (fractions here instead of percent):
thresholds are the 11 edges of ``qcut(scores, 10)``; at edge i (< last) a request goes to the
large model when ``score >= edge`` (at the last edge when ``score > edge``); each threshold gives
(share of large calls, accuracy). APGR = (trapz(acc, share) - weak * span) / ((strong - weak) * span)
over that curve; CPT(x) = ``np.interp(weak + x * (strong - weak), acc, share)``.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from policies.difficulty import (
    LENGTH_BUCKETS,
    BlendTerm,
    BlendTermName,
    CalibrationBin,
    EmbeddingHead,
    EmbeddingScorer,
    RouterWeights,
    blend,
    encode_f16,
    hashed_features,
    length_bucket,
    ngram_many,
    option_similarities,
    overlap_inputs,
    score_many,
    term_inputs,
    tokens,
)
from policies.text_encoder import SentenceEncoder
from wattplane.datasets import MissingDataError, data_file

SMALL_MODEL = "mistralai/Mixtral-8x7B-Instruct-v0.1"
LARGE_MODEL = "gpt-4-1106-preview"
LABELS_DIR = "routing/routellm-mmlu"
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "policies" / "data" / "router_weights.json"
BUCKETS = 1 << 16
CHAR_NGRAMS = (3, 4, 5)
CALIBRATION_BINS = 10


@dataclass(frozen=True)
class Question:
    prompt: str
    subject: str
    small: float  # 1.0 when the small model answered correctly
    large: float


def labels_dir(data_dir: str | None, labels: str | None = None) -> Path:
    if labels:
        p = Path(labels)
        if not p.is_dir():
            raise MissingDataError(f"missing labels directory {p}")
        return p
    return data_file(LABELS_DIR, data_dir)


def load_questions(folder: Path) -> tuple[list[Question], list[Path], int]:
    """All questions with both labels, minus contaminated prompts; returns (questions, files, dropped)."""
    files = sorted(folder.glob("mmlu_*.csv"))
    if not files:
        raise MissingDataError(f"no mmlu_*.csv under {folder} (original: lm-sys/RouteLLM routellm/evals/mmlu/)")
    contaminated: set[str] = set()
    cpath = folder / "contaminated_prompts.jsonl"
    if cpath.exists():
        for line in cpath.read_text().splitlines():
            if line.strip():
                contaminated.add(json.loads(line)["eval_prompt"])
    out: list[Question] = []
    dropped = 0
    csv.field_size_limit(sys.maxsize)
    for f in files:
        subject = f.stem.removeprefix("mmlu_")
        with f.open(newline="") as fh:
            for row in csv.DictReader(fh):
                if row["prompt"] in contaminated:
                    dropped += 1
                    continue
                out.append(Question(row["prompt"], subject, _bool(row[SMALL_MODEL]), _bool(row[LARGE_MODEL])))
    return out, files + ([cpath] if cpath.exists() else []), dropped


def _bool(text: str) -> float:
    return 1.0 if text.strip().lower() == "true" else 0.0


def split_by_question(
    questions: Sequence[Question], seed: int, test_fraction: float = 0.5
) -> tuple[list[int], list[int]]:
    """Indices (train, test): every copy of a prompt text lands on the same side."""
    unique = sorted({q.prompt for q in questions})
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(unique))
    n_test = round(test_fraction * len(unique))
    test_prompts = {unique[i] for i in order[:n_test]}
    train = [i for i, q in enumerate(questions) if q.prompt not in test_prompts]
    test = [i for i, q in enumerate(questions) if q.prompt in test_prompts]
    return train, test


# -- RouteLLM's metrics ------------------------------------------------------------------------

def routing_curve(scores: Sequence[float] | np.ndarray, small: Sequence[float], large: Sequence[float], bins: int = 10
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(share of large-model calls, accuracy) at RouteLLM's qcut thresholds, sorted by share."""
    s = np.asarray(scores, dtype=float)
    w = np.asarray(small, dtype=float)
    g = np.asarray(large, dtype=float)
    edges = np.quantile(s, np.linspace(0, 1, bins + 1))
    shares, accs = [], []
    for i, t in enumerate(edges):
        sel = s >= t if i != len(edges) - 1 else s > t
        shares.append(sel.mean())
        accs.append(np.where(sel, g, w).mean())
    order = np.argsort(shares, kind="stable")
    return np.asarray(shares)[order], np.asarray(accs)[order]


def apgr_cpt(scores: Sequence[float] | np.ndarray, small: Sequence[float], large: Sequence[float]) -> dict[str, float]:
    shares, accs = routing_curve(scores, small, large)
    weak = float(np.mean(small))
    strong = float(np.mean(large))
    span = float(shares[-1] - shares[0])
    auc = float(np.trapezoid(accs, shares))
    apgr = (auc - weak * span) / ((strong - weak) * span)
    cpt = {f"cpt{int(x * 100)}": float(np.interp(weak + x * (strong - weak), accs, shares)) for x in (0.5, 0.8)}
    return {"apgr": apgr, **cpt, "small_accuracy": weak, "large_accuracy": strong}


# -- features and ridge ------------------------------------------------------------------------

@dataclass
class Design:
    rows: np.ndarray
    cols: np.ndarray
    vals: np.ndarray
    n: int
    dim: int


def build_design(questions: Sequence[Question], subjects: Sequence[str], use_subject: bool = True) -> Design:
    """Sparse design: hashed n-grams [0, BUCKETS), length buckets, subjects, then a bias column."""
    subj_index = {s: i for i, s in enumerate(subjects)}
    len_base = BUCKETS
    subj_base = len_base + len(LENGTH_BUCKETS) + 1
    bias_col = subj_base + len(subjects)
    rows: list[int] = []
    cols: list[int] = []
    vals: list[float] = []
    for r, q in enumerate(questions):
        for k, v in hashed_features(q.prompt, BUCKETS, 2, CHAR_NGRAMS).items():
            rows.append(r)
            cols.append(k)
            vals.append(v)
        rows.append(r)
        cols.append(len_base + length_bucket(len(tokens(q.prompt))))
        vals.append(1.0)
        if use_subject:
            rows.append(r)
            cols.append(subj_base + subj_index[q.subject])
            vals.append(1.0)
        rows.append(r)
        cols.append(bias_col)
        vals.append(1.0)
    return Design(np.asarray(rows), np.asarray(cols), np.asarray(vals), len(questions), bias_col + 1)


def ridge(design: Design, y: np.ndarray, lam: float, iters: int = 300) -> np.ndarray:
    """argmin ||Xw - y||^2 + lam ||w||^2 (bias included, lightly penalised) by conjugate gradients."""
    X = design

    def xv(v: np.ndarray) -> np.ndarray:
        return np.bincount(X.rows, weights=X.vals * v[X.cols], minlength=X.n)

    def xtu(u: np.ndarray) -> np.ndarray:
        return np.bincount(X.cols, weights=X.vals * u[X.rows], minlength=X.dim)

    def a(v: np.ndarray) -> np.ndarray:
        return xtu(xv(v)) + lam * v

    w = np.zeros(X.dim)
    r = xtu(y) - a(w)
    p = r.copy()
    rs = float(r @ r)
    for _ in range(iters):
        ap = a(p)
        alpha = rs / float(p @ ap)
        w += alpha * p
        r -= alpha * ap
        rs_new = float(r @ r)
        if rs_new < 1e-12:
            break
        p = r + (rs_new / rs) * p
        rs = rs_new
    return w


def to_weights(w: np.ndarray, subjects: Sequence[str], use_subject: bool) -> RouterWeights:
    len_base = BUCKETS
    subj_base = len_base + len(LENGTH_BUCKETS) + 1
    return RouterWeights(
        buckets=BUCKETS,
        char_ngrams=CHAR_NGRAMS,
        bias=float(w[-1]),
        dense_f16=encode_f16(w[:BUCKETS]),
        length_weights={i: float(w[len_base + i]) for i in range(len(LENGTH_BUCKETS) + 1)},
        subject_weights={s: float(w[subj_base + j]) for j, s in enumerate(subjects)} if use_subject else {},
    )


def fit(questions: Sequence[Question], subjects: Sequence[str], lam: float, use_subject: bool = True) -> RouterWeights:
    y = np.asarray([q.large - q.small for q in questions])
    return to_weights(ridge(build_design(questions, subjects, use_subject), y, lam), subjects, use_subject)


def evaluate(weights: RouterWeights, questions: Sequence[Question], use_subject: bool = True) -> dict[str, float]:
    s = score_many(weights, [q.prompt for q in questions], [q.subject if use_subject else None for q in questions])
    return apgr_cpt(s, [q.small for q in questions], [q.large for q in questions])


def calibrate(weights: RouterWeights, questions: Sequence[Question], bins: int = CALIBRATION_BINS,
              out_of_fold: Sequence[float] | None = None) -> tuple[CalibrationBin, ...]:
    """Equal-count score bands of the training split, with each model's accuracy in the band.

    Band edges are quantiles of ``weights``' own scores (so a threshold on its scale is right);
    accuracies per band come from ``out_of_fold`` scores when given (each question scored by a
    model that did not train on it), since in-sample scores flatter the model: in-sample, the
    easiest band even shows the small model beating the large one, which held-out data does not.
    """
    own = np.asarray(score_many(weights, [q.prompt for q in questions], [q.subject for q in questions]))
    s = np.asarray(out_of_fold) if out_of_fold is not None else own
    small = np.asarray([q.small for q in questions])
    large = np.asarray([q.large for q in questions])
    own_edges = np.quantile(own, np.linspace(0, 1, bins + 1))
    edges = np.quantile(s, np.linspace(0, 1, bins + 1))
    out = []
    for i in range(bins):
        lo, hi = float(edges[i]), float(edges[i + 1])
        sel = (s >= lo) & (s <= hi) if i == 0 else (s > lo) & (s <= hi)
        n = int(sel.sum())
        out.append(CalibrationBin(
            lower=float(own_edges[i]) if i else -1e9, upper=float(own_edges[i + 1]) if i < bins - 1 else 1e9,
            share=n / len(s),
            quality_large=float(large[sel].mean()) if n else 0.0,
            quality_small=float(small[sel].mean()) if n else 0.0,
        ))
    total = sum(b.share for b in out)
    return tuple(b.model_copy(update={"share": b.share / total}) for b in out)


def kfold_by_question(questions: Sequence[Question], seed: int, folds: int) -> list[list[int]]:
    """``folds`` disjoint index lists; every copy of a prompt text lands in the same fold."""
    unique = sorted({q.prompt for q in questions})
    order = np.random.default_rng(seed).permutation(len(unique))
    fold_of = {unique[j]: rank % folds for rank, j in enumerate(order)}
    return [[i for i, q in enumerate(questions) if fold_of[q.prompt] == f] for f in range(folds)]


def out_of_fold_ngram(questions: Sequence[Question], subjects: Sequence[str], lam: float,
                      folds: Sequence[Sequence[int]], use_subject: bool = True) -> np.ndarray:
    """Cross-fitted n-gram scores: each question scored by a model fitted on the other folds."""
    out = np.zeros(len(questions))
    for val_idx in folds:
        held = set(val_idx)
        w = fit([q for i, q in enumerate(questions) if i not in held], subjects, lam, use_subject)
        out[list(val_idx)] = ngram_many(w, [questions[i].prompt for i in val_idx],
                                        [questions[i].subject if use_subject else None for i in val_idx])
    return out


def stack(inputs: Mapping[str, np.ndarray], y: np.ndarray, names: Sequence[BlendTermName]
          ) -> tuple[list[BlendTerm], float]:
    """A final layer: ridge of ``y`` on the z-scored ``names`` inputs (missing inputs at their mean)."""
    terms = []
    columns = []
    for name in names:
        x = inputs[name]
        mean, std = float(np.nanmean(x)), float(np.nanstd(x)) or 1.0
        columns.append(np.nan_to_num((x - mean) / std, nan=0.0))
        terms.append(BlendTerm(name=name, mean=mean, std=std, weight=0.0))
    design = np.column_stack([*columns, np.ones(len(y))])
    penalty = STACK_PENALTY * np.eye(design.shape[1])
    penalty[-1, -1] = 0.0  # the bias is not shrunk
    w = np.linalg.solve(design.T @ design + penalty, design.T @ y)
    return [t.model_copy(update={"weight": float(wi)}) for t, wi in zip(terms, w[:-1], strict=True)], float(w[-1])


LAMBDAS = (1.0, 3.0, 10.0, 30.0)
CV_FOLDS = 5
STACK_PENALTY = 1.0  # final layers' ridge penalty on z-scored terms (7,000 rows: barely any shrinkage)
LIGHT_TERMS: tuple[BlendTermName, ...] = ("ngram", "choice_overlap_max", "choice_overlap_mean", "choice_overlap_min")


def train(folder: Path, seed: int, use_subject: bool = True) -> tuple[RouterWeights, dict[str, object]]:
    """Fit on the training half (penalty chosen on an inner split of it), report on the held-out half."""
    questions, files, dropped = load_questions(folder)
    subjects = sorted({q.subject for q in questions})
    train_idx, test_idx = split_by_question(questions, seed)
    train_q = [questions[i] for i in train_idx]
    test_q = [questions[i] for i in test_idx]
    inner_fit, inner_val = split_by_question(train_q, seed + 1, test_fraction=0.25)
    val_scores = {}
    for lam in LAMBDAS:
        w = fit([train_q[i] for i in inner_fit], subjects, lam, use_subject)
        val_scores[lam] = evaluate(w, [train_q[i] for i in inner_val], use_subject)["apgr"]
    best = max(LAMBDAS, key=lambda lam: val_scores[lam])
    folds = kfold_by_question(train_q, seed + 1, CV_FOLDS)
    light = overlap_inputs(out_of_fold_ngram(train_q, subjects, best, folds, use_subject), [q.prompt for q in train_q])
    terms, terms_bias = stack(light, np.asarray([q.large - q.small for q in train_q]), LIGHT_TERMS)
    weights = fit(train_q, subjects, best, use_subject).model_copy(update={"terms": tuple(terms),
                                                                          "terms_bias": terms_bias})
    held_out = evaluate(weights, test_q, use_subject)
    provenance: dict[str, object] = {
        "trainer": "wattplane/train_router.py",
        "data": [{"file": f.name, "sha256": hashlib.sha256(f.read_bytes()).hexdigest()} for f in files],
        "source": "lm-sys/RouteLLM routellm/evals/mmlu/ (Apache-2.0)",
        "small_model": SMALL_MODEL,
        "large_model": LARGE_MODEL,
        "target": "correct_large - correct_small",
        "contaminated_dropped": dropped,
        "seed": seed,
        "split": "by unique prompt, 50/50; penalty chosen on a 75/25 split of the training half (seed+1)",
        "train_questions": len(train_q),
        "test_questions": len(test_q),
        "use_subject": use_subject,
        "ridge_lambda": best,
        "light_layer": {"stacked": f"n-gram score + answer options' character-3-gram overlap, least squares on "
                                   f"{CV_FOLDS}-fold out-of-fold n-gram scores of the training half (seed+1)",
                        "terms": {t.name: round(t.weight, 4) for t in terms}},
        "calibration": f"10 equal-count bands; accuracies from the {CV_FOLDS}-fold out-of-fold light scores",
        "validation_apgr": {str(k): round(v, 4) for k, v in val_scores.items()},
        "held_out": {k: round(v, 4) for k, v in held_out.items()},
    }
    calibration = calibrate(weights, train_q, out_of_fold=list(blend(terms, terms_bias, light)))
    return weights.model_copy(update={"calibration": calibration, "provenance": provenance}), provenance


# -- the embedding head (optional, heavier) ----------------------------------------------------

EMBEDDING_OUT = DEFAULT_OUT.with_name("router_weights_embedding.json")
EMBEDDING_LAMBDAS = (3.0, 10.0, 30.0)
NEIGHBOURS = (50, 100, 200)
PROJECTION_DIMS = 64  # kNN works in a 64-d PCA of the embeddings: a 6x smaller bank, same neighbours
EMBEDDING_TERMS: tuple[BlendTermName, ...] = (
    "ngram", "embedding_ridge", "embedding_knn",
    "choice_similarity_max", "choice_similarity_mean", "choice_similarity_min",
)


@dataclass(frozen=True)
class EmbeddingParts:
    ridge: np.ndarray
    bias: float
    mean: np.ndarray
    projection: np.ndarray
    bank: np.ndarray  # float16-rounded, as stored
    targets: np.ndarray


def fit_embedding_parts(emb: np.ndarray, y: np.ndarray, lam: float) -> EmbeddingParts:
    """Ridge on the embeddings (closed form: 384 dims) and the PCA-projected kNN bank."""
    e = emb.astype(np.float64)
    bias = float(y.mean())
    ridge_w = np.linalg.solve(e.T @ e + lam * np.eye(e.shape[1]), e.T @ (y - bias))
    mean = e.mean(axis=0)
    _, _, vt = np.linalg.svd(e - mean, full_matrices=False)
    projection = vt[:PROJECTION_DIMS].T
    bank = (e - mean) @ projection
    bank /= np.linalg.norm(bank, axis=1, keepdims=True)
    f16 = [np.asarray(x, dtype="<f2").astype(np.float64) for x in (ridge_w, mean, projection, bank)]
    return EmbeddingParts(f16[0], bias, f16[1], f16[2], f16[3], y.astype(np.int64))


def _head(parts: EmbeddingParts, k: int, terms: Sequence[BlendTerm], bias: float, encoder: str) -> EmbeddingHead:
    return EmbeddingHead(
        encoder=encoder, dim=len(parts.ridge), ridge_f16=encode_f16(parts.ridge), ridge_bias=parts.bias,
        knn_mean_f16=encode_f16(parts.mean), knn_projection_f16=encode_f16(parts.projection.ravel()),
        knn_bank_f16=encode_f16(parts.bank.ravel()), knn_targets=tuple(int(t) for t in parts.targets), k=k,
        terms=tuple(terms), bias=bias,
    )


def question_option_similarities(encoder: SentenceEncoder, questions: Sequence[Question]) -> np.ndarray:
    """``n x 3`` option similarities (NaN rows: no options), embeddings through the on-disk cache."""
    from wattplane.encoder_files import embed_cached

    return option_similarities([q.prompt for q in questions], lambda texts: embed_cached(encoder, texts))


def train_embedding(folder: Path, seed: int, base: RouterWeights) -> tuple[RouterWeights, dict[str, object]]:
    """Add an embedding head to ``base`` (the n-gram weights of the same seed's training half).

    Stacking, all inside the training half: 5-fold out-of-fold values (folds by seed+1) of the n-gram
    score, the embedding ridge (each penalty) and the neighbours' mean target (each k), plus the
    answer options' similarities (no fitting); the final layer is a least-squares fit of the target
    on them. The embedding penalty and k are the pair whose final layer scores the best APGR on the
    held-back folds (the layer refitted without each fold). The held-out half is scored once, at the end.
    """
    from wattplane.encoder_files import ENCODER_ID, embed_cached, load_encoder

    questions, _, _ = load_questions(folder)
    subjects = sorted({q.subject for q in questions})
    train_idx, test_idx = split_by_question(questions, seed)
    train_q = [questions[i] for i in train_idx]
    test_q = [questions[i] for i in test_idx]
    lam = float(base.provenance.get("ridge_lambda", 30.0))
    encoder = load_encoder()
    emb_train = embed_cached(encoder, [q.prompt for q in train_q])
    sims_train = question_option_similarities(encoder, train_q)
    y = np.asarray([q.large - q.small for q in train_q])
    folds = kfold_by_question(train_q, seed + 1, CV_FOLDS)
    fold_of = np.zeros(len(train_q), dtype=np.int64)
    oof: dict[str, np.ndarray] = {"ngram": out_of_fold_ngram(train_q, subjects, lam, folds)}
    for f, val_idx in enumerate(folds):
        fold_of[val_idx] = f
        held = set(val_idx)
        fit_idx = [i for i in range(len(train_q)) if i not in held]
        raw = {}
        for emb_lam in EMBEDDING_LAMBDAS:
            scorer = EmbeddingScorer(_head(fit_embedding_parts(emb_train[fit_idx], y[fit_idx], emb_lam), 1, (), 0.0,
                                           ENCODER_ID))
            raw[f"ridge{emb_lam}"], _ = scorer.parts(emb_train[val_idx])
        for k in NEIGHBOURS:  # the kNN part (PCA bank) does not depend on the ridge penalty: once per fold
            raw[f"knn{k}"] = scorer.parts(emb_train[val_idx], k)[1]
        for key, values in raw.items():
            oof.setdefault(key, np.zeros(len(train_q)))[val_idx] = values

    def inputs(emb_lam: float, k: int, rows: np.ndarray | slice = slice(None)) -> dict[str, np.ndarray]:
        return term_inputs(oof["ngram"][rows], oof[f"ridge{emb_lam}"][rows], oof[f"knn{k}"][rows], sims_train[rows])

    def cv_apgr(emb_lam: float, k: int) -> float:
        vals = []
        for f in range(CV_FOLDS):
            rest, this = np.flatnonzero(fold_of != f), np.flatnonzero(fold_of == f)
            terms, bias = stack(inputs(emb_lam, k, rest), y[rest], EMBEDDING_TERMS)
            val_q = [train_q[i] for i in this]
            vals.append(apgr_cpt(blend(terms, bias, inputs(emb_lam, k, this)), [q.small for q in val_q],
                                 [q.large for q in val_q])["apgr"])
        return float(np.mean(vals))

    grid = {(emb_lam, k): cv_apgr(emb_lam, k) for emb_lam in EMBEDDING_LAMBDAS for k in NEIGHBOURS}
    emb_lam, k = max(grid, key=lambda g: grid[g])
    terms, bias = stack(inputs(emb_lam, k), y, EMBEDDING_TERMS)
    head = _head(fit_embedding_parts(emb_train, y, emb_lam), k, terms, bias, ENCODER_ID)
    weights = base.model_copy(update={"embedding": head})
    ngram_test = ngram_many(weights, [q.prompt for q in test_q], [q.subject for q in test_q])
    combined = EmbeddingScorer(head).combine(ngram_test, embed_cached(encoder, [q.prompt for q in test_q]),
                                             question_option_similarities(encoder, test_q))
    held_out = apgr_cpt(combined, [q.small for q in test_q], [q.large for q in test_q])
    provenance = {
        **base.provenance,
        "embedding": {
            "encoder": ENCODER_ID,
            "encoder_files": "wattplane/encoder_files.py (SHA-256 pinned to the Hugging Face revision)",
            "chosen_by": f"{CV_FOLDS}-fold CV inside the training half (seed+1): final layer fitted on "
                         "out-of-fold terms; ridge penalty and neighbours by the layer's held-back-fold APGR",
            "ridge_lambda": emb_lam, "neighbours": k, "projection_dims": PROJECTION_DIMS,
            "terms": {t.name: round(t.weight, 4) for t in terms},
            "cv_apgr": {f"{g[0]}/{g[1]}": round(v, 4) for g, v in grid.items()},
            "held_out": {key: round(v, 4) for key, v in held_out.items()},
        },
    }
    return weights.model_copy(update={"provenance": provenance}), provenance


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--labels", default=None, help="directory with mmlu_*.csv (overrides --data-dir)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    parser.add_argument("--no-subject", action="store_true", help="text features only")
    parser.add_argument("--embedding", action="store_true",
                        help="also fit the embedding head (needs the sentence encoder: wattplane fetch-encoder); "
                             f"default --out {EMBEDDING_OUT.relative_to(EMBEDDING_OUT.parents[2])}")


def run(args: argparse.Namespace) -> int:
    folder = labels_dir(args.data_dir, args.labels)
    weights, provenance = train(folder, args.seed, not args.no_subject)
    out = Path(args.out)
    if args.embedding:
        weights, provenance = train_embedding(folder, args.seed, weights)
        out = EMBEDDING_OUT if args.out == str(DEFAULT_OUT) else out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(weights.model_dump_json())
    sys.stdout.write(json.dumps({"out": str(out), "bytes": out.stat().st_size, **provenance}, indent=2) + "\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wattplane.train_router", description=__doc__.split("\n")[0])
    configure(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
