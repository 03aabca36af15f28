"""The swarm over HTTP: `cocoon api` used by the official `openai` client over a live swarm of SmolLM2, its
error objects, the monitor page in a real browser (Debian's Chromium), and servers' Prometheus metrics."""
import shutil
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoTokenizer

from swarm import AutoDistributedModelForCausalLM
from swarm.client import loop
from swarm.client.swarm_client import SwarmClient
from swarm.apps.local_swarm import LocalSwarm, SwarmProcess

pytestmark = pytest.mark.slow
NAME = "SmolLM2-135M-Instruct"
QUESTIONS = ["What is the capital of France?", "What is 2 + 2?", "Name a fruit.", "What color is the sky?",
             "Who wrote Hamlet?", "What is water made of?", "Name a planet.", "How many legs does a cat have?"]


def start_api(swarm, path, *extra) -> tuple[SwarmProcess, str]:
    api = SwarmProcess(["api", str(path), "--initial-peers", *swarm.initial_peers, "--port", "0", "--exact-wire",
                        *extra], "api")
    line = api.wait_for("API ready", 180)
    return api, line.split("API ready: ")[1].split("/v1")[0]


@pytest.fixture(scope="module")
def served(smollm2):
    path = smollm2["float32"]
    with LocalSwarm(path, [(0, 15), (15, 30)], server_args=["--metrics-port", "0"]) as swarm:
        api, url = start_api(swarm, path, "--api-key", "sesame")
        client = openai.OpenAI(base_url=url + "/v1", api_key="sesame", max_retries=0)
        watcher = SwarmClient(swarm.initial_peers, _model_id(path), 30)
        yield swarm, api, url, client, watcher, path
        watcher.shutdown()
        api.stop()


def _model_id(path) -> str:
    from shards import Checkpoint
    return Checkpoint(path).model_id


def sessions_on_servers(watcher) -> int:
    return sum(loop.run(watcher.info(peer))["sessions"] for peer in watcher.swarm_state(refresh=True).online())


def ask(client, question, **kwargs):
    return client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": question}],
                                          **{"temperature": 0, "max_tokens": 24, **kwargs})


def test_chat_and_completions_equal_generate_in_python(served):
    swarm, api, url, client, watcher, path = served
    assert [m.id for m in client.models.list().data] == [NAME]
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers, exact_wire=True)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": QUESTIONS[0]}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    output = model.generate(ids, max_new_tokens=24, do_sample=False)
    expected = tokenizer.decode(output[0, ids.shape[1]:], skip_special_tokens=True)

    reply = ask(client, QUESTIONS[0])
    assert reply.choices[0].message.content == expected and "Paris" in expected
    assert reply.usage.prompt_tokens == ids.shape[1] and reply.usage.completion_tokens == output.shape[1] - ids.shape[1]
    assert reply.choices[0].finish_reason == "stop"
    chunks = list(ask(client, QUESTIONS[0], stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"

    prompt = "The capital of France is"
    prompt_ids = tokenizer(prompt, return_tensors="pt").input_ids
    expected = tokenizer.decode(model.generate(prompt_ids, max_new_tokens=8, do_sample=False)[0, prompt_ids.shape[1]:],
                                skip_special_tokens=True)
    completion = client.completions.create(model=NAME, prompt=prompt, temperature=0, max_tokens=8)
    assert completion.choices[0].text == expected and completion.usage.completion_tokens == 8
    streamed = client.completions.create(model=NAME, prompt=prompt, temperature=0, max_tokens=8, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == expected
    model.shutdown()

    seeded = [ask(client, "Tell me a story.", seed=7).choices[0].message.content for _ in range(2)]
    sampled = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Tell me a story."}],
                                             temperature=0.9, top_p=0.9, seed=7, max_tokens=16)
    again = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Tell me a story."}],
                                           temperature=0.9, top_p=0.9, seed=7, max_tokens=16)
    assert seeded[0] == seeded[1] and sampled.choices[0].message.content == again.choices[0].message.content
    stopped = ask(client, "Count from 1 to 10.", stop=["5"])
    assert "5" not in stopped.choices[0].message.content and stopped.choices[0].finish_reason == "stop"


def test_eight_concurrent_streams_interleave_and_each_equals_its_solo_run(served):
    swarm, api, url, client, watcher, path = served
    solo = {q: ask(client, q).choices[0].message.content for q in QUESTIONS}
    results, arrivals, peak = {}, {}, [0]

    def stream(question):
        pieces, times = [], []
        for chunk in ask(client, question, stream=True):
            pieces.append(chunk.choices[0].delta.content or "")
            times.append(time.monotonic())
        results[question], arrivals[question] = "".join(pieces), times

    threads = [threading.Thread(target=stream, args=(q,)) for q in QUESTIONS]
    for thread in threads:
        thread.start()
    while any(t.is_alive() for t in threads):
        peak[0] = max(peak[0], sessions_on_servers(watcher))
        time.sleep(0.05)
    assert results == solo
    assert peak[0] >= 2 * 4  # at least 4 streams had sessions open on both servers at once
    first_done = min(max(times) for times in arrivals.values())
    assert sum(min(times) < first_done for times in arrivals.values()) >= 4  # not one after another


def test_a_client_that_hangs_up_mid_stream_frees_its_sessions(served):
    swarm, api, url, client, watcher, path = served
    deadline = time.monotonic() + 30
    while sessions_on_servers(watcher) and time.monotonic() < deadline:
        time.sleep(0.2)
    stream = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Write a long story."}],
                                            temperature=0, max_tokens=200, stream=True)
    for i, _ in enumerate(stream):
        if i == 3:
            break
    assert sessions_on_servers(watcher) == 2
    stream.close()
    deadline = time.monotonic() + 15
    while sessions_on_servers(watcher) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert sessions_on_servers(watcher) == 0


