"""Where the time of one decode step goes along a chain of 1 or 2 servers (pushing): timestamps on every side.

    python bench/trace_step.py [--servers 2] [--model small] [--tokens 64] [--rounds 3]
        [--code new=. --code old=/old/checkout]

Each code tree (a checkout of this repository; default: this one) runs in turn, in a child process: a
LocalSwarm of ``--servers`` servers started by `cocoon serve` with its defaults, and a client with default
arguments decoding ``--tokens`` tokens after warming up. A hook (a sitecustomize module on PYTHONPATH, in every
process of the run) writes a timestamp (CLOCK_MONOTONIC, the same clock in every process) at each frame read and
written, where a step enters and leaves the server's engine, where the span's forward starts and ends, and where
the client's step() starts and returns. The table gives the median over tokens of each stage of the critical
path: client -> server 1 -> (push) -> server 2 -> client. The hook itself costs a few microseconds per timestamp.

Beside it, in each round, transformers in a process of its own (bench/local_baseline.py --layers-in-generate):
its decoder layers' time within each decode step of generate(), the same work as the servers' forwards together.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap

HOOK = '''
import os, sys, time
_dir = os.environ.get("COCOON_TRACE_DIR")
if _dir:
    _out = open(os.path.join(_dir, f"{os.getpid()}.txt"), "a", buffering=1)
    _who = f"server{os.getpid()}" if "serve" in sys.argv else "client"

    def ev(what):
        _out.write(f"{time.perf_counter_ns()} {_who} {what}\\n")

    import builtins
    builtins._cocoon_trace = ev
    import swarm.wire.framing as framing
    _read, _write = framing.read_frame, framing.write_frame

    async def read_frame(reader, message_type, *args, **kwargs):
        message = await _read(reader, message_type, *args, **kwargs)
        ev(f"read {message_type.__name__}")
        return message

    def wrote(message):
        kind = type(message).__name__
        if kind == "CompactFrame":  # swarm.wire.compact: a step or push (kinds 0, 1), or a reply (2)
            kind = "ExpertResponse" if message[0] == 2 else "ExpertRequest"
        ev(f"wrote {kind}")

    async def write_frame(writer, message):
        result = await _write(writer, message)
        wrote(message)
        return result

    framing.read_frame = read_frame
    if hasattr(framing, "put_frame"):  # (write_frame calls it too): the moment the frame is handed to the socket
        _put = framing.put_frame

        def put_frame(writer, message):
            _put(writer, message)
            wrote(message)

        framing.put_frame = put_frame
    else:
        framing.write_frame = write_frame
    if _who != "client":
        import swarm.server.engine as engine
        _span_output = engine.Engine.span_output

        async def span_output(self, *args, **kwargs):
            ev("compute0")
            output = await _span_output(self, *args, **kwargs)
            ev("compute1")
            return output

        engine.Engine.span_output = span_output
        import shards.span as span_module
        _forward = span_module.BlockSpan.forward

        def forward(self, *args, **kwargs):
            ev("forward0")
            output = _forward(self, *args, **kwargs)
            ev("forward1")
            return output

        span_module.BlockSpan.forward = forward
'''

CLIENT = '''
import builtins, shutil, sys, tempfile
import swarm
import torch
from shards.testing import save_random_checkpoint
from swarm import AutoDistributedModelForCausalLM
from swarm.client.inference_session import InferenceSession
from swarm.apps.local_swarm import LocalSwarm
config, tokens = {config!r}, {tokens}
directory = tempfile.TemporaryDirectory()  # removed at exit
path = directory.name
save_random_checkpoint(path, "llama", **config)
ev = builtins._cocoon_trace
step = InferenceSession.step

def traced(self, *args, **kwargs):
    ev("step0")
    output = step(self, *args, **kwargs)
    ev("step1")
    return output

InferenceSession.step = traced
ids = torch.randint(3, config["vocab_size"], (1, 16), generator=torch.Generator().manual_seed(0))
blocks, servers = config["num_hidden_layers"], {servers}
with LocalSwarm(path, [(i * blocks // servers, (i + 1) * blocks // servers) for i in range(servers)]) as local_swarm:
    model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=local_swarm.initial_peers)
    with torch.no_grad():
        model.generate(ids, max_new_tokens=4, do_sample=False)
        ev("MARK")
        model.generate(ids, max_new_tokens=tokens, do_sample=False, eos_token_id=None)
    model.shutdown()
    shutil.copytree(path, sys.argv[1], dirs_exist_ok=True)  # the same weights, for the local baseline
'''



def stage_names(servers: int) -> list[str]:
    names = ["client: step() -> request written"]
    for n in range(1, servers + 1):
        names += [f"-> server {n} has read it", f"server {n}: read -> into the engine",
                  f"server {n}: engine -> forward (hand-off to the compute thread)", f"server {n}: forward",
                  f"server {n}: forward -> out of the engine",
                  f"server {n}: engine -> {'push' if n < servers else 'answer'} written"]
    return names + ["-> client has read it", "client: read -> step() returns"]


def stages(events: list[tuple[float, str, str]], servers: int) -> dict[str, list[float]]:
    """Milliseconds of each stage, per token, for tokens whose events follow the chain's order."""
    start = next(i for i, (_, _, what) in enumerate(events) if what == "MARK")
    per_stage: dict[str, list[float]] = {}
    token: list = []
    for event in events[start + 1:]:
        token.append(event)
        if event[1] == "client" and event[2] == "step1":
            times = _critical_path(token, servers)
            if times is not None:
                for name, a, b in zip(stage_names(servers), times, times[1:]):
                    per_stage.setdefault(name, []).append(b - a)
                per_stage.setdefault("whole step", []).append(times[-1] - times[0])
            token = []
    return per_stage


