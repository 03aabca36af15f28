"""The `cocoon` command as a user types it: generate through a swarm, and the settlement commands on anvil."""
import os
import re
import subprocess
import sys
import time

import pytest

from incentives.devnode import DevNode
from swarm.apps.local_swarm import LocalSwarm

pytestmark = pytest.mark.slow


def cocoon(*args, env=None, timeout=180):
    result = subprocess.run([sys.executable, "-m", "swarm.apps.cli", *args], capture_output=True, text=True,
                            timeout=timeout, env={**os.environ, **(env or {})})
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_generate_streams_the_same_text_as_transformers(checkpoints, tmp_path):
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = checkpoints("llama")
    client_copy = shutil.copytree(path, tmp_path / "elsewhere")  # the client's copy lies at another path
    tokenizer = AutoTokenizer.from_pretrained(path)
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ids = tokenizer("Hello swarm", return_tensors="pt").input_ids
    expected = tokenizer.decode(local.generate(ids, max_new_tokens=12, do_sample=False)[0], skip_special_tokens=True)
    with LocalSwarm(path, [(0, 2), (2, 4)]) as swarm:
        out = cocoon("generate", str(client_copy), "Hello swarm", "--max-new-tokens", "12", "--initial-peers",
                     *swarm.initial_peers)
        # speculative decoding: a local draft (here the model itself), or drafts copied from the prompt
        exact = ["--max-new-tokens", "12", "--exact-wire", "--initial-peers", *swarm.initial_peers]
        drafted = cocoon("generate", str(client_copy), "Hello swarm", "--draft", str(path), *exact)
        looked_up = cocoon("generate", str(client_copy), "Hello swarm", "--prompt-lookup", "3", *exact)
    # 16-bit activations on the wire by default: the first tokens of random weights agree
    assert out.strip()[:14] == expected.strip()[:14]
    assert drafted.strip() == looked_up.strip() == expected.strip()


def cocoon_fails(*args, timeout=120):
    result = subprocess.run([sys.executable, "-m", "swarm.apps.cli", *args], capture_output=True, text=True,
                            timeout=timeout)
    assert "Traceback" not in result.stdout + result.stderr
    return result.returncode, result.stderr.strip().splitlines()