def test_errors_are_openai_error_objects_with_the_right_status(served, checkpoints):
    swarm, api, url, client, watcher, path = served
    cases = [(openai.BadRequestError, 400, dict(temperature=5)), (openai.BadRequestError, 400, dict(n=2)),
             (openai.BadRequestError, 400, dict(max_tokens=0)), (openai.NotFoundError, 404, dict(model="gpt-4"))]
    for error, status, kwargs in cases:
        with pytest.raises(error) as caught:
            client.chat.completions.create(**{"model": NAME, "messages": [{"role": "user", "content": "hi"}],
                                              **kwargs})
        assert caught.value.status_code == status and caught.value.body["message"] and "type" in caught.value.body
    with pytest.raises(openai.AuthenticationError) as caught:
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert caught.value.status_code == 401
    assert urllib.request.urlopen(url + "/health").status == 200  # no key needed

    random = checkpoints("llama")
    with LocalSwarm(random, [(0, 2)]) as gappy:  # blocks 2 and 3 have no server
        gap_api, gap_url = start_api(gappy, random, "--timeout", "3")
        try:
            gap = openai.OpenAI(base_url=gap_url + "/v1", api_key="none", max_retries=0)
            with pytest.raises(openai.InternalServerError) as caught:
                gap.completions.create(model=Path(random).name, prompt="hi", max_tokens=4)
            assert caught.value.status_code == 503 and "no server holds block(s) 2-3" in caught.value.body["message"]
            late = gappy.add_server((2, 4))
            late.signal(signal.SIGSTOP)  # holds blocks 2-3 and answers nothing
            try:
                with pytest.raises(openai.APIStatusError) as caught:
                    gap.completions.create(model=Path(random).name, prompt="hi", max_tokens=4)
                assert caught.value.status_code == 504 and caught.value.body["type"] == "timeout"
            finally:
                late.signal(signal.SIGCONT)
        finally:
            gap_api.stop()


