"""The failover policy with real processes: a malformed request is the caller's error (raised at once, nobody
banned, the same server serves the next request); a server that cannot be reached is retried with waits
and ends in an error that names it."""
import signal
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from swarm import AutoDistributedModelForCausalLM
from swarm.client.failover import SwarmError
from swarm.apps.local_swarm import LocalSwarm
from swarm.wire.codes import ErrorCode, RemoteError

pytestmark = pytest.mark.slow


def test_a_malformed_request_is_the_callers_error(checkpoints):
    path = checkpoints("llama")
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ids = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(0))
    embeds = local.get_input_embeddings()(ids).detach()
    with LocalSwarm(path, [(0, 2), (2, 4)]) as swarm:
        model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers,
                                                                exact_wire=True)
        with model.inference_session(max_length=8) as session:
            first = session.step(embeds[:, :5])
            chain = session.chain
            started = time.perf_counter()
            with pytest.raises(RemoteError, match=r"hidden must have shape \[batch, tokens, 64\], got \[1, 1, 63\]") \
                    as error:
                session.step(torch.randn(1, 1, 63))
            assert error.value.code == ErrorCode.BAD_REQUEST and error.value.peer_id == chain[0].peer_id
            assert time.perf_counter() - started < 2.0
            assert session.failovers == 0 and not model.swarm.bans.banned()
            second = session.step(embeds[:, 5:6])  # the same servers, the same caches
            assert session.chain == chain and session.failovers == 0
        with torch.no_grad():
            expected = local.model(inputs_embeds=embeds).last_hidden_state
        got = model.model.norm(torch.cat([first, second], dim=1))
        assert torch.allclose(got, expected, atol=1e-4)

        with pytest.raises(RemoteError, match="64"):  # stateless forward: the same
            model(inputs_embeds=torch.randn(1, 3, 63))
        assert not model.swarm.bans.banned()
        model.shutdown()


def test_an_unreachable_server_is_retried_with_waits_then_named(checkpoints):
    path = checkpoints("llama")
    with LocalSwarm(path, [(0, 2), (2, 4)]) as swarm:
        model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers,
                                                                request_timeout=5.0)
        model.swarm.max_retries = 3
        model.swarm.swarm_state(refresh=True)
        victim = swarm.servers[1]
        victim.signal(signal.SIGKILL)  # its DHT record stays for a while: clients still find it
        victim.process.wait(10)
        started = time.perf_counter()
        with pytest.raises(SwarmError, match=rf"gave up after 4 failed attempts \({victim.peer_id}: ") as error:
            model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=2)
        elapsed = time.perf_counter() - started
        assert "Check that these servers are reachable" in str(error.value)
        assert elapsed > 0.5 + 1 + 2  # it waited between attempts (backoff), instead of looping
        model.shutdown()


def test_a_server_that_leaves_cleanly_is_not_banned_and_is_used_again_once_back(checkpoints, tmp_path):
    """Through `cocoon api` and the official openai client: a clean leave (SIGTERM: the server announces itself
    offline) is no failure. The next request gets its 503 fast, with no server left to ask, and once the server is
    back online (the same identity) the API uses it again within one refresh of its view of the swarm (5 s)."""
    import openai

    from swarm.apps.local_swarm import SwarmProcess
    path = checkpoints("llama")
    identity = ["--identity", str(tmp_path / "server.key")]
    with LocalSwarm(path) as swarm:
        server = swarm.add_server((0, 4), *identity)
        api = SwarmProcess(["api", str(path), "--initial-peers", *swarm.initial_peers, "--port", "0"], "api")
        try:
            url = api.wait_for("API ready", 120).split("API ready: ")[1].split()[0]
            client = openai.OpenAI(base_url=url, api_key="-", max_retries=0)

            name = client.models.list().data[0].id

            def ask() -> str:
                return client.completions.create(model=name, prompt="abc", max_tokens=4, temperature=0).choices[0].text
            expected = ask()
            peer = server.peer_id
            server.stop()
            started = time.monotonic()
            with pytest.raises(openai.APIStatusError) as unavailable:
                ask()
            assert unavailable.value.status_code == 503 and time.monotonic() - started < 8.0
            assert unavailable.value.body["code"] == "swarm_unavailable"
            swarm.add_server((0, 4), *identity)
            back = time.monotonic()
            while True:  # within one refresh (state_ttl, 5 s) of the client's view, plus the time of a request
                try:
                    assert ask() == expected
                    break
                except openai.APIStatusError as e:
                    assert e.status_code == 503 and time.monotonic() - back < 5.0 + 3.0
                    time.sleep(0.5)
            assert swarm.servers[-1].peer_id == peer
        finally:
            api.stop()
