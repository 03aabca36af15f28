"""A client run inside a network namespace by the tests (`ip netns exec NS python -m tests.netns_client ...`):
generates greedily and prints the tokens, how each server of the chain was reached and its push counts, as JSON."""
import json
import sys

import torch

from swarm import AutoDistributedModelForCausalLM
from swarm.client import loop


def main(path: str, new_tokens: str, ids: str, *initial_peers: str) -> None:
    model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=list(initial_peers), exact_wire=True)
    prompt = torch.tensor([json.loads(ids)])
    with model.inference_session(max_length=prompt.shape[1] + int(new_tokens)) as session:
        output = model.generate(prompt, max_new_tokens=int(new_tokens), do_sample=False, eos_token_id=None)
        via = [s.stream.via for s in session._sessions]
        pushes = [loop.run(model.swarm.info(s.link.peer_id))["pushes"] for s in session._sessions]
    print(json.dumps({"ids": output[0].tolist(), "via": via, "pushes": pushes}), flush=True)
    model.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
