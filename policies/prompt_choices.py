"""The answer options of a multiple-choice prompt, and how alike they are.

Why: a question whose options say nearly the same thing is where a small model slips. On the
training half of RouteLLM's MMLU labels, the mean cosine similarity between a question's options
(sentence embeddings) correlates -0.27 with the small model being right and +0.11 with the large
model's gain over it, a signal the n-gram scorer does not see (the n-grams of the whole prompt say
what it is about, not how close its options are to each other). The difficulty scorer
(``policies/difficulty.py``) reads it twice: cheaply as the options' shared character 3-grams
(Jaccard; the per-request router's path), and as the similarity of their sentence embeddings
(the embedding head). Each gives max / mean / min over pairs of options.

Prompts in the MMLU layout end with lines ``A. ...``, ``B. ...``, ... (and a closing ``Answer:``);
anything else has no options and the head treats the similarities as unknown.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

_ANSWER_CUE = re.compile(r"\n\s*Answer:\s*$")
_NEXT_OPTION = re.compile(r"\n(?=[B-Z]\. )")
_SPACES = re.compile(r"\s+")
SIMILARITY_FEATURES = ("max", "mean", "min")
MAX_OPTION_CHARS = 1024  # overlap reads this much of each option (bounds a request's cost; MMLU's longest: 881)


def split_choices(text: str) -> tuple[str, tuple[str, ...]] | None:
    """(stem, options) of a prompt whose last lines are options ``A. `` ``B. `` ... in order; else None.

    An option may run over several lines; the options must be lettered A, B, C, ... without gaps
    and there must be at least two.
    """
    body = _ANSWER_CUE.sub("", text.rstrip())
    start = body.rfind("\nA. ")
    if start < 0:
        return None
    parts = _NEXT_OPTION.split(body[start + 1:])
    if len(parts) < 2 or [p[0] for p in parts] != [chr(ord("A") + i) for i in range(len(parts))]:
        return None
    return body[:start], tuple(p[3:] for p in parts)


def _trigrams(text: str) -> set[str]:
    padded = " " + _SPACES.sub(" ", text.lower()) + " "
    return {padded[i:i + 3] for i in range(len(padded) - 2)}


def choice_overlap(options: Sequence[str]) -> tuple[float, float, float]:
    """(max, mean, min) Jaccard overlap of character 3-grams over pairs of options (case and spacing folded)."""
    if len(options) < 2:
        raise ValueError(f"need at least two options, got {len(options)}")
    grams = [_trigrams(o[:MAX_OPTION_CHARS]) for o in options]
    pairs = [len(a & b) / max(1, len(a | b)) for i, a in enumerate(grams) for b in grams[i + 1:]]
    return max(pairs), sum(pairs) / len(pairs), min(pairs)


def choice_similarity(option_embeddings: npt.NDArray[np.floating]) -> tuple[float, float, float]:
    """(max, mean, min) cosine similarity over pairs of options (rows: unit-length embeddings)."""
    e = np.asarray(option_embeddings, dtype=np.float64)
    if e.ndim != 2 or len(e) < 2:
        raise ValueError(f"need at least two option embeddings, got shape {e.shape}")
    sims = e @ e.T
    pairs = sims[np.triu_indices(len(e), 1)]
    return float(pairs.max()), float(pairs.mean()), float(pairs.min())


__all__ = ["SIMILARITY_FEATURES", "choice_overlap", "choice_similarity", "split_choices"]
