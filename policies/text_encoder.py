"""A sentence encoder in numpy: BERT's uncased WordPiece tokenizer and a MiniLM-style encoder.

Why numpy: the difficulty scorer's optional embedding head needs sentence embeddings, and the
usual runtime (PyTorch) is gigabytes that this project's router and CI should not carry. The
forward pass of a 6-layer, 384-wide BERT (``sentence-transformers/all-MiniLM-L6-v2``: mean
pooling over tokens, then L2 normalisation) is a few matrix products per layer. Tokenisation
follows Hugging Face's ``BertTokenizer`` (lower-case, strip accents, split punctuation and CJK
characters, greedy longest-match WordPiece); the tests check both against the published model's
outputs.

Pure: the weights arrive as arrays (``wattplane/encoder_files.py`` reads and verifies them).
"""

from __future__ import annotations

import unicodedata
from collections.abc import Mapping, Sequence

import numpy as np
import numpy.typing as npt

Array = npt.NDArray[np.float32]

MAX_TOKENS = 256  # all-MiniLM-L6-v2's max_seq_length (longer inputs are truncated, as the model card says)
MAX_WORD_CHARS = 100  # BertTokenizer: a longer "word" becomes [UNK]


def _is_punctuation(ch: str) -> bool:
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True  # BERT treats every non-alphanumeric ASCII character as punctuation
    return unicodedata.category(ch).startswith("P")


def _is_cjk(cp: int) -> bool:
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF
            or 0x2A700 <= cp <= 0x2B73F or 0x2B740 <= cp <= 0x2B81F or 0x2B820 <= cp <= 0x2CEAF
            or 0xF900 <= cp <= 0xFAFF or 0x2F800 <= cp <= 0x2FA1F)


class WordPieceTokenizer:
    """BERT's uncased tokenizer: text -> token ids with [CLS] ... [SEP]."""

    def __init__(self, vocab: Sequence[str]) -> None:
        self.vocab = {w: i for i, w in enumerate(vocab) if w}
        self.unk = self.vocab["[UNK]"]
        self.cls = self.vocab["[CLS]"]
        self.sep = self.vocab["[SEP]"]

    def words(self, text: str) -> list[str]:
        """Basic tokenisation: clean, space out CJK, lower-case, strip accents, split off punctuation."""
        cleaned = []
        for ch in text:
            cp = ord(ch)
            if cp in (0, 0xFFFD):
                continue
            cat = unicodedata.category(ch)
            if ch in "\t\n\r" or cat == "Zs":
                cleaned.append(" ")
            elif cat in ("Cc", "Cf"):
                continue
            elif _is_cjk(cp):
                cleaned.append(f" {ch} ")
            else:
                cleaned.append(ch)
        out: list[str] = []
        for word in "".join(cleaned).split():
            word = "".join(c for c in unicodedata.normalize("NFD", word.lower()) if unicodedata.category(c) != "Mn")
            current = ""
            for c in word:
                if _is_punctuation(c):
                    if current:
                        out.append(current)
                        current = ""
                    out.append(c)
                else:
                    current += c
            if current:
                out.append(current)
        return out

    def word_ids(self, word: str) -> list[int]:
        """Greedy longest-match-first WordPiece; a word with an unmatched piece is one [UNK]."""
        if len(word) > MAX_WORD_CHARS:
            return [self.unk]
        ids: list[int] = []
        start = 0
        while start < len(word):
            end = len(word)
            found = None
            while start < end:
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in self.vocab:
                    found = self.vocab[piece]
                    break
                end -= 1
            if found is None:
                return [self.unk]
            ids.append(found)
            start = end
        return ids

    def encode(self, text: str, max_tokens: int = MAX_TOKENS) -> list[int]:
        ids: list[int] = []
        for word in self.words(text):
            ids.extend(self.word_ids(word))
            if len(ids) >= max_tokens - 2:
                break
        return [self.cls, *ids[: max_tokens - 2], self.sep]


def _erf(x: Array) -> Array:
    """erf by Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7, far below float32 activations' noise)."""
    a = np.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * a)
    poly = ((((1.061405429 * t - 1.453152027) * t + 1.421413741) * t - 0.284496736) * t + 0.254829592) * t
    out: Array = (np.sign(x) * (1.0 - poly * np.exp(-a * a))).astype(np.float32)
    return out


def _layer_norm(x: Array, gain: Array, bias: Array, eps: float = 1e-12) -> Array:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    out: Array = ((x - mean) / np.sqrt(var + eps) * gain + bias).astype(np.float32, copy=False)
    return out


