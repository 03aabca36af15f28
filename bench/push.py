"""ms/token through 1, 2 and 4 servers at 0, 10 and 25 ms of one-way delay per link, with and without
server-to-server push, in one run; with --speculative, speculative decoding against plain greedy instead.

    python bench/push.py [--servers 1 2 4] [--delays 0 10 25] [--new-tokens 16]
    python bench/push.py --speculative [--servers 2 4] [--delays 10 20 25] [--new-tokens 64]

Each server is started by `cocoon serve` with its defaults, behind a bench/delay_relay.py that holds every
byte D ms each way and is announced as the server's direct address (`--announce-direct`), so that the
client's connections and the servers' pushes to each other all cross one delayed link. For each swarm the
client generates greedily with push (the default) and with push=False, median of --repeats of the decode
steps' ms/token (from the first new token to the last), and its tokens are checked against local transformers. Without push a token crosses 2k links over k servers; with push k + 1.

--speculative: the default client (push on) generates greedily, then with transformers' assisted generation
(and each generation is timed locally too, by bench/local_baseline.py in a process of its own):
prompt lookup (4 tokens), a draft that always agrees (the target's own weights on the client, 4 draft tokens a
lap), and a draft that agrees about half the time (its last block's MLP doubled). Each row gives ms/token,
tokens per lap (per step through the swarm) and the drafted tokens' acceptance rate; its tokens are compared
with local transformers running the same assisted generation (verifying several tokens at once may flip
near-ties in 16 bits). Then the real-text case: SmolLM2-135M-Instruct (2 servers of 15 blocks) asked to
repeat and correct a quoted passage, greedy against prompt lookup. Every stream's path is checked: one that
fell back to hivemind bypasses the delay relays, and its run is reported, not counted.
"""
from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HIDDEN, BLOCKS, HEADS, KV_HEADS, INTERMEDIATE = 512, 8, 8, 4, 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_relay(listen: int, target: int, delay_ms: float) -> subprocess.Popen:
    relay = subprocess.Popen([sys.executable, str(Path(__file__).with_name("delay_relay.py")), "--listen",
                              f"127.0.0.1:{listen}", "--to", f"127.0.0.1:{target}", "--delay-ms", str(delay_ms)],
                             stdout=subprocess.PIPE, text=True)
    assert "relay ready" in relay.stdout.readline()
    return relay


class Clock:
    """A streamer that notes when each token came: the decode steps' time, without opening and prefill."""

    def __init__(self):
        self.times = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass


def ms_per_token(model, ids, new_tokens: int, expected) -> tuple[float, bool]:
    clock = Clock()  # put() 0 is the prompt, 1 the first new token (after the prefill)
    out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, streamer=clock)
    return 1000 * (clock.times[-1] - clock.times[1]) / (new_tokens - 1), torch.equal(out, expected)


def measure(path, servers: int, delay: float, args, ids, expected) -> dict[bool, tuple[float, float, bool]]:
    from swarm import AutoDistributedModelForCausalLM
    from swarm.apps.local_swarm import LocalSwarm

    step = BLOCKS // servers
    relays = []
    with LocalSwarm(path, []) as swarm:
        try:
            for i in range(servers):
                direct, relay = free_port(), free_port()
                relays.append(start_relay(relay, direct, delay))
                swarm.add_server((i * step, (i + 1) * step), "--direct-port", str(direct),
                                 "--announce-direct", f"127.0.0.1:{relay}")
            results = {}
            for push in (False, True):
                model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers,
                                                                        push=push)
                with torch.no_grad():
                    model.generate(ids, max_new_tokens=4, do_sample=False)
                    runs = [ms_per_token(model, ids, args.new_tokens, expected) for _ in range(args.repeats)]
                model.shutdown()
                times = [ms for ms, _ in runs]
                results[push] = (statistics.median(times), max(times) - min(times), all(same for _, same in runs))
                print(f"  {servers} servers, {delay:g} ms, push {push}: {results[push][0]:.1f} ms/token", flush=True)
        finally:
            for relay in relays:
                relay.kill()
    return results


