"""Cross-attention reuse (prompt-to-prompt, Hertz et al.) for HiFi Tuner's subject replacement (alg. 3).

`AttentionReuse` wraps the score function of every cross-attention layer of a UNet: while `recording(i)` it keeps
step i's attention probabilities a_t^{r*} (source caption c^r); while `reusing(i)` the probabilities of the new
caption are replaced by the recorded ones for every key token except `fresh` (the new subject word w_g and the
subject embedding rows c_s^t), whose columns keep the new process's weights (F~ of alg. 3). The new caption's
tokens map to the source's through `source_index` (they shift when the two words have different token counts).
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial
from typing import Iterator

import torch


def word_span(ids: list[int], word_ids: list[int]) -> tuple[int, int]:
    """[start, end) of the first occurrence of `word_ids` in `ids`; ValueError when it does not occur."""
    for start in range(len(ids) - len(word_ids) + 1):
        if ids[start:start + len(word_ids)] == word_ids:
            return start, start + len(word_ids)
    raise ValueError("word not in caption")


def source_index(length: int, span_g: tuple[int, int], span_r: tuple[int, int]) -> torch.Tensor:
    """For each token position of the new caption, the position of the source caption whose attention it reuses:
    the same before the word, shifted by the difference of the words' token counts after it."""
    shift = (span_r[1] - span_r[0]) - (span_g[1] - span_g[0])
    index = torch.arange(length)
    index[span_g[1]:] += shift
    index[span_g[0]:span_g[1]] = span_r[0]  # fresh columns: never read
    return index.clamp(0, length - 1)


class AttentionReuse:
    def __init__(self, unet: torch.nn.Module, fresh: torch.Tensor, index: torch.Tensor):
        from diffusers.models.attention_processor import AttnProcessor

        self.fresh, self.index = fresh, index  # fresh: (L,) bool over key tokens
        self.maps: dict[tuple[int, str], torch.Tensor] = {}
        self.mode, self.step = None, 0
        # The plain processor computes probabilities through `get_attention_scores`, which is what is wrapped.
        unet.set_attn_processor(AttnProcessor())
        for name, module in unet.named_modules():
            if name.endswith("attn2"):
                module.get_attention_scores = partial(self._scores, name, module.get_attention_scores)

    def _scores(self, name: str, original, query, key, attention_mask=None):
        probs = original(query, key, attention_mask)
        if self.mode == "record":
            self.maps[(self.step, name)] = probs.detach()
        elif self.mode == "reuse":
            stored = self.maps[(self.step, name)][..., self.index.to(probs.device)]
            probs = torch.where(self.fresh.to(probs.device), probs, stored)
        return probs

    @contextmanager
    def _mode(self, mode: str, step: int) -> Iterator[None]:
        self.mode, self.step = mode, step
        try:
            yield
        finally:
            self.mode = None

    def recording(self, step: int):
        return partial(self._mode, "record", step)

    def reusing(self, step: int):
        return partial(self._mode, "reuse", step)
