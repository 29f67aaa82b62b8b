"""The difficulty scorer, its trainer's split and RouteLLM's metrics."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from policies.difficulty import (
    BlendTerm,
    RouterWeights,
    Scorer,
    encode_f16,
    hashed_features,
    hashed_vector,
    length_bucket,
    score,
    weights_from_json,
)
from policies.prompt_choices import choice_overlap
from wattplane.train_router import Question, apgr_cpt, evaluate, fit, load_questions, split_by_question

WEIGHTS = Path(__file__).resolve().parents[2] / "policies" / "data" / "router_weights.json"


def test_features_are_deterministic_and_normalised() -> None:
    a = hashed_features("What is the derivative of x^2?", 1 << 12)
    b = hashed_features("what is THE derivative of x^2 ?", 1 << 12)
    assert a == b  # case and punctuation do not matter; crc32 is stable across processes
    assert math.isclose(sum(v * v for v in a.values()), 1.0)
    assert all(0 <= k < 1 << 12 for k in a)
    assert hashed_features("", 1 << 12) == {}


def test_char_ngrams_add_a_normalised_block() -> None:
    words = hashed_features("x = 3.14 * r^2", 1 << 12)
    both = hashed_features("x = 3.14 * r^2", 1 << 12, char_ngrams=(3, 4))
    assert both != words
    assert math.isclose(sum(v * v for v in both.values()), 2.0, rel_tol=0.5)  # two unit blocks, some overlap
    assert hashed_features("X = 3.14 * R^2", 1 << 12, char_ngrams=(3, 4)) == both


def test_dense_scorer_matches_reference_score() -> None:
    w = weights_from_json(WEIGHTS.read_text())
    scorer = Scorer(w)
    for text, subject in (("What is 2+2?\nA. 3\nB. 4\nAnswer:", None), ("Define entropy." * 40, "college_physics"),
                          ("", None)):
        assert scorer.score(text, subject) == pytest.approx(score(w, text, subject), abs=1e-9)


def test_compact_f16_weights_score_like_the_mapping() -> None:
    rng = np.random.default_rng(3)
    dense = rng.normal(0, 0.01, 1 << 10)
    mapping = RouterWeights(buckets=1 << 10, char_ngrams=(3, 4), bias=0.1,
                            weights={i: float(v) for i, v in enumerate(dense)})
    compact = RouterWeights(buckets=1 << 10, char_ngrams=(3, 4), bias=0.1, dense_f16=encode_f16(dense))
    assert np.allclose(hashed_vector(compact), dense, rtol=1e-3, atol=1e-7)
    text = "Which enzyme unwinds the DNA double helix during replication?"
    assert score(compact, text) == pytest.approx(score(mapping, text), abs=1e-4)
    assert Scorer(compact).score(text) == pytest.approx(score(compact, text), abs=1e-9)
    with pytest.raises(ValueError, match="buckets"):
        hashed_vector(compact.model_copy(update={"buckets": 1 << 11}))


def test_length_buckets_are_ordered() -> None:
    assert length_bucket(1) == 0
    assert length_bucket(100) < length_bucket(1000) < length_bucket(100_000)


def test_score_is_linear_in_weights() -> None:
    text = "Which of the following best describes the structure that collects urine in the body?"
    feats = hashed_features(text, 256)
    w = RouterWeights(buckets=256, bias=0.5, weights={k: 2.0 for k in feats}, subject_weights={"anatomy": -0.25})
    expected = 0.5 + 2.0 * sum(feats.values())
    assert score(w, text) == pytest.approx(expected)
    assert score(w, text, "anatomy") == pytest.approx(expected - 0.25)
    assert score(w, text, "unknown-subject") == pytest.approx(expected)


def test_light_layer_adds_the_options_overlap_and_leaves_prompts_without_options_to_the_ngram_term() -> None:
    terms = (BlendTerm(name="ngram", mean=0.5, std=0.25, weight=1.0),
             BlendTerm(name="choice_overlap_mean", mean=0.2, std=0.1, weight=0.5))
    w = RouterWeights(buckets=256, bias=0.5, terms=terms, terms_bias=0.1)  # no n-gram weights: n-gram score 0.5
    alike = "Which car?\nA. the red car\nB. the red cart\nAnswer:"
    apart = "Which car?\nA. the red car\nB. photosynthesis\nAnswer:"
    overlap = choice_overlap(("the red car", "the red cart"))[1]
    assert score(w, alike) == pytest.approx(0.1 + 0.5 * (overlap - 0.2) / 0.1)
    assert score(w, alike) > score(w, apart)  # look-alike options: more need of the large model
    assert score(w, "Tell me a joke about GPUs.") == pytest.approx(0.1)  # no options: that term counts as its mean
    assert score(w.model_copy(update={"terms": ()}), alike) == pytest.approx(0.5)  # without the layer: n-grams only
    for text in (alike, apart, "Tell me a joke about GPUs."):
        assert Scorer(w).score(text) == pytest.approx(score(w, text), abs=1e-12)


def _synthetic(n: int, seed: int) -> list[Question]:
    """Questions whose difficulty is signalled by a word, with duplicates of some prompts."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        hard = rng.random() < 0.4
        prompt = f"question {i % (n // 2)} about {'quantum entanglement' if hard else 'simple arithmetic'}"
        large = 1.0 if rng.random() < 0.9 else 0.0
        small = (1.0 if rng.random() < 0.3 else 0.0) if hard else large
        out.append(Question(prompt, "physics" if hard else "math", small, large))
    return out


