"""`cocoon generate` and `cocoon chat`, and the client flags they share with `cocoon api`: where the swarm is,
how to run the client, and how to pay (a keystore, the contract, the chain, the spot-check rate)."""
from __future__ import annotations

import argparse
import sys
from typing import Iterable

from swarm.server.config import maddr_arg, positive_int_arg


def add_client_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="checkpoint directory, hub cache directory or hub repo id")
    parser.add_argument("--initial-peers", nargs="+", required=True, metavar="MADDR", type=maddr_arg)
    parser.add_argument("--model-id", default=None, help="override the id derived from the checkpoint")
    parser.add_argument("--revision", default=None, help="with a hub repo id: its branch, tag or commit")
    parser.add_argument("--token", default=None, help="a Hugging Face token for gated or private repos (default: "
                                                      "$HF_TOKEN, or what `hf auth login` saved)")
    parser.add_argument("--adapter", default=None, help="a LoRA adapter the servers serve (see serve --adapters)")
    parser.add_argument("--request-timeout", type=float, default=60.0, help="seconds before a silent server is replaced")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="the client's embeddings and head (auto: bfloat16 on CUDA, float32 on a CPU)")
    parser.add_argument("--device", default=None, help="cpu, cuda ... (default: cuda if available)")
    parser.add_argument("--exact-wire", action="store_true", help="float32 activations on the wire")
    parser.add_argument("--no-push", dest="push", action="store_false",
                        help="servers send their outputs back to the client only, not on to the next server")
    fast = parser.add_argument_group("speculative decoding (several tokens per trip through the swarm)")
    how = fast.add_mutually_exclusive_group()
    how.add_argument("--draft", metavar="MODEL", help="a small local checkpoint that shares the model's tokenizer: it "
                                                     "drafts tokens, the swarm verifies them in one pass")
    how.add_argument("--prompt-lookup", metavar="N", type=positive_int_arg, help="draft N tokens by copying from the prompt "
                                                                    "(answers that quote or edit their input)")
    pay = parser.add_argument_group("paying priced servers")
    pay.add_argument("--wallet", metavar="KEYSTORE", help="the client's keystore (passphrase: $COCOON_PASSPHRASE)")
    pay.add_argument("--contract", help="settlement contract address")
    pay.add_argument("--chain-id", type=int, help="the chain's id (or give --chain-rpc)")
    pay.add_argument("--chain-rpc", help="a node of the chain: its id, and servers' stakes for spot checks")
    pay.add_argument("--spot-check-rate", type=float, default=0.0, help="fraction of steps re-run elsewhere")


def load_client(args):
    """(model, tokenizer) as the client flags say."""
    from transformers import AutoTokenizer

    from swarm.client.model import AutoDistributedModelForCausalLM
    payment = {}
    if args.wallet:
        from incentives.wallet import load_wallet
        from swarm.apps.cli_chain import passphrase
        if not args.contract or not (args.chain_id or args.chain_rpc):
            raise argparse.ArgumentTypeError("--wallet needs --contract and --chain-id or --chain-rpc")
        chain_id = args.chain_id
        if chain_id is None:
            from web3 import Web3
            chain_id = Web3(Web3.HTTPProvider(args.chain_rpc, request_kwargs={"timeout": 10})).eth.chain_id
        payment = dict(wallet=load_wallet(args.wallet, passphrase()), contract=args.contract, chain_id=chain_id,
                       chain_rpc=args.chain_rpc)
    model = AutoDistributedModelForCausalLM.from_pretrained(
        args.model, initial_peers=args.initial_peers, model_id=args.model_id, request_timeout=args.request_timeout,
        active_adapter=args.adapter, dtype=args.dtype, device=args.device, exact_wire=args.exact_wire,
        spot_check_rate=args.spot_check_rate, push=args.push, revision=args.revision, token=args.token, **payment)
    return model, AutoTokenizer.from_pretrained(args.model, revision=args.revision, token=args.token)


def load_speculation(args, model) -> dict:
    """generate()'s arguments for speculative decoding as --draft or --prompt-lookup say: transformers' assisted
    generation, each verify step one pass through the swarm."""
    if args.prompt_lookup is not None:
        return dict(prompt_lookup_num_tokens=args.prompt_lookup)
    if args.draft is None:
        return {}
    from transformers import AutoModelForCausalLM
    draft = AutoModelForCausalLM.from_pretrained(args.draft, dtype=model.dtype).to(model.device).eval()
    if draft.config.vocab_size != model.config.vocab_size:
        raise argparse.ArgumentTypeError(f"--draft {args.draft} has a vocabulary of {draft.config.vocab_size} tokens, "
                                         f"the model {model.config.vocab_size}: a draft must share the tokenizer")
    return dict(assistant_model=draft)


def sampling(args) -> dict:
    if args.temperature > 0:
        return dict(do_sample=True, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    return dict(do_sample=False)


def chat_ids(tokenizer, messages: list[dict]):
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                         return_dict=True)["input_ids"]