class TokenClock:
    """A streamer that notes when tokens came and how many (assisted generation puts several at once)."""

    def __init__(self):
        self.marks: list[tuple[float, int]] = []

    def put(self, value):
        self.marks.append((time.perf_counter(), value.numel()))

    def end(self):
        pass

    def ms_per_token(self) -> float:
        """From the first new tokens to the last (marks[0] is the prompt, marks[1] the prefill's tokens)."""
        tokens = sum(n for _, n in self.marks[2:])
        return 1000 * (self.marks[-1][0] - self.marks[1][0]) / max(tokens, 1)


class LapClock:
    """Times each lap's parts: the draft's generate() (if any) and the model's forward (the trip through the swarm)."""

    def __init__(self, model, draft=None):
        self.draft_s, self.trip_s, self._started = [], [], 0.0
        self._hooks = [model.register_forward_pre_hook(lambda *_: self._start()),
                       model.register_forward_hook(lambda *_: self.trip_s.append(time.perf_counter() - self._started))]
        self.draft, self._had_own = draft, draft is not None and "generate" in vars(draft)
        if draft is not None:  # transformers calls the draft's generate() once a lap
            generate = self._generate = draft.generate

            def timed(*args, **kwargs):
                started = time.perf_counter()
                try:
                    return generate(*args, **kwargs)
                finally:
                    self.draft_s.append(time.perf_counter() - started)
            draft.generate = timed

    def _start(self):
        self._started = time.perf_counter()

    def remove(self):
        for hook in self._hooks:
            hook.remove()
        if self.draft is not None:
            if self._had_own:
                self.draft.generate = self._generate
            else:
                del self.draft.generate


def speculative_run(model, ids, new_tokens: int, kwargs: dict, expected) -> dict:
    """One generate() in a session: ms/token, tokens per lap, acceptance, same tokens, the streams' paths, and
    per lap (medians, the first lap left out): the draft's generate() and the trip through the swarm."""
    clock, laps = TokenClock(), LapClock(model, kwargs.get("assistant_model"))
    try:
        with model.inference_session(max_length=ids.shape[1] + new_tokens + 8) as session:
            out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, streamer=clock,
                                 **kwargs)
            vias = [s.stream.via for s in session._sessions]
            steps, rolled_back = session.steps, session.rolled_back
    finally:
        laps.remove()
    produced = out.shape[1] - ids.shape[1]
    accepted = produced - steps
    trips = laps.trip_s[1:]  # the first is the prefill
    return {"ms": clock.ms_per_token(), "per_lap": produced / steps,
            "acceptance": accepted / (accepted + rolled_back) if accepted + rolled_back else None,
            "same": torch.equal(out, expected), "direct": all(v != "hivemind" for v in vias), "vias": vias,
            "draft_ms": 1000 * statistics.median(laps.draft_s[1:]) if laps.draft_s[1:] else 0.0,
            "trip_ms": 1000 * statistics.median(trips) if trips else 0.0}


def speculative_variants(path) -> dict[str, dict]:
    from transformers import AutoModelForCausalLM
    agree = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    half = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        half.model.layers[-1].mlp.down_proj.weight.mul_(2.0)
    for draft in (agree, half):  # 4 tokens drafted every lap (no confidence cut-off: random weights are unsure)
        draft.generation_config.num_assistant_tokens = 4
        draft.generation_config.num_assistant_tokens_schedule = "constant"
        draft.generation_config.assistant_confidence_threshold = 0.0
    return {"greedy": {}, "prompt lookup 4": dict(prompt_lookup_num_tokens=4),
            "draft: always agrees, 4 tokens": dict(assistant_model=agree),
            "draft: agrees about half, 4 tokens": dict(assistant_model=half)}


LOCAL_FLAGS = {"greedy": [], "prompt lookup 4": ["--prompt-lookup", "4"],
               "draft: always agrees, 4 tokens": ["--self-draft", "4"],
               "draft: agrees about half, 4 tokens": ["--half-draft", "4"]}


