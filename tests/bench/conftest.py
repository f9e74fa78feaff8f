"""Fixtures for the experiment harness tests: a fake corpus (no tokenizer, no books) and a fake engine
that answers like ``server.offline.run_offline`` without starting vLLM."""

from __future__ import annotations

import array
import re

import pytest

from server.offline import Result


class FakeCorpus:
    """Characters as tokens; every book is the token ids 1000, 1001, ... (200k of them)."""

    bos = 1

    def __init__(self) -> None:
        self.passkey_prompts: dict[tuple, array.array] = {}

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def book_tokens(self, name: str) -> array.array:
        return array.array("i", range(1000, 201000))


class FakeEngine:
    """Records its calls and answers without vLLM: a passkey prompt gets its key back from the plain engine
    and the plugin, 0 from the others; prompt logprobs are made up from the token ids, shifted by 0.5 for
    the engines other than the plain one and the plugin. The first ``fail_times`` calls fail."""

    def __init__(self, fail_times: int = 0) -> None:
        self.calls: list[tuple] = []
        self.fail_times = fail_times

    def __call__(self, spec, batches, *, timeout):
        self.calls.append((spec, batches))
        if self.fail_times:
            self.fail_times -= 1
            raise RuntimeError("offline engine failed (exit -6):\nterminate called")
        shift = 0.0 if spec.hf_overrides is None or "dynamic" in str(spec.hf_overrides) else 0.5
        out = []
        for (request,) in batches:
            ids = request.prompt_token_ids
            prompt_lps = None
            if request.prompt_logprobs is not None:
                prompt_lps = [None] + [-(1.0 + shift + (t % 7) / 10) for t in ids[1:]]
            found = re.search(r"The pass key is (\d+)\.", "".join(map(chr, ids)))
            text = f" {found.group(1) if found and not shift else 0}. Done." if found else " ..."
            out.append([Result(token_ids=[1], text=text, logprobs=[], prompt_logprobs=prompt_lps,
                               num_prompt_tokens=len(ids), num_cached_tokens=0, seconds=0.01)])
        return out


@pytest.fixture
def fake_corpus() -> FakeCorpus:
    return FakeCorpus()
