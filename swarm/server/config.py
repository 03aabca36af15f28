"""Every option of a server, declared once: ``ServerConfig`` is what ``Server`` runs, and the ``cocoon serve``
parser is built from its fields (flag, default, help), so a default is written in one place. The same
options come from a YAML file (``--config FILE``, keys as the flags without dashes) or from ``COCOON_*``
environment variables (``COCOON_MAX_SESSIONS=8``); the command line wins over both.
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from routing.addresses import direct_address
from swarm.wire.limits import Limits, Quotas


def direct_address_arg(text: str) -> str:
    try:
        return direct_address(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def decode_path_arg(text: str) -> str:
    if text == "auto":  # the default, which argparse checks too: no need to import torch for it
        return text
    from shards.decode_paths import DecodePlan
    try:
        DecodePlan.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def option(default: Any = None, help: str = "", *, flag: str | None = None, **argparse_kwargs) -> Any:
    """A config field with its command-line flag; ``default`` may be a factory (for lists)."""
    meta = {"help": help, "flag": flag, **argparse_kwargs}
    if callable(default):
        return field(default_factory=default, metadata=meta)
    return field(default=default, metadata=meta)


def blocks_arg(text: str) -> tuple[int, int]:
    try:
        start, end = (int(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected A:B (serve blocks A to B-1), got {text!r}") from None
    if not 0 <= start < end:
        raise argparse.ArgumentTypeError(f"expected A:B with 0 <= A < B, got {text!r}")
    return start, end


def memory_size_arg(text: str) -> int:
    from swarm.server.memory_budget import memory_size_arg as parse
    return parse(text)


def positive_int_arg(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected at least 1, got {value}")
    return value


def announce_period_arg(seconds: float) -> float:
    from swarm.dht.validator import MAX_RECORD_TTL
    if not 0 < seconds <= MAX_RECORD_TTL / 3:
        raise argparse.ArgumentTypeError(f"the announce period must lie in (0, {MAX_RECORD_TTL / 3:g}] seconds, got "
                                         f"{seconds:g}: a server's records live 3 periods, and DHT peers refuse "
                                         f"records that live longer than {MAX_RECORD_TTL:g} s")
    return seconds


BASE58 = frozenset("123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz")


def maddr_arg(text: str) -> str:
    """A peer's multiaddr, checked for its shape: /.../p2p/<peer id in base58>. (hivemind parses it fully when the
    command joins; importing hivemind here would make every argument error take seconds.)"""
    parts = text.split("/")
    peer = parts[parts.index("p2p") + 1] if "p2p" in parts[:-1] else ""
    if not text.startswith("/") or len(peer) < 32 or not set(peer) <= BASE58:
        raise argparse.ArgumentTypeError(f"{text!r} is not a peer's multiaddr such as "
                                         f"/ip4/203.0.113.7/tcp/31337/p2p/Qm... (`cocoon dht` prints them)")
    return text


@dataclass
class ServerConfig:
    model: str = option(None, "checkpoint directory, hub cache directory or hub repo id", flag="model")
    revision: str | None = option(None, "with a hub repo id: its branch, tag or commit (default: main)")
    token: str | None = option(None, "a Hugging Face token for gated or private repos (default: $HF_TOKEN, or what "
                                     "`hf auth login` saved)")
    initial_peers: list[str] = option(list, "multiaddrs of DHT peers to join (`cocoon dht` prints them)",
                                      nargs="+", required=True, type=maddr_arg, metavar="MADDR")
    blocks: tuple[int, int] | None = option(None, "serve blocks [A, B)", type=blocks_arg, metavar="A:B",
                                            group="where")
    num_blocks: int | None = option(None, "serve N blocks where the swarm needs them most; auto (the default "
                                          "without --blocks): as many as fit in --max-memory", metavar="N|auto",
                                    group="where", type=lambda text: None if text == "auto" else positive_int_arg(text))
    max_memory: int | None = option(None, "with --num-blocks auto: the memory this server may use in all, such as "
                                          "24GB (default: what the device has free at start-up)", metavar="SIZE",
                                    type=lambda text: memory_size_arg(text))
    host: str = option("0.0.0.0", "address to listen on")
    port: int = option(0, "port to listen on (0: any free port)")
    direct: bool = option(True, "also accept direct TLS connections for inference and forward/backward (faster than "
                                "through the p2p daemons; clients that cannot reach it use hivemind)")
    direct_port: int = option(0, "TCP port of direct connections (0: any free port)")
    announce_direct: list[str] = option(list, "HOST:PORT addresses to announce for direct connections instead of "
                                              "those it listens on (a port forwarded on a router, a proxy)",
                                        nargs="+", type=direct_address_arg, metavar="HOST:PORT")
    public_ip: str | None = option(None, "your router's public IP: announce it, with --port and --direct-port "
                                         "(forward both on the router to this machine), instead of this machine's "
                                         "own addresses", metavar="IP")
    announce_maddrs: list[str] = option(list, "multiaddrs to announce for p2p connections instead of those it listens "
                                              "on, e.g. /ip4/203.0.113.5/tcp/31337 of a forwarded port",
                                        nargs="+", metavar="MADDR")
    relay: bool = option(True, "when nobody can dial this server, be reached through a relay of the swarm; when "
                               "they can, relay for servers behind NAT (--no-relay: neither)")
    dtype: str = option("auto", "the blocks' dtype (auto: bfloat16 on CUDA, float32 on a CPU)",
                        choices=["auto", "float32", "bfloat16", "float16"])
    quant: str = option("none", "bitsandbytes quantization of the blocks' linear layers",
                        choices=["none", "int8", "nf4"])
    device: str | None = option(None, "cpu, cuda, cuda:1 ... (default: cuda if available)")
    decode_path: str = option("auto", "how decode steps run: auto (timed at start-up, the fastest kept, cached per "
                                      "machine and model) or PATH[:THREADS[:park|spin]], PATH one of plain, "
                                      "packed (oneDNN's packed weights, CPU), cuda-graphs; THREADS torch threads "
                                      "(CPU); park: the OpenMP workers sleep while idle, spin: they spin "
                                      "as usual. A part left out or 'auto' is measured", type=decode_path_arg,
                              metavar="PATH[:THREADS[:POLICY]]")
    max_sessions: int = option(64, "inference sessions open at once")
    cache_tokens: int = option(16384, "KV cache budget in tokens (batch x length), reserved when a session opens")
    session_timeout: float = option(120.0, "seconds before an idle session is freed")
    max_batch_sessions: int = option(64, "decode steps of up to this many sessions run as one forward (1: no "
                                         "batching)")
    batch_window_ms: float | None = option(None, "how long a batch of steps waits for another session's step after "
                                                "the latest one (4 windows in all at most; no wait while one session "
                                                "decodes). Default: the span's decode step as measured, at most 20")
    limits: Limits = option(Limits, "what one request may ask")
    quotas: Quotas = option(Quotas, "what one peer may take")
    public_name: str = option("", "a name shown in `cocoon status`")
    metrics_port: int | None = option(None, "serve Prometheus metrics on this port (tokens, requests, latency, "
                                            "sessions, KV cache, vouchers, earnings)")
    model_id: str | None = option(None, "override the id derived from the checkpoint")
    identity_path: str | None = option(None, "private key file: a stable peer id (created if missing)",
                                       flag="--identity", metavar="PATH")
    announce_period: float = option(15.0, "seconds between DHT announcements (at most 200: a record lives 3 "
                                          "periods, and peers refuse records that live over 600 s)",
                                    type=lambda text: announce_period_arg(float(text)))
    balance_period: float = option(120.0, "with --num-blocks: seconds between checks whether another span needs "
                                          "this server more")
    balance_threshold: float = option(1.1, "move only when the swarm's throughput would grow by more than this "
                                           "factor")
    shutdown_grace: float = option(5.0, "seconds open sessions may finish after SIGTERM")
    recheck_period: float = option(600.0, "seconds between reachability checks of a relayed server (it goes direct "
                                          "once relays can dial it, and registers again if its relay left)")
    adapters: list[str] = option(list, "peft LoRA adapter directories or hub repo ids; clients pick one by name "
                                       "(a directory's last component, or the repo id) with active_adapter=",
                                 nargs="+", metavar="PATH")
    lora_cache_mb: float = option(256.0, "memory for clients' LoRA weights kept between a forward and its backward")
    # payment: free when price is 0
    price: int = option(0, "wei per token x block (0: serve for free)")
    backward_price: int | None = option(None, "wei per token x block of backward (default: --price)")
    wallet: str | None = option(None, "keystore of the payout key (passphrase: $COCOON_PASSPHRASE)",
                                flag="--payout", metavar="WALLET")
    chain_rpc: str | None = option(None, "JSON-RPC URL of the settlement chain")
    contract: str | None = option(None, "settlement contract address")
    credit_limit: int = option(10**15, "wei a client may owe beyond its latest voucher")
    redeem_period: float = option(60.0, "seconds between redemptions")
    passphrase: str = field(default="", metadata={"cli": False})  # from $COCOON_PASSPHRASE, never a flag

    @property
    def lora_cache_bytes(self) -> int:
        return int(self.lora_cache_mb * 2**20)


# `cocoon serve --help` in sections: the flag of a field not named here comes under "other".
SECTIONS = {
    "the model": ["revision", "token", "model_id", "adapters", "lora_cache_mb"],
    "which blocks, and how much memory": ["blocks", "num_blocks", "max_memory", "balance_period",
                                          "balance_threshold"],
    "network": ["initial_peers", "host", "port", "direct", "direct_port", "announce_direct", "public_ip",
                "announce_maddrs", "relay", "identity_path", "announce_period", "public_name", "metrics_port"],
    "compute": ["dtype", "quant", "device", "decode_path", "max_sessions", "cache_tokens", "session_timeout",
                "max_batch_sessions", "batch_window_ms", "shutdown_grace"],
    "what one request may ask": ["limits"],
    "what one peer may take": ["quotas"],
    "payments (free when --price is 0)": ["price", "backward_price", "wallet", "chain_rpc", "contract",
                                          "credit_limit", "redeem_period"],
}


def add_arguments(parser, cls=ServerConfig, prefix: str = "") -> None:
    """One flag per field of ``cls`` (nested dataclasses' fields are flattened: ``--max-sessions-per-peer``)."""
    groups: dict[str, Any] = {}
    if cls is ServerConfig and not prefix:
        sections = {title: parser.add_argument_group(title) for title in [*SECTIONS, "other"]}
        section_of = {name: sections[title] for title, names in SECTIONS.items() for name in names}
    else:
        section_of, sections = {}, {"other": parser}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta = dict(f.metadata)
        if meta.pop("cli", True) is False:
            continue
        kind = hints[f.name]
        target = section_of.get(f.name, sections["other"])
        if dataclasses.is_dataclass(kind):
            add_arguments(target, kind, prefix=f"{f.name}.")
            continue
        flag, group, help_text = meta.pop("flag", None), meta.pop("group", None), meta.pop("help", "")
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if flag == "model":  # positional, or `model:` in a --config file (which has no positionals)
            parser.add_argument("model", nargs="?", help=help_text)
            parser.add_argument("--model", dest="model_option", metavar="MODEL", help=argparse.SUPPRESS)
            continue
        flag = flag or "--" + f.name.replace("_", "-")
        kwargs = {"help": f"{help_text} (default: {default})" if default not in (None, "", [], ()) else help_text,
                  "dest": prefix + f.name, "metavar": f.name.upper(), **meta}
        base = _base_type(kind)
        if base is bool:
            kwargs.update(action=argparse.BooleanOptionalAction, default=default)
        else:
            kwargs.setdefault("type", base)
            if not kwargs.get("required"):
                kwargs["default"] = default
        if group is not None:
            if group not in groups:
                groups[group] = target.add_mutually_exclusive_group()
            groups[group].add_argument(flag, **kwargs)
        else:
            target.add_argument(flag, **kwargs)


def from_args(args: argparse.Namespace, cls=ServerConfig, prefix: str = "", **extra) -> Any:
    """The config ``add_arguments`` parsed into ``args``."""
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            values[f.name] = from_args(args, hints[f.name], prefix=f"{f.name}.")
        elif hasattr(args, prefix + f.name):
            values[f.name] = getattr(args, prefix + f.name)
    values.update(extra)
    return cls(**values)


def _base_type(kind) -> type:
    """What argparse converts one value to: int for ``int | None``, str for ``list[str]``."""
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    if typing.get_origin(kind) in (list, tuple):
        return typing.get_args(kind)[0]
    return kind


