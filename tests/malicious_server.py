"""A test double: `cocoon serve` whose span outputs are perturbed slightly (relative 1e-2), as a server
that skimps on work would. Run as `python -m tests.malicious_server serve ...`."""
import sys

import torch

from swarm.server import handler

_honest_run = handler.SpanHandler._run


def _perturbed_run(self, request, cache, blocks, lora):
    output = _honest_run(self, request, cache, blocks, lora)
    return output + 1e-2 * output.float().std().to(output.dtype) * torch.randn_like(output)


handler.SpanHandler._run = _perturbed_run

if __name__ == "__main__":
    from swarm.cli import main
    sys.exit(main())