def test_version_extras_hint_and_an_unreachable_hub(checkpoints, tmp_path):
    result = subprocess.run([sys.executable, "-m", "swarm.apps.cli", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and re.fullmatch(r"cocoon \d+\.\d+\.\d+\n", result.stdout), result.stdout
    nobody = "/ip4/127.0.0.1/tcp/9/p2p/12D3KooWDNeeLMDiDZz3ah8kN1ZJcdo3t6W1ZmSKZcJx6xDtcgdZ"
    without_fastapi = "import sys; sys.modules['fastapi'] = None; from swarm.apps.cli import main; sys.exit(main())"
    result = subprocess.run([sys.executable, "-c", without_fastapi, "api", str(checkpoints("llama")),
                             "--initial-peers", nobody], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and result.stderr.strip() == (
        "cocoon api: error: cocoon api needs fastapi: pip install 'cocoon-swarm[api]' (or, in a clone, pip install "
        "-e '.[api]')"), result.stderr
    # no route to the hub: one line at once, not ~30 s of retries that end blaming config.json
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "swarm.apps.cli", "generate", "someorg/somemodel", "hi",
                             "--initial-peers", nobody], capture_output=True, text=True, timeout=60,
                            env={**{k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"},
                                 "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path)})
    assert result.returncode == 1 and result.stderr.strip().splitlines() == [
        "cocoon generate: error: 'someorg/somemodel' is not in the local hub cache, and the Hugging Face hub is "
        "unreachable (127.0.0.1:9: Connection refused): check this machine's network (or HF_ENDPOINT), or download "
        "the checkpoint elsewhere and give its directory"], result.stderr
    assert time.monotonic() - started < 20
    # a ./relative directory is a checkpoint (it gets as far as the swarm), never a hub repo id
    checkpoint = checkpoints("llama")
    result = subprocess.run([sys.executable, "-m", "swarm.apps.cli", "generate", f"./{checkpoint.name}", "hi",
                             "--initial-peers", nobody], capture_output=True, text=True, timeout=60,
                            cwd=checkpoint.parent, env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert result.returncode == 1 and "cannot reach any of --initial-peers" in result.stderr, result.stderr
    code, lines = cocoon_fails("serve", "someorg/somemodel", "--initial-peers", nobody, "--max-memory", "lots")
    assert code == 2 and lines[-1].endswith("argument --max-memory: expected a size such as 24GB or 512MB, got "
                                            "'lots'"), lines


def test_errors_are_one_line_with_advice_and_the_right_exit_code(checkpoints):
    path = str(checkpoints("llama"))
    nobody = "/ip4/127.0.0.1/tcp/9/p2p/12D3KooWDNeeLMDiDZz3ah8kN1ZJcdo3t6W1ZmSKZcJx6xDtcgdZ"
    code, lines = cocoon_fails("generate", "/no/such/model", "hi", "--initial-peers", nobody)
    assert code == 2 and lines == ["cocoon generate: error: no checkpoint at /no/such/model: give a local directory "
                                   "or a hub repo id (org/name)"], lines
    code, lines = cocoon_fails("generate", path, "hi", "--initial-peers", nobody)
    assert code == 1 and len(lines) == 1 and "cannot reach any of --initial-peers" in lines[0], lines
    code, lines = cocoon_fails("generate", path, "hi", "--initial-peers", "127.0.0.1:31337")
    assert code == 2 and "is not a peer's multiaddr" in lines[-1], lines
    for bad in ("3", "2:1", "a:b", "-1:5"):
        code, lines = cocoon_fails("serve", path, "--initial-peers", nobody, "--blocks", bad)
        assert code == 2 and "argument --blocks: expected A:B" in lines[-1], lines
    code, lines = cocoon_fails("serve", path, "--initial-peers", nobody, "--num-blocks", "0")
    assert code == 2 and lines[-1].endswith("argument --num-blocks: expected at least 1, got 0"), lines
    code, lines = cocoon_fails("generate", path, "hi", "--initial-peers", nobody, "--max-new-tokens", "0")
    assert code == 2 and lines[-1].endswith("argument --max-new-tokens: expected at least 1, got 0"), lines
    import socket
    with socket.socket() as taken:  # a port another process holds is named as such, before anything starts
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        for command in (["dht"], ["serve", path, "--initial-peers", nobody, "--blocks", "0:2"]):
            code, lines = cocoon_fails(*command, "--host", "127.0.0.1", "--port", port)
            assert code == 2 and lines == [f"cocoon {command[0]}: error: --port {port}: the port is taken on "
                                           f"127.0.0.1 (Address already in use): stop what holds it (another "
                                           f"cocoon?) or choose another port"], lines
    with LocalSwarm(path, [(0, 2)]) as swarm:
        code, lines = cocoon_fails("serve", path, "--initial-peers", *swarm.initial_peers, "--blocks", "2:9")
        assert code == 2 and lines[-1] == ("cocoon serve: error: --blocks 2:9 is outside the model's 4 blocks: use "
                                           "0 <= A < B <= 4"), lines
        code, lines = cocoon_fails("generate", path, "hi", "--initial-peers", *swarm.initial_peers)
        assert code == 1 and len(lines) == 1, lines
        assert lines[0].startswith("cocoon generate: error: no server holds block(s) 2-3 of 4; start a server"), lines


def test_dht_identity_gives_a_stable_peer_id(tmp_path):
    maddrs = []
    for run in range(2):
        process = subprocess.Popen([sys.executable, "-m", "swarm.apps.cli", "dht", "--host", "127.0.0.1", "--port", "0",
                                    "--identity", str(tmp_path / "dht.key"), "--maddr-file", str(tmp_path / "m")],
                                   stdout=subprocess.PIPE, text=True)
        assert "DHT running" in process.stdout.readline()
        maddrs.append((tmp_path / "m").read_text().split()[0])
        process.terminate()
        process.wait(30)
    assert maddrs[0].split("/p2p/")[1] == maddrs[1].split("/p2p/")[1]


def test_wallet_deploy_deposit_stake_earnings_redeem_release(tmp_path):
    env = {"COCOON_PASSPHRASE": "secret"}
    with DevNode() as node:
        for name in ("owner", "client", "server"):
            out = cocoon("wallet", "create", str(tmp_path / f"{name}.json"), env=env)
            address = out.split()[1]
            node.fund(address, 10**19)
        assert "balance 10000000000000000000 wei" in cocoon("wallet", "show", str(tmp_path / "server.json"),
                                                            "--chain-rpc", node.url, env=env)
        out = cocoon("chain", "deploy", "--chain-rpc", node.url, "--wallet", str(tmp_path / "owner.json"),
                     "--min-stake", "1000", "--withdrawal-delay", "0", env=env)
        contract = out.split()[2]
        common = ["--chain-rpc", node.url, "--contract", contract]
        assert "escrow" in cocoon("deposit", "5000000", *common, "--wallet", str(tmp_path / "client.json"), env=env)
        assert "stake" in cocoon("stake", "1000", *common, "--wallet", str(tmp_path / "server.json"), env=env)

        # a ledger as a server writes it, with a voucher from the client
        from incentives.contract import Settlement
        from incentives.credit import ServerLedger
        from incentives.ledger_file import write_ledger
        from incentives.metering import Prices
        from incentives.vouchers import Reservation, Voucher, sign
        from incentives.wallet import load_wallet
        client, server = (load_wallet(tmp_path / f"{n}.json", "secret") for n in ("client", "server"))
        settlement = Settlement(node.w3, contract)
        ledger = ServerLedger(server.address, Prices(100, 100), settlement.domain, 10**6, server)
        ledger.record(client.address, 3, tokens=30, blocks=4)
        voucher = Voucher(client.address, server.address, 3, 120, 12000)
        ledger.accept_voucher(voucher, sign(voucher, client.key, settlement.domain))
        reservation = Reservation(client.address, server.address, 3, 20000)  # the server never submitted it
        ledger.accept_reservation(client.address, 3, 20000, sign(reservation, client.key, settlement.domain))
        ledger_file = write_ledger(ledger)  # under COCOON_CACHE_DIR, a temporary directory in tests
        before = cocoon("earnings", str(ledger_file), "--chain-rpc", node.url, env=env)
        assert "120" in before and "12000" in before
        assert "12000 wei paid in all" in cocoon("redeem", str(ledger_file), *common, "--wallet",
                                                 str(tmp_path / "server.json"), env=env)
        row = cocoon("earnings", str(ledger_file), "--chain-rpc", node.url, env=env).splitlines()[-1].split()
        assert row[-3:] == ["12000", "12000", "0"]  # owed, paid, pending
        client_wallet = ["--wallet", str(tmp_path / "client.json")]
        assert "asked for the 8000 wei reserved" in cocoon("release", *common, *client_wallet, env=env)
        out = cocoon("release", *common, *client_wallet, env=env)  # the delay is 0 s on this contract
        assert "released 8000 wei" in out and f"escrow of {client.address}: {5000000 - 12000} wei" in out


def test_serve_options_from_a_yaml_file_environment_variables_and_the_command_line(checkpoints, tmp_path):
    """One server started with --config: YAML keys are the flags without dashes, COCOON_* variables win over
    the file, the command line over both; the server's info RPC shows what it runs with."""
    from shards import Checkpoint
    from swarm.client import loop
    from swarm.client.swarm_client import SwarmClient

    path = checkpoints("llama")
    config = tmp_path / "server.yaml"
    config.write_text("max-sessions: 5\nmax-length: 512\ncache-tokens: 999\npublic-name: from-yaml\n")
    with LocalSwarm(path, []) as swarm:
        server = swarm.add_server((0, 4), "--config", str(config), env={"COCOON_CACHE_TOKENS": "2048"})
        client = SwarmClient(swarm.initial_peers, Checkpoint(path).model_id, 30)
        try:
            info = loop.run(client.info(server.peer_id))
        finally:
            client.shutdown()
    assert (info["max_sessions"], info["max_length"], info["cache_tokens"]) == (5, 512, 2048)
    assert info["public_name"] == "server0"  # LocalSwarm's --public-name beats the file
