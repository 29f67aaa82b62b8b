"""CPU stand-ins for model servers: no weights, latency from ``policies/profiles.py``.

A stand-in replica has ``slots`` concurrent sequences (a continuous-batching engine's batch). A
request with ``P`` prompt and ``O`` output tokens holds one slot for::

    hold = time_scale * slots * (O / out_tok_s + P / in_tok_s)

where ``out_tok_s`` / ``in_tok_s`` are the replica's decode / prefill throughputs from its
profile. So one replica serves ``1 / (time_scale * (O/out + P/in))`` requests/s — exactly the
profile's capacity (:meth:`Profile.tokens_per_s_capacity`), sped up by ``1 / time_scale`` so tests
run in seconds — and requests beyond ``slots`` wait in a FIFO queue, which is where latency under
overload comes from. Tokens are counted as whitespace-separated words (a stand-in has no tokenizer).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from policies.profiles import Profile


@dataclass(frozen=True)
class LatencyModel:
    name: str  # model name reported in responses
    out_tok_s: float
    in_tok_s: float
    slots: int
    time_scale: float = 1.0

    def hold_s(self, prompt_tokens: int, output_tokens: int) -> float:
        return self.time_scale * self.slots * (output_tokens / self.out_tok_s + prompt_tokens / self.in_tok_s)

    def requests_per_s(self, prompt_tokens: int, output_tokens: int) -> float:
        return self.slots / self.hold_s(prompt_tokens, output_tokens)


def latency_model(name: str, profile: Profile, slots: int, time_scale: float = 1.0) -> LatencyModel:
    return LatencyModel(name, profile.output_tokens_per_s, profile.input_tokens_per_s, slots, time_scale)


def count_tokens(text: str) -> int:
    return max(len(text.split()), 1)


class StandInEngine:
    """The queueing part of a stand-in replica (kept apart from Ray so it is testable alone)."""

    def __init__(self, model: LatencyModel) -> None:
        self.model = model
        self._slots = asyncio.Semaphore(model.slots)
        self.in_flight = 0

    async def generate(self, prompt: str, max_tokens: int) -> dict[str, object]:
        p = count_tokens(prompt)
        self.in_flight += 1
        try:
            async with self._slots:
                await asyncio.sleep(self.model.hold_s(p, max_tokens))
        finally:
            self.in_flight -= 1
        words = ("lorem ipsum dolor sit amet consectetur adipiscing elit sed do " * (max_tokens // 10 + 1)).split()
        return {"model": self.model.name, "text": " ".join(words[:max_tokens]), "prompt_tokens": p,
                "completion_tokens": max_tokens}
