"""The trainer's embedding-head pieces on synthetic embeddings (the real run needs every question embedded)."""

from __future__ import annotations

import numpy as np

from policies.difficulty import EmbeddingScorer
from wattplane.train_router import Question, _head, fit_embedding_parts, kfold_by_question


def test_folds_partition_and_keep_copies_of_a_prompt_together() -> None:
    qs = [Question(f"q{i % 37}", "s", 1.0, 0.0) for i in range(100)]  # 37 prompts, most appear 2-3 times
    folds = kfold_by_question(qs, seed=3, folds=5)
    assert sorted(i for f in folds for i in f) == list(range(100))
    for f in folds:
        prompts = {qs[i].prompt for i in f}
        assert all(qs[i].prompt not in prompts for g in folds if g is not f for i in g)
    assert kfold_by_question(qs, seed=3, folds=5) == folds


def test_ridge_and_neighbours_recover_a_direction_that_predicts_the_target() -> None:
    rng = np.random.default_rng(0)
    e = rng.normal(size=(600, 32))
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    y = np.where(e[:, 0] > 0.1, 1, np.where(e[:, 0] < -0.1, -1, 0))  # "hard" prompts lie along axis 0
    parts = fit_embedding_parts(e[:500], y[:500].astype(float), lam=1.0)
    scorer = EmbeddingScorer(_head(parts, 15, {"ngram": (0, 1), "ridge": (0, 1), "knn": (0, 1)}, (1, 1), "t"))
    ridge, knn = scorer.parts(e[500:])
    truth = y[500:]
    assert np.corrcoef(ridge, truth)[0, 1] > 0.8
    assert np.corrcoef(knn, truth)[0, 1] > 0.5
    assert ridge[truth == 1].mean() > ridge[truth == -1].mean()
