"""AutoDistributedModelForCausalLM: a transformers PreTrainedModel whose blocks run in the swarm.

The client holds the embeddings, final norm and LM head; everything between goes through servers.
``generate()`` is transformers' own: each call opens an inference session (a KV cache on every server of
the chain) unless one is already open with ``model.inference_session(...)``.
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading
from typing import Iterator, Sequence

_INDUCTOR_DIR = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
import torch
from transformers import GenerationConfig, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from shards import Checkpoint, ClientModules
from swarm.client import loop
from swarm.client.config import ClientConfig
from swarm.client.inference_session import InferenceSession
from swarm.client.remote_sequential import remote_forward
from swarm.client.swarm_client import SwarmClient
from swarm.wire.payloads import LoraSpec

logger = logging.getLogger(__name__)
if _INDUCTOR_DIR is None:  # torch._dynamo, which transformers' generation imports, exports its default cache path
    os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)  # as computed again when needed: importing changes nothing


class DistributedModelForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = PretrainedConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"

    def __init__(self, config: PretrainedConfig, client_modules: ClientModules, swarm: SwarmClient, *,
                 exact_wire: bool = False, tuning_mode: str | None = None, pre_seq_len: int = 0,
                 lora_config=None):
        super().__init__(config)
        self.model = client_modules
        self.swarm = swarm
        self.exact_wire = exact_wire
        self._sessions = threading.local()  # one open session per thread: many threads generate at once
        if tuning_mode not in (None, "ptune", "deep_ptune", "lora"):
            raise ValueError(f"tuning_mode must be None, 'ptune', 'deep_ptune' or 'lora', not {tuning_mode!r}")
        self.lora_spec = None
        if tuning_mode == "lora":
            self._init_lora(lora_config)
            tuning_mode = None  # no prompts
        if tuning_mode and pre_seq_len < 1:
            raise ValueError("prompt tuning needs pre_seq_len >= 1 trainable prefix tokens")
        self.tuning_mode, self.pre_seq_len = tuning_mode, pre_seq_len if tuning_mode else 0
        if tuning_mode:  # trainable prefix before the input embeddings (shallow), and one per block (deep)
            hidden = config.hidden_size
            self.prompt_embeddings = torch.nn.Embedding(pre_seq_len, hidden)
            torch.nn.init.normal_(self.prompt_embeddings.weight, std=client_modules.embed_tokens.weight.std().item())
            if tuning_mode == "deep_ptune":
                self.intermediate_prompt_embeddings = torch.nn.Embedding(pre_seq_len, config.num_hidden_layers * hidden)
                torch.nn.init.zeros_(self.intermediate_prompt_embeddings.weight)

    @property
    def _session(self) -> InferenceSession | None:
        return getattr(self._sessions, "current", None)

    @_session.setter
    def _session(self, session: InferenceSession | None) -> None:
        self._sessions.current = session

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
        if self._session is not None:  # continue it: generate() feeds only what the servers have not seen
            kwargs.setdefault("cache", SessionCache(self._session, self.pre_seq_len))
            ids = inputs if inputs is not None else kwargs.get("input_ids")
            if ids is not None and kwargs.get("attention_mask") is None:  # (transformers slices only with a mask)
                kwargs["attention_mask"] = torch.ones_like(ids)
            return super().generate(inputs, *args, **kwargs)
        prompt = inputs if inputs is not None else kwargs.get("input_ids", kwargs.get("inputs_embeds"))
        config = kwargs.get("generation_config") or self.generation_config
        max_new_tokens = kwargs.get("max_new_tokens", config.max_new_tokens)
        if max_new_tokens is not None:
            max_length = (prompt.shape[1] if prompt is not None else 1) + max_new_tokens
        else:
            max_length = kwargs.get("max_length", config.max_length)
        # prompt lookup may verify drafted tokens past max_length (transformers then keeps only those within it)
        drafts = kwargs.get("prompt_lookup_num_tokens", config.prompt_lookup_num_tokens) or 0
        with self.inference_session(max_length=max_length + drafts + self.pre_seq_len):
            return self.generate(inputs, *args, **kwargs)

    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, next_sequence_length: int | None = None,
                                      cache=None, **kwargs):
        # a generate() that continues a session feeds only what the servers have not seen (assisted generation's
        # first step would send the whole sequence again)
        if isinstance(cache, SessionCache) and next_sequence_length is None and (past := cache.get_seq_length()):
            next_sequence_length = input_ids.shape[1] - past
        return super().prepare_inputs_for_generation(input_ids, next_sequence_length, cache, **kwargs)

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, cache=None, inputs_embeds: torch.Tensor | None = None,
                labels: torch.LongTensor | None = None, use_cache: bool | None = None,
                logits_to_keep: int = 0, **kwargs) -> CausalLMOutputWithPast:
        if inputs_embeds is None:
            inputs_embeds = self.model.embed(input_ids)
        in_session = self._session is not None and use_cache is not False
        inputs_embeds, attention_mask, position_ids, prefix = self._add_prompts(
            inputs_embeds, attention_mask, position_ids, first=not in_session or self._session.position == 0)
        inputs_embeds = self.model.scale_inputs(inputs_embeds)  # (Granite multiplies them)
        lora = self.lora_weights if self.lora_spec else None
        prompts = self._deep_prompts(inputs_embeds.shape[0])
        if in_session:  # deep prompts and LoRA weights go to the servers when the session opens
            hidden = self._session.step(inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                                        block_inputs={"prompts": prompts, "lora": lora}, lora_spec=self.lora_spec)
        else:
            hidden = remote_forward(self.swarm, inputs_embeds, attention_mask=attention_mask,
                                    position_ids=position_ids, exact=self.exact_wire, prompts=prompts, lora=lora,
                                    lora_spec=self.lora_spec)
        hidden = hidden[:, prefix:]
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.model.logits(hidden)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache)

    def _reorder_cache(self, cache, beam_idx: torch.LongTensor):
        """Beam search: the servers' KV caches follow the surviving beams (with the next step)."""
        if self._session is not None:
            self._session.reorder(beam_idx)
        return cache

    def _init_lora(self, lora_config) -> None:
        """Client-owned LoRA weights for every remote block (peft's LoraConfig: r, lora_alpha, target_modules),
        one row per block in the layout of shards.lora: A initialised as peft does, B zeros."""
        import math

        from shards.lora import check_lora_config, lora_scale, model_lora_layout
        if lora_config is None:
            raise ValueError("tuning_mode='lora' needs lora_config=peft.LoraConfig(r=..., target_modules=[...])")
        check_lora_config(lora_config.to_dict(), "lora_config")
        if lora_config.lora_dropout:
            logger.warning(f"lora_dropout={lora_config.lora_dropout} is ignored: servers apply LoRA without dropout")
        targets = sorted(lora_config.target_modules)
        layout = model_lora_layout(self.config, targets)
        rank = lora_config.r
        rows = []
        for _ in range(self.config.num_hidden_layers):
            for _, in_features, out_features in layout:
                a = torch.empty(rank, in_features)
                torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5))
                rows += [a.flatten(), torch.zeros(out_features * rank)]
        self.lora_weights = torch.nn.Parameter(torch.cat(rows).view(self.config.num_hidden_layers, -1))
        self.lora_layout = layout
        # servers scale by alpha / rank: rsLoRA's scale is sent as the alpha that gives it
        alpha = lora_scale(lora_config.lora_alpha, rank, lora_config.use_rslora) * rank
        self.lora_spec = LoraSpec(targets, rank, float(alpha))
        self.peft_config = lora_config

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> None:
        """With tuning_mode="lora": write the trained adapter as a standard peft adapter directory
        (adapter_config.json + adapter_model.safetensors), which ``PeftModel.from_pretrained`` and
        ``cocoon serve --adapters`` load. The blocks themselves stay on the servers."""
        if self.lora_spec is None:
            raise NotImplementedError("save_pretrained writes a LoRA adapter (tuning_mode='lora'); for prompts, "
                                      "torch.save(model.prompt_embeddings.state_dict(), path)")
        import copy

        from safetensors.torch import save_file

        from shards.lora import ADAPTER_WEIGHTS, peft_state_dict
        os.makedirs(save_directory, exist_ok=True)
        config = copy.deepcopy(self.peft_config)
        config.base_model_name_or_path = self.config._name_or_path
        config.save_pretrained(save_directory)
        state = peft_state_dict(self.lora_weights, self.lora_layout, self.lora_spec.rank)
        save_file(state, os.path.join(save_directory, ADAPTER_WEIGHTS), metadata={"format": "pt"})

    def _add_prompts(self, embeds, attention_mask, position_ids, first: bool):
        """Prepend the trainable prefix (on the first call of a sequence) and shift masks and positions."""
        if not self.tuning_mode:
            return embeds, attention_mask, position_ids, 0
        batch, prefix = embeds.shape[0], self.pre_seq_len
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask.new_ones(batch, prefix), attention_mask], dim=1)
        if position_ids is not None:
            position_ids = position_ids + prefix
        if not first:
            return embeds, attention_mask, position_ids, 0
        prompts = self.prompt_embeddings.weight.to(embeds.dtype).unsqueeze(0).expand(batch, -1, -1)
        if position_ids is not None:
            position_ids = torch.cat([torch.arange(prefix, device=position_ids.device).expand(batch, -1),
                                      position_ids], dim=1)
        return torch.cat([prompts, embeds], dim=1), attention_mask, position_ids, prefix

    def _deep_prompts(self, batch: int) -> torch.Tensor | None:
        """[num_blocks, batch, prefix, hidden]: what each block adds to the prefix positions."""
        if self.tuning_mode != "deep_ptune":
            return None
        weight = self.intermediate_prompt_embeddings.weight
        per_block = weight.view(self.pre_seq_len, self.config.num_hidden_layers, -1).permute(1, 0, 2)
        return per_block.unsqueeze(1).expand(-1, batch, -1, -1)

    def settle(self) -> None:
        """Send every priced server a voucher for all work counted so far (generate() does it by itself)."""
        loop.run(self.swarm.settle())

    def shutdown(self) -> None:
        self.settle()
        self.swarm.shutdown()


