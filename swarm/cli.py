"""The ``cocoon`` command: dht, serve, generate, status, demo."""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path


class UsageError(Exception):
    """The command line asks for something impossible: exit code 2, as argparse's own errors."""


def blocks_arg(text: str) -> tuple[int, int]:
    try:
        start, end = (int(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected A:B (serve blocks A to B-1), got {text!r}") from None
    if not 0 <= start < end:
        raise argparse.ArgumentTypeError(f"expected A:B with 0 <= A < B, got {text!r}")
    return start, end


def maddr_arg(text: str) -> str:
    from hivemind.utils.multiaddr import Multiaddr
    try:
        protocols = [p.name for p in Multiaddr(text).protocols()]
    except Exception:
        protocols = []
    if "p2p" not in protocols:
        raise argparse.ArgumentTypeError(f"{text!r} is not a peer's multiaddr such as "
                                         f"/ip4/203.0.113.7/tcp/31337/p2p/12D3KooW... (`cocoon dht` prints them)")
    return text


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("hivemind", "bitsandbytes"):
        logging.getLogger(noisy).setLevel(max(logging.getLogger().level, logging.ERROR))
    from swarm import cli_chain
    handlers = {"dht": run_dht, "serve": run_serve, "generate": run_generate, "status": run_status, "demo": run_demo}
    try:
        return handlers.get(args.command, cli_chain.run)(args)
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        if logging.getLogger().isEnabledFor(logging.DEBUG):
            raise
        usage, text = explain(e)
        print(f"cocoon {args.command}: error: {text}", file=sys.stderr, flush=True)
        return 2 if usage else 1


def explain(error: Exception) -> tuple[bool, str]:
    """(is it a usage error, one line saying what went wrong and what to do)."""
    from hivemind.p2p import P2PDaemonError

    from shards import CheckpointNotFoundError, SpanOutOfRangeError
    text = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, (UsageError, CheckpointNotFoundError, SpanOutOfRangeError)):
        return True, text
    if isinstance(error, P2PDaemonError) and "bootstrap peers" in text:
        return False, ("cannot reach any of --initial-peers: check the addresses (`cocoon dht` prints them), that "
                       "the peer is running and that this machine can connect to it")
    if isinstance(error, P2PDaemonError) and "multiaddr" in text:
        return True, f"{text.split(': ', 2)[-1]}: --initial-peers takes multiaddrs such as /ip4/.../tcp/.../p2p/..."
    from routing import NoChainError
    from swarm.client.failover import SwarmError
    from swarm.wire import RemoteError
    if isinstance(error, (NoChainError, SwarmError, RemoteError)):
        return False, text
    return False, f"{text} ({type(error).__name__}; details with --log-level DEBUG)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cocoon", description="Run large language models across a swarm.")
    parser.add_argument("--log-level", default="WARNING", help="DEBUG, INFO, WARNING (default), ERROR")
    commands = parser.add_subparsers(dest="command", required=True)

    dht = commands.add_parser("dht", help="run a bootstrap DHT peer")
    dht.add_argument("--initial-peers", nargs="*", default=[], metavar="MADDR", type=maddr_arg)
    dht.add_argument("--host", default="0.0.0.0")
    dht.add_argument("--port", type=int, default=31337)
    dht.add_argument("--identity", metavar="PATH", help="private key file: a stable peer id (created if missing)")
    dht.add_argument("--maddr-file", metavar="PATH", help="write this peer's multiaddrs here, one per line")

    serve = commands.add_parser("serve", help="serve a span of a model's blocks")
    serve.add_argument("model", help="checkpoint directory, hub cache directory or hub repo id")
    serve.add_argument("--initial-peers", nargs="+", required=True, metavar="MADDR", type=maddr_arg)
    where = serve.add_mutually_exclusive_group(required=True)
    where.add_argument("--blocks", metavar="A:B", type=blocks_arg, help="serve blocks [A, B)")
    where.add_argument("--num-blocks", type=int, metavar="N", help="serve N blocks where the swarm needs them most")
    serve.add_argument("--host", default="0.0.0.0")
    serve.add_argument("--port", type=int, default=0)
    serve.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    serve.add_argument("--quant", default="none", choices=["none", "int8", "nf4"])
    serve.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    serve.add_argument("--max-sessions", type=int, default=64)
    serve.add_argument("--cache-tokens", type=int, default=16384, help="KV cache budget in tokens (batch x length)")
    serve.add_argument("--session-timeout", type=float, default=120.0, help="seconds before an idle session is freed")
    serve.add_argument("--max-length", type=int, default=4096, help="longest session this server accepts")
    serve.add_argument("--public-name", default="")
    serve.add_argument("--model-id", default=None, help="override the id derived from the checkpoint")
    serve.add_argument("--identity", metavar="PATH")
    serve.add_argument("--announce-period", type=float, default=15.0)
    serve.add_argument("--balance-period", type=float, default=120.0,
                       help="with --num-blocks: seconds between checks whether another span needs this server more")
    serve.add_argument("--balance-threshold", type=float, default=1.1,
                       help="move only when the swarm's throughput would grow by more than this factor")
    serve.add_argument("--adapters", nargs="+", default=[], metavar="PATH",
                       help="peft LoRA adapter directories or hub repo ids; clients pick one by name "
                            "(a directory's last component, or the repo id) with active_adapter=")
    serve.add_argument("--max-lora-rank", type=int, default=64, help="largest LoRA rank a client may send")
    serve.add_argument("--lora-cache-mb", type=float, default=256,
                       help="memory for clients' LoRA weights kept between a forward and its backward")
    serve.add_argument("--price", type=int, default=0, help="wei per token x block (0: serve for free)")
    serve.add_argument("--backward-price", type=int, default=None, help="wei per token x block of backward")
    serve.add_argument("--payout", metavar="WALLET", help="keystore of the payout key (passphrase: $COCOON_PASSPHRASE)")
    serve.add_argument("--chain-rpc", help="JSON-RPC URL of the settlement chain")
    serve.add_argument("--contract", help="settlement contract address")
    serve.add_argument("--credit-limit", type=int, default=10**15, help="wei a client may owe beyond its voucher")
    serve.add_argument("--redeem-period", type=float, default=60.0, help="seconds between redemptions")

    generate = commands.add_parser("generate", help="generate text through the swarm, streaming it")
    generate.add_argument("model")
    generate.add_argument("prompt")
    generate.add_argument("--initial-peers", nargs="+", required=True, metavar="MADDR", type=maddr_arg)
    generate.add_argument("--max-new-tokens", type=int, default=32)
    generate.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    generate.add_argument("--top-k", type=int, default=None)
    generate.add_argument("--top-p", type=float, default=None)
    generate.add_argument("--model-id", default=None)
    generate.add_argument("--adapter", default=None, help="a LoRA adapter the servers serve (see serve --adapters)")
    generate.add_argument("--request-timeout", type=float, default=60.0,
                          help="seconds before a silent server is replaced")

    status = commands.add_parser("status", help="which servers hold which blocks")
    status.add_argument("model", help="checkpoint (for its block count and id), or use --model-id + --num-blocks")
    status.add_argument("--initial-peers", nargs="+", required=True, metavar="MADDR", type=maddr_arg)
    status.add_argument("--model-id", default=None)

    demo = commands.add_parser("demo", help="a whole swarm on this machine: DHT, servers, streamed generation")
    demo.add_argument("--servers", type=int, default=3)
    demo.add_argument("--max-new-tokens", type=int, default=48)
    demo.add_argument("--prompt", default="The swarm")

    from swarm import cli_chain
    cli_chain.add_parsers(commands)
    return parser


