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


class RepetitionPenalties(LogitsProcessor):
    """OpenAI's frequency and presence penalties over the tokens generated so far (not the prompt's): a token's
    logit goes down by ``frequency`` times its count, and by ``presence`` once it has appeared at all."""

    def __init__(self, prompt_length: int, frequency: float, presence: float):
        self.prompt_length, self.frequency, self.presence = prompt_length, frequency, presence

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        generated = input_ids[:, self.prompt_length:]
        if generated.shape[1] == 0:
            return scores
        counts = torch.zeros_like(scores).scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
        return scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)


def sampling_processors(temperature: float, top_p: float, seed: int | None, prompt_length: int = 0,
                        frequency_penalty: float = 0.0, presence_penalty: float = 0.0) -> LogitsProcessorList | None:
    """Logits processors that turn greedy search into sampling at ``temperature`` and ``top_p`` with ``seed``
    (temperature 0: greedy), after the frequency and presence penalties; None when there is nothing to do."""
    processors = []
    if frequency_penalty or presence_penalty:
        processors.append(RepetitionPenalties(prompt_length, frequency_penalty, presence_penalty))
    if temperature > 0:
        processors.append(TemperatureLogitsWarper(temperature))
        if top_p < 1.0:
            processors.append(TopPLogitsWarper(top_p))
        processors.append(GumbelSampler(seed))
    return LogitsProcessorList(processors) if processors else None
