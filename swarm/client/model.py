"""AutoDistributedModelForCausalLM: a transformers PreTrainedModel whose blocks run in the swarm.

The client holds the embeddings, final norm and LM head; everything between goes through servers.
``generate()`` is transformers' own: each call opens an inference session (a KV cache on every server of
the chain) unless one is already open with ``model.inference_session(...)``.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator, Sequence

import torch
from transformers import GenerationConfig, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from shards import Checkpoint, ClientModules
from swarm.client.inference_session import InferenceSession
from swarm.client.remote_sequential import remote_forward
from swarm.client.swarm_client import SwarmClient


class DistributedModelForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = PretrainedConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"

    def __init__(self, config: PretrainedConfig, client_modules: ClientModules, swarm: SwarmClient, *,
                 exact_wire: bool = False):
        super().__init__(config)
        self.model = client_modules
        self.swarm = swarm
        self.exact_wire = exact_wire
        self._session: InferenceSession | None = None

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def get_output_embeddings(self):
        return self.model.lm_head

    @contextlib.contextmanager
    def inference_session(self, *, max_length: int) -> Iterator[InferenceSession]:
        """Within this block, every forward call (and ``generate``) continues the same server-side sessions."""
        if self._session is not None:
            raise RuntimeError("an inference session is already open on this model")
        session = InferenceSession(self.swarm, max_length=max_length, exact=self.exact_wire)
        self._session = session
        try:
            yield session
        finally:
            self._session = None
            session.close()

    def generate(self, inputs: torch.Tensor | None = None, *args, **kwargs):
        if self._session is not None:
            return super().generate(inputs, *args, **kwargs)
        prompt = inputs if inputs is not None else kwargs.get("input_ids", kwargs.get("inputs_embeds"))
        config = kwargs.get("generation_config") or self.generation_config
        max_new_tokens = kwargs.get("max_new_tokens", config.max_new_tokens)
        if max_new_tokens is not None:
            max_length = (prompt.shape[1] if prompt is not None else 1) + max_new_tokens
        else:
            max_length = kwargs.get("max_length", config.max_length)
        with self.inference_session(max_length=max_length):
            return super().generate(inputs, *args, **kwargs)

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, cache=None, inputs_embeds: torch.Tensor | None = None,
                labels: torch.LongTensor | None = None, use_cache: bool | None = None,
                logits_to_keep: int = 0, **kwargs) -> CausalLMOutputWithPast:
        if inputs_embeds is None:
            inputs_embeds = self.model.embed(input_ids)
        if self._session is not None and use_cache is not False:
            hidden = self._session.step(inputs_embeds, attention_mask=attention_mask, position_ids=position_ids)
        else:
            hidden = remote_forward(self.swarm, inputs_embeds, attention_mask=attention_mask,
                                    position_ids=position_ids, exact=self.exact_wire)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.model.logits(hidden)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache)

    def settle(self) -> None:
        """Send every priced server a voucher for all work counted so far (generate() does it by itself)."""
        from swarm.client import loop
        loop.run(self.swarm.settle())

    def shutdown(self) -> None:
        self.settle()
        self.swarm.shutdown()


class AutoDistributedModelForCausalLM:
    """Like transformers' AutoModelForCausalLM, for a model whose blocks are served by a swarm."""

    @classmethod
    def from_pretrained(cls, model: str | os.PathLike, *, initial_peers: Sequence[str], model_id: str | None = None,
                        dtype: str | torch.dtype = "auto", device: str | None = None, exact_wire: bool = False,
                        request_timeout: float = 60.0, wallet=None, contract: str | None = None,
                        chain_id: int | None = None, spot_check_rate: float = 0.0, spot_check_seed: int | None = None,
                        **hub_kwargs) -> DistributedModelForCausalLM:
        """Load only the embeddings, final norm and LM head of ``model``; find its blocks in the swarm.

        ``exact_wire=True`` keeps float32 activations in float32 on the wire (default: 16-bit).
        ``wallet`` (an eth_account LocalAccount), ``contract`` and ``chain_id``: pay priced servers with
        vouchers redeemable from this client's escrow in that settlement contract.
        ``spot_check_rate``: the fraction of inference steps re-run on other servers holding the same blocks
        (e.g. 0.05); a server found wrong is banned, unpaid, and the evidence is published in the DHT.
        """
        checkpoint = Checkpoint(model, **hub_kwargs)
        client_modules = ClientModules.from_pretrained(checkpoint, dtype=dtype, device=device)
        swarm = SwarmClient(initial_peers, model_id or checkpoint.model_id, checkpoint.config.num_hidden_layers,
                            request_timeout=request_timeout)
        if wallet is not None:
            from incentives.vouchers import Domain
            from swarm.client.payments import Payments
            if contract is None or chain_id is None:
                raise ValueError("paying servers needs the settlement contract address and its chain id")
            swarm.payments = Payments(wallet, Domain(chain_id, contract))
        if spot_check_rate > 0:
            from swarm.client.spot_check import SpotChecker
            swarm.spot_checker = SpotChecker(swarm, spot_check_rate, spot_check_seed)
        distributed = DistributedModelForCausalLM(checkpoint.config, client_modules, swarm, exact_wire=exact_wire)
        try:
            distributed.generation_config = GenerationConfig.from_pretrained(checkpoint._file("config.json").parent)
        except OSError:
            pass  # no generation_config.json: keep the one derived from config.json
        return distributed.eval()