def test_server_metrics_count_tokens_as_they_are_served(served):
    swarm, api, url, client, watcher, path = served
    port = next(int(line.rsplit(":", 1)[1].split("/")[0]) for line in swarm.servers[0].output if "Metrics:" in line)

    def served_tokens():
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
        families = {f.name: f for f in text_string_to_metric_families(text)}
        total = {s.labels["rpc"]: s.value for s in families["cocoon_block_tokens"].samples if s.name.endswith("_total")}
        requests = sum(s.value for s in families["cocoon_requests"].samples if s.name.endswith("_total"))
        return total.get("inference", 0), requests

    before, requests_before = served_tokens()
    reply = ask(client, QUESTIONS[1])
    after, requests_after = served_tokens()
    tokens = reply.usage.prompt_tokens + reply.usage.completion_tokens - 1  # the last token is not fed back
    assert after - before == tokens * 15 and requests_after > requests_before


def test_speculative_decoding_behind_the_api_answers_the_same_and_counts_drafted_tokens(served):
    """`cocoon api --prompt-lookup 4`: an answer that copies its prompt comes several tokens per trip through the
    swarm; usage says how many drafted tokens were accepted, and so do the servers' metrics."""
    swarm, api, url, client, watcher, path = served
    question = "Repeat this sentence exactly: the quick brown fox jumps over the lazy dog near the river bank."
    plain = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": question}],
                                           temperature=0, max_tokens=32)
    fast_api, fast_url = start_api(swarm, path, "--prompt-lookup", "4")
    try:
        fast = openai.OpenAI(base_url=fast_url + "/v1", api_key="-", max_retries=0)
        port = next(int(line.rsplit(":", 1)[1].split("/")[0]) for line in swarm.servers[1].output if "Metrics:" in line)
        before = _draft_metrics(port)
        reply = fast.chat.completions.create(model=NAME, messages=[{"role": "user", "content": question}],
                                             temperature=0, max_tokens=32)
        after = _draft_metrics(port)
    finally:
        fast_api.stop()
    assert reply.choices[0].message.content == plain.choices[0].message.content
    assert "quick brown fox" in reply.choices[0].message.content
    details = reply.usage.completion_tokens_details
    assert details.accepted_prediction_tokens >= 4 and details.rejected_prediction_tokens >= 0
    assert after["proposed"] > before["proposed"] and after["accepted"] - before["accepted"] >= 4


def test_openai_forms_penalties_and_what_is_not_supported(served):
    """Content as a list of parts (OpenAI's own form), neutral values of unsupported fields accepted, others refused
    with a 400; frequency and presence penalties change the answer; malformed JSON and unknown routes get OpenAI
    error objects."""
    swarm, api, url, client, watcher, path = served
    question = "Name three colors."
    plain = ask(client, question)
    parts = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": [
        {"type": "text", "text": "Name three "}, {"type": "text", "text": "colors."}]}], temperature=0, max_tokens=24,
        tools=[], n=1, frequency_penalty=0, presence_penalty=0, tool_choice="none")
    assert parts.choices[0].message.content == plain.choices[0].message.content
    counting = "Count from 1 to 20."  # the same tokens again and again: what the penalties push down
    penalised = ask(client, counting, frequency_penalty=2.0, presence_penalty=2.0).choices[0].message.content
    unpenalised = ask(client, counting).choices[0].message.content
    assert penalised != unpenalised and unpenalised.count("\n") > penalised.count("\n")
    tool = {"type": "function", "function": {"name": "weather", "parameters": {"type": "object", "properties": {}}}}
    for extra, field in ((dict(tools=[tool]), "tools"), (dict(logit_bias={"42": 5}), "logit_bias")):
        with pytest.raises(openai.BadRequestError) as refused:
            ask(client, question, **extra)
        assert refused.value.body["param"] == field and "not supported" in refused.value.body["message"]

    def raw(method, route, body=None):
        request = urllib.request.Request(url + route, data=body, method=method, headers={
            "Authorization": "Bearer sesame", "Content-Type": "application/json"})
        try:
            urllib.request.urlopen(request)
        except urllib.error.HTTPError as e:
            import json
            return e.code, json.loads(e.read())["error"]
    code, error = raw("POST", "/v1/chat/completions", b'{"messages": [')
    assert code == 400 and error["message"].startswith("the request body is not valid JSON")
    code, error = raw("GET", "/v1/nothing-here")
    assert code == 404 and error["message"].startswith("no route /v1/nothing-here")
    code, error = raw("GET", "/v1/chat/completions")
    assert code == 405 and error["type"] == "invalid_request_error"