class SessionCache(DynamicCache):
    """What transformers' generate() sees of an inference session: its length, so that a generate() in an open
    session (the next turn of a chat) feeds only the new tokens. The keys and values are on the servers."""

    def __init__(self, session: InferenceSession, prefix: int = 0):
        super().__init__()
        self.session, self.prefix = session, prefix

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return max(self.session.position - self.prefix, 0)  # the trained prompt prefix is not in input_ids

    @property
    def is_linear(self) -> list[bool]:  # attention layers, not state-space ones: inputs are sliced by length
        return [False]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.session.reorder(beam_idx)

    def crop(self, tokens_to_remove: int) -> None:
        """Speculative decoding gives up the drafted tokens the model did not accept: the servers' caches go back
        with the next step. A negative count removes that many tokens; a positive one is the length to keep
        (the older form of this call)."""
        if tokens_to_remove > 0:
            self.session.rollback(self.prefix + tokens_to_remove)
        elif tokens_to_remove < 0:
            self.session.rollback(self.session.position + tokens_to_remove)


class AutoDistributedModelForCausalLM:
    """Like transformers' AutoModelForCausalLM, for a model whose blocks are served by a swarm."""

    @classmethod
    def from_pretrained(cls, model: str | os.PathLike, *, initial_peers: Sequence[str], model_id: str | None = None,
                        dtype: str | torch.dtype = "auto", device: str | None = None, exact_wire: bool = False,
                        request_timeout: float = 60.0, wallet=None, contract: str | None = None,
                        chain_id: int | None = None, chain_rpc: str | None = None, spot_check_rate: float = 0.0,
                        spot_check_seed: int | None = None, spot_check_local: bool | None = None,
                        tuning_mode: str | None = None, pre_seq_len: int = 0, lora_config=None,
                        active_adapter: str | None = None, push: bool = True, wire_codec: str | None = None,
                        **hub_kwargs) -> DistributedModelForCausalLM:
        """Load only the embeddings, final norm and LM head of ``model``; find its blocks in the swarm.

        ``exact_wire=True`` keeps float32 activations in float32 on the wire (default: 16-bit).
        ``wallet`` (an eth_account LocalAccount), ``contract`` and ``chain_id``: pay priced servers with
        vouchers redeemable from this client's escrow in that settlement contract.
        ``chain_rpc``: a node of that chain, to read servers' stakes (spot checks weight checkers by stake).
        ``spot_check_rate``: the fraction of inference steps re-run (e.g. 0.05): on this client's CPU when it
        has its own copy of the blocks (``spot_check_local``; default: when the checkpoint's block files are on
        this machine), in float32 and in the server's dtype, which sets the tolerance for exactly those inputs;
        otherwise on other servers holding the same blocks, where a disagreement takes three independent
        checkers to settle. A server proven wrong is banned, unpaid, and the evidence is published in the DHT.
        ``tuning_mode``: "ptune" (a trainable prefix of ``pre_seq_len`` embeddings) or "deep_ptune" (plus a
        trainable prefix added before every remote block) or "lora" (client-owned LoRA weights for every
        block, from ``lora_config``, a peft LoraConfig); the blocks stay frozen on the servers.
        ``active_adapter``: the name of a LoRA adapter the servers serve (``cocoon serve --adapters``); only
        servers holding it are used.
        ``push``: each server of an inference chain sends its output straight to the next one (a token crosses
        the network k + 1 times over k servers instead of 2k); the client still checks every server's output.
        ``wire_codec="int8"``: prompts, forwards and backwards of 16 tokens or more cross every hop in 8-bit rows
        (about half the bytes of 16 bits; swarm.wire.int8_rows), for upload-bound links. Decode steps stay 16-bit.
        """
        if active_adapter is not None and tuning_mode == "lora":
            raise ValueError("use either a served adapter (active_adapter) or train your own (tuning_mode='lora')")
        config = ClientConfig(initial_peers=initial_peers, request_timeout=request_timeout,
                              active_adapter=active_adapter, push=push, wallet=wallet, contract=contract,
                              chain_id=chain_id, chain_rpc=chain_rpc, spot_check_rate=spot_check_rate,
                              spot_check_seed=spot_check_seed, spot_check_local=spot_check_local,
                              wire_codec=wire_codec)
        checkpoint = Checkpoint(model, **hub_kwargs)
        client_modules = ClientModules.from_pretrained(checkpoint, dtype=dtype, device=device)
        local_blocks = None
        if spot_check_rate > 0 and spot_check_local is not False:
            from swarm.client.evidence import LocalBlocks
            if spot_check_local and checkpoint.local_dir is None:
                raise ValueError("spot_check_local=True needs the checkpoint's block files on this machine")
            local_blocks = LocalBlocks(checkpoint)
        swarm = SwarmClient(config, model_id or checkpoint.model_id, checkpoint.config.num_hidden_layers,
                            local_blocks=local_blocks)
        distributed = DistributedModelForCausalLM(checkpoint.config, client_modules, swarm, exact_wire=exact_wire,
                                                  tuning_mode=tuning_mode, pre_seq_len=pre_seq_len,
                                                  lora_config=lora_config)
        try:
            distributed.generation_config = GenerationConfig.from_pretrained(checkpoint.file("config.json").parent)
        except OSError:
            pass  # no generation_config.json: keep the one derived from config.json
        return distributed.eval()