def _critical_path(token, servers: int) -> list[float] | None:
    def first(after: float, who, what: str):
        for t, w, x in token:
            if t >= after and who(w) and x.startswith(what):
                return t, w
        raise LookupError

    try:
        step0, _ = first(0.0, lambda w: w == "client", "step0")
        times = [step0, first(step0, lambda w: w == "client", "wrote")[0]]
        seen: list[str] = []
        for n in range(servers):
            read, server = first(times[-1], lambda w: w.startswith("server") and w not in seen, "read ExpertRequest")
            seen.append(server)
            times.append(read)
            for what in ("compute0", "forward0", "forward1", "compute1"):
                times.append(first(times[-1], lambda w: w == server, what)[0])
            times.append(first(times[-1], lambda w: w == server,
                               "wrote ExpertRequest" if n < servers - 1 else "wrote ExpertResponse")[0])
        times.append(first(times[-1], lambda w: w == "client", "read ExpertResponse")[0])
        times.append(first(times[-1], lambda w: w == "client", "step1")[0])
    except LookupError:
        return None
    return times


def run(code: str, config: dict, tokens: int, servers: int) -> tuple[dict[str, list[float]], float]:
    """The stages of each token, and transformers' layers inside generate() on the same weights (ms a step)."""
    with tempfile.TemporaryDirectory() as hook, tempfile.TemporaryDirectory() as traces, \
            tempfile.TemporaryDirectory() as weights:
        with open(os.path.join(hook, "sitecustomize.py"), "w") as f:
            f.write(HOOK)
        env = {**os.environ, "COCOON_TRACE_DIR": traces,
               "PYTHONPATH": os.pathsep.join([hook, os.path.abspath(code), os.environ.get("PYTHONPATH", "")])}
        subprocess.run([sys.executable, "-c", textwrap.dedent(CLIENT.format(config=config, tokens=tokens,
                                                                              servers=servers)), weights],
                       env=env, cwd=code, check=True, stdout=subprocess.DEVNULL)
        events = []
        for name in os.listdir(traces):
            with open(os.path.join(traces, name)) as f:
                for line in f:
                    t, who, what = line.rstrip("\n").split(" ", 2)
                    events.append((int(t) / 1e6, who, what))
        local = subprocess.run([sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                             "local_baseline.py"), weights, "--new-tokens",
                                str(tokens), "--layers-in-generate"], capture_output=True, text=True, check=True,
                               env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    layers = json.loads(local.stdout.strip().splitlines()[-1])["layers_in_generate_s"] * 1000
    return stages(sorted(events), servers), layers


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--servers", type=int, choices=[1, 2], default=2)
    parser.add_argument("--model", choices=["small", "large", "7b"], default="small")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=1, help="runs of every code tree, interleaved")
    parser.add_argument("--code", action="append", default=[], help="NAME=PATH of a checkout (repeatable)")
    args = parser.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from bench.swarm_generate import MODELS
    hidden, blocks, heads, kv_heads, intermediate = MODELS[args.model]
    config = dict(hidden_size=hidden, num_hidden_layers=blocks, num_attention_heads=heads, num_key_value_heads=kv_heads,
                  intermediate_size=intermediate, vocab_size=32000, max_shard_size="2GB")
    codes = [c.split("=", 1) for c in args.code] or [["this checkout", "."]]
    results: dict[str, dict[str, list[float]]] = {name: {} for name, _ in codes}
    for round_ in range(args.rounds):  # interleaved, so that the machine's drift hits every tree alike
        for name, code in codes:
            print(f"round {round_ + 1}: tracing {name} ({code}) ...", flush=True)
            per_stage, layers = run(code, config, args.tokens, args.servers)
            for stage, values in per_stage.items():
                results[name].setdefault(stage, []).extend(values)
            results[name].setdefault("local", []).append(layers)
    median = statistics.median
    print(f"\n{args.model} model, {args.servers} server(s){', push' if args.servers > 1 else ''}, {args.rounds} x "
          f"{args.tokens} tokens; median ms per token of each stage\n")
    print("| stage | " + " | ".join(results) + " |")
    print("|---|" + "---|" * len(results))
    for stage in stage_names(args.servers) + ["whole step"]:
        print(f"| {stage} | " + " | ".join(f"{median(r[stage]):.2f}" if r.get(stage) else "-"
                                         for r in results.values()) + " |")
    forwards = [f"server {n}: forward" for n in range(1, args.servers + 1)]
    print("| all but the forwards | " + " | ".join(
        f"{median(r['whole step']) - sum(median(r[f]) for f in forwards):.2f}" for r in results.values()) + " |")
    print("| the forwards, together | " + " | ".join(
        f"{sum(median(r[f]) for f in forwards):.2f}" for r in results.values()) + " |")
    print("| transformers' decoder layers inside generate(), a clean process (median of the rounds) | " + " | ".join(
        f"{median(r['local']):.2f}" for r in results.values()) + " |")
    print("| tokens counted | " + " | ".join(str(len(r.get("whole step", []))) for r in results.values()) + " |")


if __name__ == "__main__":
    main()
