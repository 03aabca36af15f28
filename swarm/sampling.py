"""Sampling that is reproducible per request and safe when many requests generate at once.

transformers' sampling draws from torch's global random generator, which concurrent requests share, so a
`seed` would mean nothing. Here a request's own generator adds Gumbel noise to the (temperature and top-p
processed) log-probabilities and greedy search picks the maximum: that is a draw from the same distribution
(the Gumbel-max trick), decided by the request's seed alone.
"""
from __future__ import annotations

import torch
from transformers import LogitsProcessor, LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper


class GumbelSampler(LogitsProcessor):
    def __init__(self, seed: int | None):
        self.generator = torch.Generator()
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        logprobs = torch.log_softmax(scores.float(), dim=-1)
        uniform = torch.rand(logprobs.shape, generator=self.generator).clamp_(1e-20, 1.0).to(logprobs.device)
        return logprobs - torch.log(-torch.log(uniform))


def sampling_processors(temperature: float, top_p: float, seed: int | None) -> LogitsProcessorList | None:
    """Logits processors that turn greedy search into sampling at ``temperature`` and ``top_p`` with ``seed``;
    None for greedy decoding (temperature 0)."""
    if temperature <= 0:
        return None
    processors = [TemperatureLogitsWarper(temperature)]
    if top_p < 1.0:
        processors.append(TopPLogitsWarper(top_p))
    return LogitsProcessorList([*processors, GumbelSampler(seed)])