def test_logprobs_are_the_models_own(served):
    """logprobs/top_logprobs, in chat's and completions' forms, equal those of transformers on the same weights."""
    from transformers import AutoModelForCausalLM
    swarm, api, url, client, watcher, path = served
    tokenizer = AutoTokenizer.from_pretrained(path)
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)

    def expected(prompt_ids: list[int], new_ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            logits = local(torch.tensor([prompt_ids + new_ids])).logits[0, len(prompt_ids) - 1:-1]
        return torch.log_softmax(logits, dim=-1)

    question = QUESTIONS[0]
    reply = ask(client, question, logprobs=True, top_logprobs=3, max_tokens=8)
    content = reply.choices[0].logprobs.content
    prompt_ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                               return_dict=True)["input_ids"]
    new_ids = [tokenizer.convert_tokens_to_ids(tokenizer.tokenize(e.token))[0] for e in content]
    assert tokenizer.decode(new_ids, skip_special_tokens=True) == reply.choices[0].message.content
    truth = expected(prompt_ids, new_ids)
    for i, entry in enumerate(content):
        assert abs(entry.logprob - truth[i, new_ids[i]].item()) < 1e-3
        assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].token == entry.token  # greedy: the likeliest
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(truth[i].topk(3).values.tolist(), abs=1e-3)
        assert entry.bytes == list(entry.token.encode())
    streamed = list(ask(client, question, logprobs=True, max_tokens=8, stream=True))
    assert [e.logprob for e in streamed[-1].choices[0].logprobs.content] == pytest.approx(
        [e.logprob for e in content], abs=1e-4)

    prompt = "The capital of France is"
    completion = client.completions.create(model=NAME, prompt=prompt, temperature=0, max_tokens=6, logprobs=2)
    logprobs = completion.choices[0].logprobs
    prompt_ids = tokenizer(prompt).input_ids
    new_ids = tokenizer(prompt + completion.choices[0].text).input_ids[len(prompt_ids):]
    assert "".join(logprobs.tokens) == completion.choices[0].text and len(new_ids) == len(logprobs.tokens)
    truth = expected(prompt_ids, new_ids)
    assert logprobs.token_logprobs == pytest.approx([truth[i, t].item() for i, t in enumerate(new_ids)], abs=1e-3)
    assert all(len(top) == 2 for top in logprobs.top_logprobs)
    assert logprobs.text_offset[0] == 0 and logprobs.text_offset[1] == len(logprobs.tokens[0])


def _draft_metrics(port: int) -> dict[str, float]:
    families = {f.name: f for f in text_string_to_metric_families(
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode())}
    return {s.labels["outcome"]: s.value for s in families["cocoon_draft_tokens"].samples}


def test_server_metrics_say_how_decode_steps_run(served):
    swarm = served[0]
    port = next(int(line.rsplit(":", 1)[1].split("/")[0]) for line in swarm.servers[0].output if "Metrics:" in line)
    ready = next(line for line in swarm.servers[0].output if "Server ready" in line)
    families = {f.name: f for f in text_string_to_metric_families(
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode())}
    labels = families["cocoon_decode_plan_info"].samples[0].labels
    assert f"decode path {labels['path']}:{labels['threads']}:{labels['policy']}" in ready  # as in the ready line
    assert labels["path"] in ("plain", "packed") and float(labels["step_ms"]) > 0


def chromium(*args) -> subprocess.CompletedProcess:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    assert binary, "Debian's chromium is missing: `make test` installs it (as root)"
    return subprocess.run([binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                           "--disable-background-networking", "--disable-component-update", "--disable-sync",
                           "--virtual-time-budget=8000", *args], capture_output=True, text=True, timeout=120)