def run_dht(args) -> int:
    import hivemind
    kwargs = {"identity_path": args.identity} if args.identity else {}
    if args.identity and not Path(args.identity).exists():
        from hivemind.p2p import P2P
        P2P.generate_identity(args.identity)
    dht = hivemind.DHT(initial_peers=args.initial_peers, start=True,
                       host_maddrs=[f"/ip4/{args.host}/tcp/{args.port}"], **kwargs)
    maddrs = [str(m) for m in dht.get_visible_maddrs()]
    if args.maddr_file:
        Path(args.maddr_file).write_text("".join(m + "\n" for m in maddrs))
    print("DHT running. Connect with --initial-peers " + " ".join(maddrs), flush=True)
    _wait_for_signal()
    dht.shutdown()
    return 0


def run_serve(args) -> int:
    from swarm.server.server import Server, ServerConfig
    from swarm.wire import Limits
    if args.identity and not Path(args.identity).exists():
        from hivemind.p2p import P2P
        P2P.generate_identity(args.identity)
    config = ServerConfig(
        model=args.model, initial_peers=args.initial_peers, blocks=args.blocks, num_blocks=args.num_blocks,
        host=args.host, port=args.port, dtype=args.dtype, quant=args.quant, device=args.device,
        max_sessions=args.max_sessions, cache_tokens=args.cache_tokens, session_timeout=args.session_timeout,
        public_name=args.public_name, model_id=args.model_id, identity_path=args.identity,
        announce_period=args.announce_period, balance_period=args.balance_period,
        balance_threshold=args.balance_threshold,
        limits=Limits(max_length=args.max_length, max_lora_rank=args.max_lora_rank), adapters=args.adapters,
        lora_cache_bytes=int(args.lora_cache_mb * 2**20),
        price=args.price, backward_price=args.backward_price, wallet=args.payout,
        passphrase=os.environ.get("COCOON_PASSPHRASE", ""), chain_rpc=args.chain_rpc, contract=args.contract,
        credit_limit=args.credit_limit, redeem_period=args.redeem_period)
    Server(config).run()
    return 0


def run_generate(args) -> int:
    from transformers import AutoTokenizer, TextStreamer
    from swarm.client.model import AutoDistributedModelForCausalLM
    model = AutoDistributedModelForCausalLM.from_pretrained(args.model, initial_peers=args.initial_peers,
                                                            model_id=args.model_id, request_timeout=args.request_timeout,
                                                            active_adapter=args.adapter)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    inputs = tokenizer(args.prompt, return_tensors="pt")
    sampling = dict(do_sample=True, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p) \
        if args.temperature > 0 else dict(do_sample=False)
    try:
        model.generate(**inputs, max_new_tokens=args.max_new_tokens, streamer=TextStreamer(tokenizer), **sampling)
    finally:
        print(flush=True)  # the streamer's line ends here, also when generation failed
        model.shutdown()
    return 0


def run_status(args) -> int:
    import hivemind
    from shards import Checkpoint
    from swarm.dht_records import fetch_swarm_state
    from swarm.status import format_status
    checkpoint = Checkpoint(args.model)
    dht = hivemind.DHT(initial_peers=args.initial_peers, client_mode=True, start=True)
    model_id = args.model_id or checkpoint.model_id
    state = fetch_swarm_state(dht, model_id, checkpoint.config.num_hidden_layers)
    print(format_status(state, model_id))
    dht.shutdown()
    return 0 if not state.missing_blocks() else 1


def run_demo(args) -> int:
    from swarm.demo import run_demo as demo
    return demo(num_servers=args.servers, max_new_tokens=args.max_new_tokens, prompt=args.prompt)


def _wait_for_signal() -> None:
    async def wait():
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        await stop.wait()
    asyncio.run(wait())


if __name__ == "__main__":
    sys.exit(main())
