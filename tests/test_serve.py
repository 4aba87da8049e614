"""dss-serve on loopback: a student trained here answers OpenAI-style requests, bad requests get 4xx."""

import json
import socket
import subprocess
import sys
import time

import httpx
import pytest
from conftest import train_cmd, xla_env

pytestmark = pytest.mark.slow  # trains models or runs CLIs in subprocesses


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def student(tmp_path_factory, toy_jsonl):
    d = tmp_path_factory.mktemp("serve") / "toy_student"
    cmd = train_cmd(
        d, toy_jsonl, "--gin.TRAIN_STEPS=60", "--gin.train.train.eval_every=60", "--gin.train.train.checkpoint_every=60"
    )
    cmd += ["--gin.optim.learning_rate_schedule.base_learning_rate=3e-3"]
    r = subprocess.run(cmd, env=xla_env(1), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    return d


@pytest.fixture(scope="module")
def server(student):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "dss_jax.serve", f"--model_dir={student}", f"--port={port}", "--max_batch=8", "--max_wait_ms=20"],
        env=xla_env(1),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.5)
        assert proc.poll() is None, proc.stdout.read()
    else:
        proc.kill()
        pytest.fail("dss-serve did not come up in 120 s")
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def test_completions_equal_dss_infer_and_batch_concurrent_requests(server, student, tmp_path):
    inputs = ["plum apple pear", "banana lemon", "grape olive peach mango", "cherry pear"]
    f = tmp_path / "in.jsonl"
    f.write_text("".join(json.dumps({"input": x}) + "\n" for x in inputs))
    r = subprocess.run(
        [sys.executable, "-m", "dss_jax.infer", f"--model_dir={student}", f"--input={f}", "--rationales", "--no_progress"],
        env=xla_env(1),
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    expected = [json.loads(x) for x in r.stdout.splitlines()]

    import concurrent.futures

    def ask(x):
        return httpx.post(server + "/v1/completions", json={"prompt": x, "rationale": True, "model": "toy_student"}, timeout=120)

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(ask, inputs))
    for a, e in zip(answers, expected):
        assert a.status_code == 200, a.text
        c = a.json()["choices"][0]
        assert (c["text"], c["rationale"]) == (e["label"], e["rationale"])
        assert c["finish_reason"] in ("stop", "length")
    assert any(e["label"] for e in expected) and any(e["rationale"] for e in expected)  # not an empty-string match
    one = httpx.post(server + "/v1/completions", json={"prompt": inputs}, timeout=120).json()
    assert [c["text"] for c in one["choices"]] == [e["label"] for e in expected]
    chat = httpx.post(server + "/v1/chat/completions", json={"messages": [{"role": "user", "content": inputs[0]}]}, timeout=60)
    assert chat.json()["choices"][0]["message"]["content"] == expected[0]["label"]
    health = httpx.get(server + "/health").json()
    assert health["batches"] < health["rows"]  # concurrent rows shared batches
    assert httpx.get(server + "/v1/models").json()["data"][0]["id"] == "toy_student"


@pytest.mark.parametrize(
    "path, body, status, words",
    [
        ("/v1/completions", b"{not json", 400, "malformed JSON"),
        ("/v1/completions", b"[1, 2]", 400, "JSON object"),
        ("/v1/completions", {"prompt": "a", "model": "gpt-9"}, 404, "does not exist"),
        ("/v1/completions", {"prompt": "apple " * 200}, 400, "longer than"),
        ("/v1/completions", {"prompt": "a", "temperature": -1}, 400, "temperature"),
        ("/v1/completions", {"prompt": "a", "max_tokens": 0}, 400, "max_tokens"),
        ("/v1/completions", {"prompt": "a", "max_tokens": "ten"}, 400, "max_tokens"),
        ("/v1/completions", {"prompt": "a", "n": 3}, 400, "'n'"),
        ("/v1/completions", {"prompt": ""}, 400, "empty"),
        ("/v1/completions", {"prompt": 7}, 400, "prompt"),
        ("/v1/completions", {"prompt": "a", "rationale": "yes"}, 400, "rationale"),
        ("/v1/chat/completions", {"messages": []}, 400, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "system", "content": "x"}]}, 400, "user message"),
    ],
)
def test_bad_requests_get_4xx_and_the_server_keeps_serving(server, path, body, status, words):
    kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(server + path, timeout=60, **kw)
    assert r.status_code == status, r.text
    assert words in r.json()["error"]["message"]
    ok = httpx.post(server + "/v1/completions", json={"prompt": "plum apple", "max_tokens": 4, "temperature": 0.7, "seed": 1})
    assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] in ("stop", "length")