def test_the_monitor_page_in_a_real_browser(smollm2, tmp_path):
    """The page as Chromium renders it: the model's announced name, a legend, holder counts per block, totals,
    reachability, charts of the last hour, a server that left with when it was last seen; /health and /metrics."""
    import json
    import os
    import re
    path = smollm2["float32"]
    with LocalSwarm(path, [(0, 15), (15, 30), (0, 30)], server_args=["--announce-period", "2"]) as swarm:
        monitor = SwarmProcess(["monitor", "--initial-peers", *swarm.initial_peers, "--port", "0", "--period", "1"],
                               "monitor")
        try:
            url = monitor.wait_for("Monitor ready", 120).split("Monitor ready: ")[1].split()[0]

            def state_when(ready, what: str) -> dict:
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    state = json.loads(urllib.request.urlopen(url + "api/v1/state").read())
                    if state["models"] and ready(state["models"][0]):
                        return state
                    time.sleep(1)
                raise AssertionError(f"the monitor never showed {what}: {state}")

            state = state_when(lambda m: len(m["servers"]) == 3, "3 servers")
            (model,) = state["models"]
            assert model["num_blocks"] == 30 and model["missing_blocks"] == [] and model["holders"] == [2] * 30
            assert model["name"] == "SmolLM2-135M-Instruct" and not model["names_disagree"]
            assert model["totals"]["servers_online"] == 3 and model["totals"]["tokens_per_s"] > 0
            health = json.loads(urllib.request.urlopen(url + "health").read())
            assert health["status"] == "ok" and health["models"] == 1
            time.sleep(2)  # a second point of history for the charts
            dom = chromium("--dump-dom", url, f"--user-data-dir={tmp_path / 'profile'}").stdout
            for server in swarm.servers:
                row = dom.split(f'data-peer="{server.peer_id}"')[1].split("</tr>")[0]
                span = next(l for l in server.output if "Server ready" in l).split("[")[1].split(")")[0]
                assert f'<td class="span">{span.replace(", ", ":")}</td>' in row and '<td class="state">online</td>' in row
                assert server.name in row and '<td class="reachability">direct</td>' in row
            assert '<span class="model-name">SmolLM2-135M-Instruct</span>' in dom and "every block is served" in dom
            assert 'id="legend"' in dom and "online holders per block" in dom
            holders = dom.split('<tr class="holders">')[1].split("</tr></table></td></tr>")[0]
            assert re.findall(r'title="block \d+: (\d) online holder\(s\)">(\d)<', holders) == [("2", "2")] * 30
            assert "<b>3</b> of 3 servers online" in dom
            for chart in ("chart-tokens", "chart-servers"):
                assert re.search(f'<svg id="{chart}"[^>]*><polyline points="[0-9., ]+', dom), chart
            shot = Path(os.environ.get("COCOON_MONITOR_SCREENSHOT", tmp_path / "monitor.png"))
            chromium(f"--screenshot={shot.resolve()}", "--window-size=1500,760", url,
                     f"--user-data-dir={tmp_path / 'p2'}")
            assert shot.exists() and shot.stat().st_size > 10_000

            leaving = swarm.servers[2]  # blocks 0:30: the others still cover every block, each once
            leaving.stop()
            state = state_when(lambda m: m["departed"], "a server that left")
            (model,) = state["models"]
            assert [d["peer_id"] for d in model["departed"]] == [leaving.peer_id] and model["holders"] == [1] * 30
            dom = chromium("--dump-dom", url, f"--user-data-dir={tmp_path / 'p3'}").stdout
            departed = dom.split('<table class="departed">')[1].split("</table>")[0]
            assert f'data-peer="{leaving.peer_id}"' in departed and re.search(r'class="last-seen">\d+ s ago<', departed)
            metrics = urllib.request.urlopen(url + "metrics").read().decode()
            families = {f.name: f for f in text_string_to_metric_families(metrics)}
            online = [s for s in families["cocoon_servers"].samples if s.labels["state"] == "online"]
            assert online[0].value == 2
        finally:
            monitor.stop()
