"""Cocoon's swarm: DHT records, servers, and the distributed model client."""
import os

__version__ = "0.1.0"

# hivemind shares a few bytes per future with its DHT process through torch's shared memory; its default
# strategy (file_system) starts a torch_shm_manager process, and a signal during that start leaves torch
# spinning with the GIL held. File descriptors need no helper process.
os.environ.setdefault("HIVEMIND_MEMORY_SHARING_STRATEGY", "file_descriptor")
# A chain's client and servers often share cores (a home machine, several servers on one box): OpenMP threads
# that spin for ~200 ms after each parallel region would take them from the next process of the chain, so they
# sleep instead. This takes effect where swarm is imported before torch (every `cocoon` command); a script that
# imports torch first can export OMP_WAIT_POLICY=PASSIVE itself.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def __getattr__(name):  # the client pulls in transformers; keep `import swarm` light for the CLI
    if name == "AutoDistributedModelForCausalLM":
        from swarm.client.model import AutoDistributedModelForCausalLM
        return AutoDistributedModelForCausalLM
    if name == "AutoDistributedModelForSequenceClassification":
        from swarm.client.classification import AutoDistributedModelForSequenceClassification
        return AutoDistributedModelForSequenceClassification
    raise AttributeError(name)
