"""AutoDistributedModelForSequenceClassification: transformers' sequence-classification head on a client,
the blocks in the swarm. The score head and its pooling (the last non-padding token) are transformers'."""
from __future__ import annotations

import os
from typing import Sequence

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutputWithPast

from shards import Checkpoint, ClientModules
from swarm.client.remote_sequential import remote_forward
from swarm.client.config import ClientConfig
from swarm.client.swarm_client import SwarmClient


class DistributedModelForSequenceClassification(PreTrainedModel):
    config_class = PretrainedConfig
    base_model_prefix = "model"

    def __init__(self, config: PretrainedConfig, client_modules: ClientModules, score: nn.Linear,
                 swarm: SwarmClient, *, exact_wire: bool = False):
        super().__init__(config)
        self.model, self.score, self.swarm, self.exact_wire = client_modules, score, swarm, exact_wire
        self.num_labels = score.out_features

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, inputs_embeds: torch.Tensor | None = None,
                labels: torch.LongTensor | None = None, **kwargs) -> SequenceClassifierOutputWithPast:
        if inputs_embeds is None:
            inputs_embeds = self.model.embed(input_ids)
        hidden = remote_forward(self.swarm, self.model.scale_inputs(inputs_embeds), attention_mask=attention_mask, position_ids=position_ids,
                                exact=self.exact_wire)
        logits = self.score(self.model.norm(hidden))
        batch = logits.shape[0]
        pad = self.config.pad_token_id
        if pad is None or input_ids is None:
            last = torch.full((batch,), -1, device=logits.device)
        else:  # the rightmost non-padding token, for left and right padding alike (as transformers)
            positions = torch.arange(input_ids.shape[-1], device=logits.device)
            last = (positions * (input_ids != pad).to(logits.device, torch.int32)).argmax(-1)
        pooled = logits[torch.arange(batch, device=logits.device), last]
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, pooled_logits=pooled, config=self.config)
        return SequenceClassifierOutputWithPast(loss=loss, logits=pooled)

    def shutdown(self) -> None:
        self.swarm.shutdown()


class AutoDistributedModelForSequenceClassification:
    @classmethod
    def from_pretrained(cls, model: str | os.PathLike, *, initial_peers: Sequence[str], model_id: str | None = None,
                        num_labels: int | None = None, dtype: str | torch.dtype = "auto", device: str | None = None,
                        exact_wire: bool = False, request_timeout: float = 60.0,
                        **hub_kwargs) -> DistributedModelForSequenceClassification:
        """The checkpoint's `score` head if it has one (a sequence-classification checkpoint), else a new
        one with ``num_labels`` outputs, initialised as transformers does, to be trained."""
        checkpoint = Checkpoint(model, **hub_kwargs)
        config = checkpoint.config
        if num_labels is not None:
            config.num_labels = num_labels
        client_modules = ClientModules.from_pretrained(checkpoint, dtype=dtype, device=device)
        score = nn.Linear(config.hidden_size, config.num_labels, bias=False)
        if checkpoint.has("score.weight"):
            score.weight = nn.Parameter(checkpoint.load(["score.weight"])["score.weight"].float())
        else:
            nn.init.normal_(score.weight, std=getattr(config, "initializer_range", 0.02))
        score = score.to(device=client_modules.embed_tokens.weight.device, dtype=client_modules.embed_tokens.weight.dtype)
        swarm = SwarmClient(ClientConfig(initial_peers=initial_peers, request_timeout=request_timeout),
                            model_id or checkpoint.model_id, config.num_hidden_layers)
        return DistributedModelForSequenceClassification(config, client_modules, score, swarm,
                                                         exact_wire=exact_wire).eval()