def local_run(path, ids, name: str, args) -> tuple[float, torch.Tensor]:
    """ms/token and tokens of the same generation by transformers alone, in a process that never imported the
    project. The tokens come from there too: after a local generate() of the model, this process drafted ~70%
    slower in the swarm's assisted generation (67 against 38 ms a lap here), though a draft timed alone was not
    slower; a user's process does not run the whole model locally first."""
    import json
    out = subprocess.run([sys.executable, str(Path(__file__).with_name("local_baseline.py")), str(path),
                          "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats),
                          "--ids", ",".join(str(i) for i in ids[0].tolist()), *LOCAL_FLAGS[name]],
                         capture_output=True, text=True, check=True).stdout
    result = json.loads(out.splitlines()[-1])
    return 1000 * statistics.median(result["generate_s_per_token"]), torch.tensor([result["tokens"]])


def measure_speculative(path, spans, delay: float, args, ids, variants, local, label: str) -> list[tuple]:
    from swarm import AutoDistributedModelForCausalLM
    from swarm.apps.local_swarm import LocalSwarm

    relays, rows = [], []
    with LocalSwarm(path, []) as swarm:
        try:
            for span in spans:
                direct, relay = free_port(), free_port()
                relays.append(start_relay(relay, direct, delay))
                swarm.add_server(span, "--direct-port", str(direct), "--announce-direct", f"127.0.0.1:{relay}")
            model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers)
            with torch.no_grad():
                model.generate(ids, max_new_tokens=4, do_sample=False)
                for name, kwargs in variants.items():
                    runs = [speculative_run(model, ids, args.new_tokens, kwargs, local[name][1])
                            for _ in range(args.repeats)]
                    counted = [r for r in runs if r["direct"]]
                    for r in runs:
                        if not r["direct"]:
                            print(f"  (not counted: a stream went {r['vias']}, bypassing the delay)", flush=True)
                    rows.append((label, len(spans), delay, name, counted, len(runs), local[name][0]))
                    if counted:
                        print(f"  {label}, {len(spans)} servers, {delay:g} ms, {name}: "
                              f"{statistics.median(r['ms'] for r in counted):.1f} ms/token", flush=True)
            model.shutdown()
        finally:
            for relay in relays:
                relay.kill()
    return rows


def save_random_model(path) -> torch.Tensor:
    """The benches' model written to ``path``, and a 16-token prompt."""
    from shards.testing import save_random_checkpoint
    save_random_checkpoint(path, "llama", hidden_size=HIDDEN, num_hidden_layers=BLOCKS, num_attention_heads=HEADS,
                           num_key_value_heads=KV_HEADS, intermediate_size=INTERMEDIATE, vocab_size=32000)
    return torch.randint(3, 32000, (1, 16), generator=torch.Generator().manual_seed(0))


