"""The trainer's embedding-head pieces on synthetic embeddings (the real run needs every question embedded)."""

from __future__ import annotations

import numpy as np

from policies.difficulty import EmbeddingScorer
from wattplane.train_router import EMBEDDING_TERMS, Question, _head, fit_embedding_parts, kfold_by_question, stack


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
    scorer = EmbeddingScorer(_head(parts, 15, (), 0.0, "t"))
    ridge, knn = scorer.parts(e[500:])
    truth = y[500:]
    assert np.corrcoef(ridge, truth)[0, 1] > 0.8
    assert np.corrcoef(knn, truth)[0, 1] > 0.5
    assert ridge[truth == 1].mean() > ridge[truth == -1].mean()


def test_the_final_layer_weighs_the_terms_that_predict_the_target_and_ignores_the_rest() -> None:
    rng = np.random.default_rng(1)
    n = 4000
    inputs = {name: rng.normal(loc=i, scale=1 + i, size=n) for i, name in enumerate(EMBEDDING_TERMS)}
    sims = inputs["choice_similarity_mean"]  # mean 4, spread 5
    assert EMBEDDING_TERMS.index("choice_similarity_mean") == 4
    sims[: n // 4] = np.nan  # a quarter of the prompts have no answer options
    y = 0.8 * inputs["ngram"] + 0.4 * np.nan_to_num((sims - 4) / 5) + rng.normal(scale=0.3, size=n)
    terms, bias = stack(inputs, y, EMBEDDING_TERMS)
    by_name = {t.name: t for t in terms}
    assert [t.name for t in terms] == list(EMBEDDING_TERMS)
    assert abs(by_name["ngram"].weight - 0.8) < 0.05
    assert abs(by_name["choice_similarity_mean"].weight - 0.4) < 0.05
    assert abs(by_name["choice_similarity_mean"].mean - 4) < 0.3  # the mean of the prompts that have options
    for name in ("embedding_ridge", "embedding_knn", "choice_similarity_max", "choice_similarity_min"):
        assert abs(by_name[name].weight) < 0.03
    assert abs(bias) < 0.05
