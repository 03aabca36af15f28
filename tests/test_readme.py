"""Every Python block of the README runs as written, in order, in one session, against a local swarm of SmolLM2.

The substitutions: a hub repo id becomes the local SmolLM2 checkpoint, `[...]` the local swarm's peers, the API's
address the `cocoon api` started here, and the payment block's contract and node those of a local anvil (its
`me.json` keystore is made as `cocoon wallet create` would). Anything else a block needs is defined in the README
itself, before it."""
import contextlib
import io
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from incentives.contract import Settlement
from incentives.devnode import DevNode
from incentives.wallet import create_wallet
from swarm.apps.local_swarm import LocalSwarm, SwarmProcess

pytestmark = pytest.mark.slow
README = Path(__file__).resolve().parent.parent / "README.md"
REPO_ID = re.compile(r'"[A-Za-z0-9][\w.-]*/[\w.-]+"')  # "org/name", nothing with a scheme or a dot-slash


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_every_python_block_of_the_readme_runs_as_written(smollm2, tmp_path, monkeypatch):
    path = smollm2["float32"]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COCOON_PASSPHRASE", "readme")
    blocks = python_blocks()
    assert len(blocks) >= 7
    namespace: dict = {}
    with DevNode() as node, LocalSwarm(path, [(0, 30)]) as swarm:
        owner = node.new_account()
        settlement = Settlement.deploy(node.w3, owner, withdrawal_delay=3600)
        create_wallet(tmp_path / "me.json", "readme")
        api = SwarmProcess(["api", str(path), "--initial-peers", *swarm.initial_peers, "--port", "0",
                            "--api-key", "KEY"], "api")
        try:
            url = api.wait_for("API ready", 180).split("API ready: ")[1].split("/v1")[0]
            local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
            printed = io.StringIO()
            for number, block in enumerate(blocks):
                code = REPO_ID.sub(repr(str(path)), block)
                code = code.replace("[...]", repr(list(swarm.initial_peers)))
                code = code.replace("http://127.0.0.1:8000", url)
                code = code.replace('"0x..."', repr(settlement.address)).replace('"http://127.0.0.1:8545"',
                                                                                 repr(node.url))
                with contextlib.redirect_stdout(printed):
                    try:
                        exec(compile(code, "README.md", "exec"), namespace)
                    except Exception as e:
                        raise AssertionError(f"this README block fails ({type(e).__name__}: {e}):\n{block}") from e
                if number == 0:  # what the first block computed is what transformers computes on the same weights
                    input_ids = namespace["input_ids"]
                    with torch.no_grad():
                        expected = local.generate(input_ids, max_new_tokens=8, do_sample=False)
                        truth = local(input_ids, labels=input_ids).loss.item()
                    assert torch.equal(namespace["output"], expected)
                    assert abs(namespace["loss"].item() - truth) < 0.02 * truth, (namespace["loss"], truth)
                    assert "Paris" in printed.getvalue()
            assert printed.getvalue().count("Paris") >= 3  # generate(), the API's reply, and its stream
            assert (tmp_path / "my-adapter" / "adapter_config.json").exists()
            with torch.no_grad():  # the speculative block's greedy tokens are those of plain greedy decoding
                assert torch.equal(namespace["output"], local.generate(input_ids, max_new_tokens=16, do_sample=False))
            assert namespace["paying"].swarm.payments.domain.contract == settlement.address
        finally:
            for value in namespace.values():
                if hasattr(value, "swarm") and hasattr(value, "shutdown"):
                    value.shutdown()
            api.stop()