class SentenceEncoder:
    """BERT encoder + mean pooling + L2 normalisation, from a Hugging Face ``BertModel`` state dict.

    ``weights`` uses the safetensors names of ``sentence-transformers/all-MiniLM-L6-v2``
    (``embeddings.*``, ``encoder.layer.N.*``); the layer count, width and heads come from the
    arrays and ``heads``.
    """

    def __init__(self, weights: Mapping[str, npt.NDArray[np.generic]], vocab: Sequence[str], heads: int = 12) -> None:
        def w(name: str) -> Array:
            return np.asarray(weights[name], dtype=np.float32)

        self.tokenizer = WordPieceTokenizer(vocab)
        self.heads = heads
        self.word = w("embeddings.word_embeddings.weight")
        self.position = w("embeddings.position_embeddings.weight")
        self.token_type = w("embeddings.token_type_embeddings.weight")[0]
        self.embed_norm = (w("embeddings.LayerNorm.weight"), w("embeddings.LayerNorm.bias"))
        self.width = self.word.shape[1]
        self.layers: list[tuple[Array, ...]] = []
        n = 0
        while f"encoder.layer.{n}.attention.self.query.weight" in weights:
            p = f"encoder.layer.{n}."
            qkv = np.concatenate([w(p + f"attention.self.{k}.weight") for k in ("query", "key", "value")]).T.copy()
            qkv_bias = np.concatenate([w(p + f"attention.self.{k}.bias") for k in ("query", "key", "value")])
            self.layers.append((
                qkv, qkv_bias,
                w(p + "attention.output.dense.weight").T.copy(), w(p + "attention.output.dense.bias"),
                w(p + "attention.output.LayerNorm.weight"), w(p + "attention.output.LayerNorm.bias"),
                w(p + "intermediate.dense.weight").T.copy(), w(p + "intermediate.dense.bias"),
                w(p + "output.dense.weight").T.copy(), w(p + "output.dense.bias"),
                w(p + "output.LayerNorm.weight"), w(p + "output.LayerNorm.bias"),
            ))
            n += 1
        if not self.layers:
            raise ValueError("no encoder.layer.N weights")

    @property
    def dim(self) -> int:
        return int(self.width)

    def _forward(self, batch: Sequence[Sequence[int]]) -> Array:
        b, t = len(batch), max(len(x) for x in batch)
        ids = np.zeros((b, t), dtype=np.int64)
        mask = np.zeros((b, t), dtype=np.float32)
        for i, x in enumerate(batch):
            ids[i, : len(x)] = x
            mask[i, : len(x)] = 1.0
        h: Array = (self.word[ids] + self.position[:t][None] + self.token_type).astype(np.float32, copy=False)
        h = _layer_norm(h, *self.embed_norm)
        additive = ((1.0 - mask) * -1e4)[:, None, None, :].astype(np.float32)  # padding gets no attention
        dh = self.width // self.heads
        for qkv_w, qkv_b, out_w, out_b, g1, b1, in_w, in_b, ffo_w, ffo_b, g2, b2 in self.layers:
            qkv = h @ qkv_w + qkv_b
            q, k, v = (qkv[..., j * self.width:(j + 1) * self.width].reshape(b, t, self.heads, dh).transpose(0, 2, 1, 3)
                       for j in range(3))
            scores = (q @ k.transpose(0, 1, 3, 2)) / np.float32(np.sqrt(dh)) + additive
            scores = np.exp(scores - scores.max(-1, keepdims=True))
            attn = scores / scores.sum(-1, keepdims=True)
            context = (attn @ v).transpose(0, 2, 1, 3).reshape(b, t, self.width)
            h = _layer_norm(context @ out_w + out_b + h, g1, b1)
            inner: Array = h @ in_w + in_b
            inner = inner * np.float32(0.5) * (np.float32(1.0) + _erf(inner * np.float32(1 / np.sqrt(2.0))))  # erf GELU
            h = _layer_norm(inner @ ffo_w + ffo_b + h, g2, b2)
        m = mask[..., None]
        pooled = (h * m).sum(1) / np.maximum(m.sum(1), 1e-9)
        out: Array = (pooled / np.linalg.norm(pooled, axis=1, keepdims=True)).astype(np.float32)
        return out

    def embed(self, texts: Sequence[str], batch_size: int = 32) -> Array:
        """Unit-length embeddings, one row per text (batches of similar length: little padding)."""
        encoded = [self.tokenizer.encode(t) for t in texts]
        out = np.zeros((len(texts), self.width), dtype=np.float32)
        order = np.argsort([len(x) for x in encoded], kind="stable")
        for start in range(0, len(texts), batch_size):
            idx = order[start:start + batch_size]
            out[idx] = self._forward([encoded[i] for i in idx])
        return out


__all__ = ["MAX_TOKENS", "SentenceEncoder", "WordPieceTokenizer"]
