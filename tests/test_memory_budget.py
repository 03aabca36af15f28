"""`cocoon serve` with neither --blocks nor --num-blocks serves as many blocks as fit in its memory."""
import re

import psutil
import pytest
import torch

from shards import Checkpoint
from shards.memory import block_cost
from swarm.client.model import AutoDistributedModelForCausalLM
from swarm.apps.local_swarm import LocalSwarm
from swarm.server.memory_budget import MemoryClaims, memory_size_arg

MB = 2**20


def peak_of_tree(pid: int) -> int:
    """The highest resident memory each process of a server's tree reached (VmHWM), summed."""
    total = 0
    for process in [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]:
        status = open(f"/proc/{process.pid}/status").read()
        total += int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024
    return total


def served_blocks(server) -> int:
    line = next(line for line in server.output if line.startswith("Server ready"))
    start, end = map(int, re.search(r"blocks \[(\d+), (\d+)\)", line).groups())
    return end - start


def run_and_measure(swarm, server, path, blocks: int) -> int:
    """A client session through the server's blocks fills part of its KV budget; then its peak."""
    model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers,
                                                            dtype="float32")
    try:
        with torch.no_grad():
            model.generate(torch.randint(3, 200, (1, 64)), max_new_tokens=4, do_sample=False)
    finally:
        model.shutdown()
    return peak_of_tree(server.process.pid)


@pytest.mark.slow
def test_num_blocks_auto_fits_the_memory_limit_and_one_block_more_would_not(checkpoints):
    # blocks of 180 MB of float32 weights each (x2 with the packed copies a CPU may keep): well above the noise
    path = str(checkpoints("llama", hidden_size=2048, intermediate_size=5632, num_hidden_layers=8,
                           num_attention_heads=16, num_key_value_heads=4, vocab_size=256))
    cost = block_cost(Checkpoint(path), dtype="float32", cache_tokens=1024)
    limit = 2100 * MB
    common = ["--cache-tokens", "1024", "--max-length", "1024"]
    with LocalSwarm(path) as swarm:
        server = swarm.add_server(None, *common, "--max-memory", f"{limit // MB}MB")
        arithmetic = next(line for line in server.output if line.startswith("Memory: "))
        fit = served_blocks(server)
        assert 1 < fit < 8, arithmetic  # the limit, not the model, decided
        assert f"{fit} block(s) fit" in arithmetic, arithmetic
        swarm.add_server((fit, 8), *common)  # the rest of the model, for a client to run through the swarm
        peak = run_and_measure(swarm, server, path, fit)
        print(f"{fit} blocks: peak {peak // MB} MB under a limit of {limit // MB} MB")
        assert peak < limit, (peak // MB, arithmetic)
        server.stop()
        # the same server with one block more goes past the limit
        bigger = swarm.add_server(None, *common, "--num-blocks", str(fit + 1))
        assert served_blocks(bigger) == fit + 1
        peak = run_and_measure(swarm, bigger, path, fit + 1)
        print(f"{fit + 1} blocks: peak {peak // MB} MB")
        assert peak > limit, arithmetic
    assert cost.copies in (1, 2) and cost.total > 0


def test_servers_starting_together_count_each_others_claims(tmp_path):
    first, second = MemoryClaims(tmp_path / "claims.json"), MemoryClaims(tmp_path / "claims.json")
    second.me = str(psutil.Process().parent().pid)  # another live process of this machine
    assert first.choose(lambda claimed: 0 if claimed else 700 * MB) == 700 * MB
    seen = []
    second.choose(lambda claimed: seen.append(claimed) or 100 * MB)
    assert seen == [700 * MB]
    first.update(10 * MB)  # loaded: only the KV budget it did not fill yet stays claimed
    assert first.choose(lambda claimed: claimed) == 100 * MB
    assert memory_size_arg("1.5GB") == 1536 * MB and memory_size_arg("512MB") == 512 * MB