def run_generate(args) -> int:
    from transformers import TextStreamer

    from swarm.processes import interrupts_raise
    model, tokenizer = load_client(args)
    speculation = load_speculation(args, model)
    if tokenizer.chat_template is not None and not args.raw:
        input_ids = chat_ids(tokenizer, [{"role": "user", "content": args.prompt}])
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    else:
        input_ids = tokenizer(args.prompt, return_tensors="pt").input_ids
        streamer = TextStreamer(tokenizer)
    interrupts_raise()  # Ctrl-C stops generating, and the servers are still paid
    try:
        model.generate(input_ids.to(model.device), max_new_tokens=args.max_new_tokens, streamer=streamer,
                       **sampling(args), **speculation)
    except BaseException:
        print(flush=True)  # the streamer's line ends here when generation failed
        raise
    finally:
        model.shutdown()
    return 0


def run_chat(args) -> int:
    """A conversation that keeps one inference session, so each turn sends only its new tokens (the servers
    hold the rest in their KV caches); a server failing mid-answer is replaced by replaying the history."""
    from transformers import TextStreamer

    from swarm.processes import interrupts_raise
    model, tokenizer = load_client(args)
    if tokenizer.chat_template is None:
        raise ValueError(f"{args.model} has no chat template: use `cocoon generate --raw` for plain text")
    interactive = sys.stdin.isatty()
    messages = [{"role": "system", "content": args.system}] if args.system else []
    interrupts_raise()
    try:
        for _ in chat(model, tokenizer, messages, _lines(interactive), args,
                      TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True),
                      load_speculation(args, model)):
            pass  # the streamer printed the answer
    except KeyboardInterrupt:
        print(flush=True)
    finally:
        model.shutdown()
    return 0


def chat(model, tokenizer, messages: list[dict], turns: Iterable[str], args, streamer=None,
         speculation: dict | None = None):
    """Answer each user turn in one inference session; yields the answers."""
    import contextlib
    with contextlib.ExitStack() as stack:
        session = stack.enter_context(model.inference_session(max_length=args.max_length))
        fed: list[int] = []  # the tokens the servers have seen, in this session
        for text in turns:
            messages.append({"role": "user", "content": text})
            input_ids = chat_ids(tokenizer, messages).to(model.device)
            if input_ids[0, :len(fed)].tolist() != fed:  # the template renders the past otherwise: start over
                stack.close()
                session = stack.enter_context(model.inference_session(max_length=args.max_length))
            output = model.generate(input_ids, max_new_tokens=args.max_new_tokens, streamer=streamer,
                                    **sampling(args), **(speculation or {}))
            fed = output[0, :session.position].tolist()
            reply = tokenizer.decode(output[0, input_ids.shape[1]:], skip_special_tokens=True)
            messages.append({"role": "assistant", "content": reply})
            yield reply


def _lines(interactive: bool):
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            return
        if line.strip():
            yield line.strip()


def add_parsers(commands) -> None:
    generate = commands.add_parser("generate", help="generate text through the swarm, streaming it")
    add_client_arguments(generate)
    generate.add_argument("prompt")
    generate.add_argument("--raw", action="store_true", help="send the prompt as is, not in the chat template")
    _sampling_arguments(generate, max_new_tokens=32)

    chat = commands.add_parser("chat", help="chat through the swarm: one line a turn on standard input")
    add_client_arguments(chat)
    chat.add_argument("--system", default=None, help="a system prompt")
    chat.add_argument("--max-length", type=int, default=2048, help="tokens of the whole conversation")
    _sampling_arguments(chat, max_new_tokens=256)
    add_api_parser(commands)


def add_api_parser(commands) -> None:
    api = commands.add_parser("api", help="an OpenAI-compatible HTTP API in front of the swarm (needs cocoon[api])")
    add_client_arguments(api)
    api.add_argument("--host", default="127.0.0.1")
    api.add_argument("--port", type=int, default=8000)
    api.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` (also $COCOON_API_KEY)")
    api.add_argument("--served-model-name", default=None, help="the model's name in the API (default: the "
                                                                    "checkpoint's directory name or repo id)")
    api.add_argument("--timeout", type=float, default=300.0, help="seconds before a request gets 504")
    api.add_argument("--max-concurrent", type=positive_int_arg, default=16,
                     help="requests generating at once (more wait)")
    api.add_argument("--max-per-caller", type=positive_int_arg, default=None,
                     help="requests one IP address may have generating at once (default: a quarter of "
                          "--max-concurrent); its others wait for its share")
    api.add_argument("--max-length", type=positive_int_arg, default=4096,
                     help="prompt + completion tokens, at most (the servers' --max-length; default 4096)")
    api.add_argument("--max-request-kb", type=positive_int_arg, default=1024, help="the largest request body")


def run_api(args) -> int:
    import os
    from pathlib import Path

    from swarm.apps.http import require_api_extras, serve_app
    require_api_extras("cocoon api")
    from swarm.apps.api import create_app
    model, tokenizer = load_client(args)
    name = args.served_model_name or (Path(args.model).name if Path(args.model).exists() else args.model)
    app = create_app(model, tokenizer, name, api_key=args.api_key or os.environ.get("COCOON_API_KEY"),
                     timeout=args.timeout, max_concurrent=args.max_concurrent,
                     speculation=load_speculation(args, model), max_length=args.max_length,
                     max_request_bytes=args.max_request_kb * 1024, max_per_caller=args.max_per_caller)
    try:
        serve_app(app, args.host, args.port, lambda url: f"API ready: {url}/v1 serving {name!r} (OpenAI-compatible)")
    finally:
        model.shutdown()
    return 0


def _sampling_arguments(parser, max_new_tokens: int) -> None:
    parser.add_argument("--max-new-tokens", type=positive_int_arg, default=max_new_tokens)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)