def test_split_keeps_every_prompt_on_one_side() -> None:
    qs = _synthetic(400, 1)
    train, test = split_by_question(qs, seed=7)
    assert set(train).isdisjoint(test) and len(train) + len(test) == len(qs)
    assert {qs[i].prompt for i in train}.isdisjoint({qs[i].prompt for i in test})
    assert split_by_question(qs, seed=7) == (train, test)
    assert split_by_question(qs, seed=8) != (train, test)


def test_metrics_order_random_below_learned_below_oracle() -> None:
    qs = _synthetic(2000, 2)
    train, test = split_by_question(qs, seed=0)
    w = fit([qs[i] for i in train], ["math", "physics"], lam=1.0, use_subject=False)
    held = [qs[i] for i in test]
    learned = evaluate(w, held, use_subject=False)
    small = [q.small for q in held]
    large = [q.large for q in held]
    rnd = apgr_cpt(np.random.default_rng(0).random(len(held)), small, large)
    oracle = apgr_cpt([q.large - q.small for q in held], small, large)
    assert rnd["apgr"] < learned["apgr"] <= oracle["apgr"] + 1e-9
    assert learned["cpt50"] < rnd["cpt50"]
    assert 0.0 <= learned["cpt50"] <= learned["cpt80"] <= 1.0


def test_packaged_weights_carry_provenance() -> None:
    w = weights_from_json(WEIGHTS.read_text())
    p = w.provenance
    assert WEIGHTS.stat().st_size < 2_000_000
    assert p["seed"] == 0 and p["contaminated_dropped"] >= 1
    assert p["train_questions"] > 5000 and p["test_questions"] > 5000
    assert all(len(d["sha256"]) == 64 for d in p["data"])
    assert {"apgr", "cpt50", "cpt80"} <= set(p["held_out"])
    assert len(w.calibration) == 10 and math.isclose(sum(b.share for b in w.calibration), 1.0, abs_tol=1e-9)


def test_packaged_weights_reproduce_held_out_metrics(data_dir: Path) -> None:
    folder = data_dir / "routing" / "routellm-mmlu"
    if not folder.is_dir():
        pytest.skip("routing labels missing: lm-sys/RouteLLM routellm/evals/mmlu/")
    w = weights_from_json(WEIGHTS.read_text())
    questions, _, _ = load_questions(folder)
    _train, test = split_by_question(questions, w.provenance["seed"])
    assert len(test) == w.provenance["test_questions"]
    got = evaluate(w, [questions[i] for i in test])
    assert got["apgr"] == pytest.approx(w.provenance["held_out"]["apgr"], abs=1e-3)
    # beats a random router clearly on questions it never saw
    assert got["apgr"] > 0.6 and got["cpt50"] < 0.35