def random_model(path) -> tuple[torch.Tensor, torch.nn.Module]:
    """The benches' model written to ``path``, a 16-token prompt, and transformers' model of it."""
    from transformers import AutoModelForCausalLM
    ids = save_random_model(path)
    return ids, AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def speculative(args) -> None:
    from transformers import AutoTokenizer

    from swarm.apps.models import fetch

    rows = []
    with tempfile.TemporaryDirectory() as path:
        ids = save_random_model(path)
        variants = speculative_variants(path)
        local = {name: local_run(path, ids, name, args) for name in variants}
        for delay in args.delays:
            for servers in args.servers:
                step = BLOCKS // servers
                spans = [(i * step, (i + 1) * step) for i in range(servers)]
                rows += measure_speculative(path, spans, delay, args, ids, variants, local,
                                            f"random {HIDDEN}x{BLOCKS}")

    path = fetch("smollm2", progress=False)
    tokenizer = AutoTokenizer.from_pretrained(path)
    passage = ("The Eiffel Tower, completed in 1899 for the World Fair, stands 330 metres tall on the Champ de Mars "
               "in Paris and was the tallest structure in the world for 41 years.")
    question = f'Repeat this passage word for word, but correct the year it was completed (1889):\n"{passage}"'
    ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    real = {"greedy": {}, "prompt lookup 4": dict(prompt_lookup_num_tokens=4)}
    local = {name: local_run(path, ids, name, args) for name in real}
    print("SmolLM2's answer:", tokenizer.decode(local["greedy"][1][0, ids.shape[1]:], skip_special_tokens=True))
    rows += measure_speculative(path, [(0, 15), (15, 30)], 20.0, args, ids, real, local, "SmolLM2 real text")

    print(f"\nfloat32 servers behind one delay relay each (every leg, pushes included, delayed), default client "
          f"(push on, 16-bit wire), {args.new_tokens} new tokens, median of the counted runs of {args.repeats} "
          f"(spread = max - min); 'vs greedy' = greedy's ms/token over this row's")
    print("\n| model | servers | one-way delay | generation | ms/token | spread | vs greedy | tokens/lap | "
          "acceptance | draft ms/lap | trip ms/lap | same tokens as local (same generation) | runs counted | "
          "local ms/token (same generation) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    greedy = {}
    for label, servers, delay, name, counted, total, local in rows:
        if not counted:
            print(f"| {label} | {servers} | {delay:g} ms | {name} | - | - | - | - | - | - | - | - | 0 of {total} | "
                  f"{local:.1f} |")
            continue
        ms = statistics.median(r["ms"] for r in counted)
        greedy.setdefault((label, servers, delay), ms)
        acceptance = [r["acceptance"] for r in counted if r["acceptance"] is not None]
        print(f"| {label} | {servers} | {delay:g} ms | {name} | {ms:.1f} | "
              f"{max(r['ms'] for r in counted) - min(r['ms'] for r in counted):.1f} | "
              f"{greedy[(label, servers, delay)] / ms:.2f}x | "
              f"{statistics.median(r['per_lap'] for r in counted):.2f} | "
              f"{f'{statistics.median(acceptance):.2f}' if acceptance else '-'} | "
              f"{statistics.median(r['draft_ms'] for r in counted):.1f} | "
              f"{statistics.median(r['trip_ms'] for r in counted):.1f} | "
              f"{'yes' if all(r['same'] for r in counted) else 'no'} | {len(counted)} of {total} | {local:.1f} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--servers", type=int, nargs="+", help="default: 1 2 4 (--speculative: 2 4)")
    parser.add_argument("--delays", type=float, nargs="+", help="one-way ms per link (default: 0 10 25; "
                                                                "--speculative: 10 20 25)")
    parser.add_argument("--new-tokens", type=int, help="default: 16 (--speculative: 64, so that the last, "
                        "partial lap weighs little in ms/token)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--speculative", action="store_true", help="speculative decoding against plain greedy")
    args = parser.parse_args()
    if args.speculative:
        args.servers, args.delays = args.servers or [2, 4], args.delays or [10, 20, 25]
        args.new_tokens = args.new_tokens or 64
        return speculative(args)
    args.servers, args.delays, args.new_tokens = args.servers or [1, 2, 4], args.delays or [0, 10, 25], \
        args.new_tokens or 16
    rows = []
    with tempfile.TemporaryDirectory() as path:
        ids, local = random_model(path)
        with torch.no_grad():
            expected = local.generate(ids, max_new_tokens=args.new_tokens, do_sample=False, eos_token_id=None)
        for delay in args.delays:
            for servers in args.servers:
                rows.append((servers, delay, measure(path, servers, delay, args, ids, expected)))

    print(f"\nhidden {HIDDEN} x {BLOCKS} blocks, float32 servers, default client, {args.new_tokens} new tokens, "
          f"median of {args.repeats} (spread = max - min); one delay relay in front of each server")
    print("\n| one-way delay | servers | without push ms/token | with push ms/token | saved ms/token | "
          "saved / delay | spread without / with | same tokens |")
    print("|---|---|---|---|---|---|---|---|")
    for servers, delay, results in rows:
        (off, off_spread, off_same), (on, on_spread, on_same) = results[False], results[True]
        ratio = f"{(off - on) / delay:.2f}" if delay else "-"
        print(f"| {delay:g} ms | {servers} | {off:.1f} | {on:.1f} | {off - on:.1f} | {ratio} | "
              f"{off_spread:.1f} / {on_spread:.1f} | {'yes' if off_same and on_same else 'no'} |")
    print("\nWithout push a token crosses 2k delayed links over k servers, with push k + 1: push should save about "
          "(k - 1) delays per token.")


if __name__ == "__main__":
    main()
