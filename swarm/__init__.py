"""Cocoon's swarm: DHT records, servers, and the distributed model client."""
__version__ = "0.1.0"


def __getattr__(name):  # the client pulls in transformers; keep `import swarm` light for the CLI
    if name == "AutoDistributedModelForCausalLM":
        from swarm.client.model import AutoDistributedModelForCausalLM
        return AutoDistributedModelForCausalLM
    if name == "AutoDistributedModelForSequenceClassification":
        from swarm.client.classification import AutoDistributedModelForSequenceClassification
        return AutoDistributedModelForSequenceClassification
    raise AttributeError(name)
