"""The numpy sentence encoder's tokenizer and forward pass, on small made-up weights (no download)."""

from __future__ import annotations

import numpy as np

from policies.difficulty import BlendTerm, EmbeddingHead, EmbeddingScorer, encode_f16
from policies.text_encoder import SentenceEncoder, WordPieceTokenizer

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "the", "cat", "un", "##aff", "##able", ",", "!", "cafe", "3", ".",
         "14", "中", "##s"]


def test_basic_tokenisation_follows_bert_uncased() -> None:
    tok = WordPieceTokenizer(VOCAB)
    assert tok.words("The  CAT,\tsat!") == ["the", "cat", ",", "sat", "!"]
    assert tok.words("Café") == ["cafe"]  # accents stripped after lower-casing
    assert tok.words("3.14") == ["3", ".", "14"]  # every non-alphanumeric ASCII character splits
    assert tok.words("a中b") == ["a", "中", "b"]  # CJK characters stand alone
    assert tok.words("x\x00y\u200b") == ["xy"]  # NUL dropped, format characters removed


def test_wordpiece_is_greedy_longest_match_and_unk_is_whole_word() -> None:
    tok = WordPieceTokenizer(VOCAB)
    v = tok.vocab
    assert tok.word_ids("unaffable") == [v["un"], v["##aff"], v["##able"]]
    assert tok.word_ids("cats") == [v["cat"], v["##s"]]
    assert tok.word_ids("unaffablez") == [v["[UNK]"]]  # one unmatched piece: the whole word is [UNK]
    assert tok.word_ids("x" * 101) == [v["[UNK]"]]
    ids = tok.encode("the cat " * 200, max_tokens=16)
    assert len(ids) == 16 and ids[0] == v["[CLS]"] and ids[-1] == v["[SEP]"]


def _random_weights(vocab: int, width: int = 8, layers: int = 2, inner: int = 16) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)

    def r(*shape: int) -> np.ndarray:
        return rng.normal(0, 0.3, shape).astype(np.float32)

    w = {"embeddings.word_embeddings.weight": r(vocab, width), "embeddings.position_embeddings.weight": r(64, width),
         "embeddings.token_type_embeddings.weight": r(2, width),
         "embeddings.LayerNorm.weight": np.ones(width, np.float32), "embeddings.LayerNorm.bias": r(width)}
    for n in range(layers):
        p = f"encoder.layer.{n}."
        for k in ("query", "key", "value"):
            w[p + f"attention.self.{k}.weight"], w[p + f"attention.self.{k}.bias"] = r(width, width), r(width)
        w[p + "attention.output.dense.weight"], w[p + "attention.output.dense.bias"] = r(width, width), r(width)
        w[p + "intermediate.dense.weight"], w[p + "intermediate.dense.bias"] = r(inner, width), r(inner)
        w[p + "output.dense.weight"], w[p + "output.dense.bias"] = r(width, inner), r(width)
        for ln in ("attention.output.LayerNorm", "output.LayerNorm"):
            w[p + ln + ".weight"], w[p + ln + ".bias"] = np.ones(width, np.float32), r(width)
    return w


def test_embeddings_are_unit_length_and_padding_does_not_leak() -> None:
    enc = SentenceEncoder(_random_weights(len(VOCAB)), VOCAB, heads=2)
    alone = enc.embed(["the cat"])
    batched = enc.embed(["the cat", "the cat , unaffable cafe ! 3.14 the cat the cat"], batch_size=2)
    assert np.allclose(np.linalg.norm(batched, axis=1), 1.0, atol=1e-5)
    assert np.allclose(alone[0], batched[0], atol=1e-5)  # the short text padded in a batch: same embedding
    assert not np.allclose(batched[0], batched[1], atol=1e-3)


def test_embedding_head_stacks_z_scored_terms_and_knn_reads_nearest_targets() -> None:
    # four training prompts on two axes after projection (dim 4 -> proj 2)
    bank = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    bank /= np.linalg.norm(bank, axis=1, keepdims=True)
    terms = (
        BlendTerm(name="ngram", mean=1.0, std=2.0, weight=1.0),
        BlendTerm(name="embedding_ridge", mean=0.0, std=1.0, weight=0.5),
        BlendTerm(name="embedding_knn", mean=0.0, std=0.5, weight=2.0),
        BlendTerm(name="choice_similarity_mean", mean=0.4, std=0.1, weight=0.3),
    )
    head = EmbeddingHead(
        encoder="test", dim=4, ridge_f16=encode_f16(np.array([1.0, 0, 0, 0])), ridge_bias=0.5,
        knn_mean_f16=encode_f16(np.zeros(4)),
        knn_projection_f16=encode_f16(np.array([[1.0, 0], [0, 1], [0, 0], [0, 0]]).ravel()),
        knn_bank_f16=encode_f16(bank.ravel()), knn_targets=(1, 1, -1, 0), k=2, terms=terms, bias=0.25,
    )
    scorer = EmbeddingScorer(head)
    e = np.array([[1.0, 0.05, 0, 0], [0.05, 1.0, 0, 0]])
    ridge, knn = scorer.parts(e)
    assert np.allclose(knn, [1.0, -0.5], atol=1e-3)  # two nearest: first two rows, last two rows
    assert np.allclose(ridge, e[:, 0] + 0.5, atol=1e-3)
    sims = np.array([[0.9, 0.6, 0.2], [np.nan, np.nan, np.nan]])  # the second prompt has no answer options
    combined = scorer.combine([3.0, 1.0], e, sims)
    expected = 0.25 + (np.array([3.0, 1.0]) - 1.0) / 2.0 + 0.5 * ridge + 2.0 * knn / 0.5 + 0.3 * np.array([2.0, 0.0])
    assert np.allclose(combined, expected, atol=1e-6)
