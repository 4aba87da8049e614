"""dss-serve on loopback: a student trained here answers OpenAI-style requests, bad requests get 4xx."""

import json
import socket
import subprocess
import sys
import time

import httpx
import pytest
from conftest import xla_env
from factories import tiny_t5

pytestmark = pytest.mark.slow  # trains models or runs CLIs in subprocesses


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def student(toy_student):
    return toy_student  # trained once per session (conftest.py)


@pytest.fixture(scope="module")
def server_and_log(student, tmp_path_factory):
    """A dss-serve subprocess on loopback (its decode programs compiled at start-up) and the file of its output."""
    port = free_port()
    log = tmp_path_factory.mktemp("serve_log") / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "dss_jax.serve",
                f"--model_dir={student}",
                f"--port={port}",
                "--max_batch=4",
                "--max_wait_ms=20",
            ],
            env=xla_env(1),
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600  # start-up compiles every decode program
    while time.time() < deadline:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.5)
        assert proc.poll() is None, log.read_text()
    else:
        proc.kill()
        pytest.fail("dss-serve did not come up in 600 s")
    yield url, log
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(server_and_log):
    return server_and_log[0]


def test_completions_equal_dss_infer_and_batch_concurrent_requests(server, student, tmp_path):
    inputs = ["plum apple pear", "banana lemon", "grape olive peach mango", "cherry pear"]
    f = tmp_path / "in.jsonl"
    f.write_text("".join(json.dumps({"input": x}) + "\n" for x in inputs))
    r = subprocess.run(
        [sys.executable, "-m", "dss_jax.infer", f"--model_dir={student}", f"--input={f}", "--rationales", "--no_progress"],
        env=xla_env(1),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    expected = [json.loads(x) for x in r.stdout.splitlines()]

    import concurrent.futures

    def ask(x):
        return httpx.post(server + "/v1/completions", json={"prompt": x, "rationale": True, "model": "student"}, timeout=120)

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(ask, inputs))
    for a, e in zip(answers, expected, strict=True):
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
    assert httpx.get(server + "/v1/models").json()["data"][0]["id"] == "student"


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
        # OpenAI fields dss-serve does not implement are refused by name, never silently ignored
        ("/v1/completions", {"prompt": "a", "echo": True}, 400, "'echo'"),
        ("/v1/completions", {"prompt": "a", "logprobs": 2}, 400, "'logprobs'"),
        ("/v1/completions", {"prompt": "a", "best_of": 3}, 400, "'best_of'"),
        ("/v1/completions", {"prompt": "a", "suffix": "x"}, 400, "'suffix'"),
        ("/v1/completions", {"prompt": "a", "presence_penalty": 0.5}, 400, "'presence_penalty'"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "logprobs": True}, 400, "'logprobs'"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "tools": []}, 400, "'tools'"),
        ("/v1/completions", {"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, 400, "'stop'"),
        ("/v1/completions", {"prompt": "a", "stream": "yes"}, 400, "'stream'"),
        # 400, not 500: an integer too large for a float, and a lone surrogate (not encodable text)
        ("/v1/completions", b'{"prompt": "a", "max_tokens": ' + b"9" * 400 + b"}", 400, "max_tokens"),
        ("/v1/completions", b'{"prompt": "plum \\ud800 pear"}', 400, "surrogate"),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\udfff"}]}', 400, "surrogate"),
    ],
)
def test_bad_requests_get_4xx_and_the_server_keeps_serving(server, path, body, status, words):
    kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(server + path, timeout=60, **kw)
    assert r.status_code == status, r.text
    assert words in r.json()["error"]["message"]
    ok = httpx.post(
        server + "/v1/completions", json={"prompt": "plum apple", "max_tokens": 4, "temperature": 0.7, "seed": 1}, timeout=60
    )
    assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] in ("stop", "length")


def test_noop_values_of_unsupported_fields_and_user_are_accepted(server):
    body = {"prompt": "plum apple", "echo": False, "best_of": 1, "frequency_penalty": 0, "logprobs": None, "user": "u1"}
    r = httpx.post(server + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text


def test_sampling_settings_never_compile_another_program(server):
    """Temperature, top_p, top_k, max_tokens and seed are per-row values: only the bucketed shapes compile, all of
    them at start-up, so 24 distinct settings add no program (and no client waits for another's compile)."""
    import concurrent.futures

    before = httpx.get(server + "/health").json()
    assert before["decode_programs"] == len(before["batch_sizes"]) * len(before["decode_lengths"])
    assert before["compiled_programs"] == before["decode_programs"]  # all compiled before serving

    def ask(i):
        body = {"prompt": ["plum apple pear", "lemon olive"][: 1 + i % 2], "temperature": 0.05 + 0.07 * i,
                "top_p": 0.3 + 0.025 * i, "top_k": i % 7, "max_tokens": 1 + i, "seed": 1000 + i}  # fmt: skip
        return httpx.post(server + "/v1/completions", json=body, timeout=120)

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(ask, range(24)))
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers if a.status_code != 200][:2]
    after = httpx.get(server + "/health").json()
    assert after["compiled_programs"] == before["compiled_programs"]


def test_a_seeded_sample_does_not_depend_on_what_shares_its_batch(server):
    """The same seeded request alone, and as the last row of a batch whose other rows share its settings."""
    settings = {"temperature": 2.0, "max_tokens": 12, "model": "student"}
    mine = "grape olive peach mango"
    for seed in (3, 11, 12345):
        alone = httpx.post(server + "/v1/completions", json={"prompt": mine, "seed": seed, **settings}, timeout=60).json()
        together = httpx.post(
            server + "/v1/completions", json={"prompt": ["plum apple", "lemon pear", mine], "seed": seed, **settings}, timeout=60
        ).json()
        assert together["choices"][2]["text"] == alone["choices"][0]["text"], seed


def test_streams_read_by_the_openai_client_concatenate_to_the_answer_and_stop_is_honoured(server):
    import openai

    client = openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=60)
    prompt = "grape olive peach mango"
    full = client.completions.create(model="student", prompt=prompt, max_tokens=16, extra_body={"rationale": True})
    text = full.choices[0].text
    assert text  # the stream below is compared with something
    chunks = list(client.completions.create(model="student", prompt=prompt, max_tokens=16, stream=True))
    assert len(chunks) >= 2 and "".join(c.choices[0].text for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason
    messages = [{"role": "user", "content": prompt}]
    chat = client.chat.completions.create(model="student", messages=messages, max_tokens=16)
    assert chat.choices[0].message.content == text
    stream = client.chat.completions.create(
        model="student", messages=messages, max_tokens=16, stream=True, stream_options={"include_usage": True}
    )
    parts = list(stream)
    assert "".join(p.choices[0].delta.content or "" for p in parts if p.choices) == text
    assert parts[-1].usage.completion_tokens == chat.usage.completion_tokens
    # stop: the text ends before the first stop string, with finish_reason "stop"
    stop = text[len(text) // 2 :][:2]
    cut = client.completions.create(model="student", prompt=prompt, max_tokens=16, stop=[stop, "\u00a7"])
    assert cut.choices[0].text == text[: text.find(stop)] and cut.choices[0].finish_reason == "stop"
    streamed_cut = client.completions.create(model="student", prompt=prompt, max_tokens=16, stop=stop, stream=True)
    pieces = list(streamed_cut)
    assert "".join(c.choices[0].text for c in pieces) == cut.choices[0].text and pieces[-1].choices[0].finish_reason == "stop"


def _raw_request(url: str, head: bytes, body: bytes, read: bool = True) -> bytes:
    import urllib.parse

    u = urllib.parse.urlparse(url)
    with socket.create_connection((u.hostname, u.port), timeout=30) as s:
        s.sendall(head + body)
        return s.recv(65536) if read else b""


def test_an_oversized_body_gets_413_before_it_is_read_whole(server):
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100000000\r\n\r\n"
    answer = _raw_request(server, head, b'{"prompt": "')  # 100 MB announced, a dozen bytes sent: no wait for the rest
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    ok = httpx.post(server + "/v1/completions", json={"prompt": "plum apple", "max_tokens": 2}, timeout=60)
    assert ok.status_code == 200


def test_a_client_that_leaves_mid_body_logs_one_quiet_line(server_and_log):
    url, log = server_and_log
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
    _raw_request(url, head, b'{"prompt": "plum', read=False)
    deadline = time.time() + 30
    while "disconnected" not in log.read_text() and time.time() < deadline:
        time.sleep(0.2)
    text = log.read_text()
    assert len([line for line in text.splitlines() if "disconnected" in line]) == 1, text[-3000:]
    assert "Traceback" not in text, text[-3000:]


def _one_error_line(r, prog):
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), r.stderr[-3000:]
    return lines[0]


def _cli(module, *args):
    return subprocess.run([sys.executable, "-m", module, *args], env=xla_env(1), capture_output=True, text=True, timeout=300)


def test_dss_serve_refuses_a_port_outside_0_to_65535(student):
    line = _one_error_line(_cli("dss_jax.serve", f"--model_dir={student}", "--port=70000"), "dss-serve")
    assert "--port" in line and "65535" in line


def test_dss_infer_refuses_nonpositive_sizes_in_one_line(student, tmp_path):
    inp = tmp_path / "in.txt"
    inp.write_text("plum apple\n")
    for flag in ("--batch_size=0", "--max_decode_length=-5"):
        line = _one_error_line(_cli("dss_jax.infer", f"--model_dir={student}", f"--input={inp}", flag), "dss-infer")
        assert flag.split("=")[0] in line


MODEL_DIR_DEFECTS = {
    "no_inference_json": ("inference.json", lambda d: (d / "inference.json").unlink()),
    "inference_json_list": ("inference.json", lambda d: (d / "inference.json").write_text("[]")),
    "inference_json_no_prefix": (
        "inference.json",
        lambda d: (d / "inference.json").write_text(json.dumps({"inputs_length": 32, "targets_length": 32})),
    ),
    "no_dss_config": ("dss_config.json", lambda d: (d / "dss_config.json").unlink()),
    "dss_config_bad_json": ("dss_config.json", lambda d: (d / "dss_config.json").write_text('{"d_model": ')),
    "dss_config_list": ("dss_config.json", lambda d: (d / "dss_config.json").write_text("[1]")),
    "garbage_spiece": ("spiece.model", lambda d: (d / "spiece.model").write_bytes(b"\x00garbage" * 50)),
    "no_spiece": ("spiece.model", lambda d: (d / "spiece.model").unlink()),
}


def _damaged_copy(student, tmp_path, defect):
    import shutil

    d = tmp_path / defect
    shutil.copytree(student, d, ignore=shutil.ignore_patterns("eval"))
    name, damage = MODEL_DIR_DEFECTS[defect]
    damage(d)
    return d, d / name


@pytest.mark.parametrize("defect", sorted(MODEL_DIR_DEFECTS))
def test_an_incomplete_model_dir_is_refused_naming_the_file_and_how_to_recreate_it(student, tmp_path, defect):
    """Never run degraded: without inference.json the model would see no task prefix (57/60 right became 16/60)."""
    from dss_jax.infer import ModelDirError, Predictor

    d, bad_file = _damaged_copy(student, tmp_path, defect)
    with pytest.raises(ModelDirError) as e:
        Predictor(d, batch_size=2)
    message = str(e.value)
    assert str(bad_file) in message and "dss-train" in message and "\n" not in message
    assert "dss-convert" not in message and "dss-eval" not in message


@pytest.mark.parametrize(
    "module, prog, defect",
    [
        ("dss_jax.serve", "dss-serve", "garbage_spiece"),
        ("dss_jax.serve", "dss-serve", "inference_json_list"),
        ("dss_jax.serve", "dss-serve", "dss_config_bad_json"),
        ("dss_jax.infer", "dss-infer", "no_inference_json"),
    ],
)
def test_clis_on_an_incomplete_model_dir_print_one_line(student, tmp_path, module, prog, defect):
    d, bad_file = _damaged_copy(student, tmp_path, defect)
    inp = tmp_path / "in.txt"
    inp.write_text("plum apple\n")
    extra = [f"--input={inp}"] if prog == "dss-infer" else ["--port=0"]
    line = _one_error_line(_cli(module, f"--model_dir={d}", *extra), prog)
    assert str(bad_file) in line


def test_a_missing_model_dir_is_named_without_unrelated_hints(tmp_path):
    from dss_jax.infer import ModelDirError, Predictor

    with pytest.raises(ModelDirError, match="no such model dir") as e:
        Predictor(tmp_path / "nope")
    assert "dss-convert" not in str(e.value)
    line = _one_error_line(_cli("dss_jax.evaluate", f"--model_dir={tmp_path / 'nope'}"), "dss-eval")
    assert "no such model dir" in line and "--trust_config_gin" not in line


def test_decode_rows_per_row_settings_match_uniform_ones_and_greedy():
    """decode_rows with temperature 0 is decode's greedy; a row's sample depends on its seed, not its neighbours."""
    import jax
    import numpy as np

    from dss_jax import decoding, model

    cfg = tiny_t5()
    params = model.init_params(cfg, jax.random.PRNGKey(0))
    ids = np.array([[5, 6, 7, 1], [9, 10, 1, 0], [11, 12, 13, 1]], np.int32)

    def rows(ids, seeds, temps, top_k, top_p, max_tokens):
        arr = [
            np.asarray(x, dt)
            for x, dt in ((seeds, np.uint32), (temps, np.float32), (top_k, np.int32), (top_p, np.float32), (max_tokens, np.int32))
        ]
        return np.asarray(decoding.decode_rows(params, ids, cfg, 8, *arr))

    greedy = np.asarray(decoding.decode(params, ids, cfg, 8))
    np.testing.assert_array_equal(rows(ids, [0, 0, 0], [0, 0, 0], [0, 0, 0], [1, 1, 1], [8, 8, 8]), greedy)
    mixed = rows(ids, [1, 2, 3], [0, 1.5, 1.5], [0, 0, 1], [1, 0.9, 1], [8, 3, 8])
    np.testing.assert_array_equal(mixed[0], greedy[0])  # temperature 0: greedy
    np.testing.assert_array_equal(mixed[2], greedy[2])  # top_k 1: greedy
    assert (mixed[1, 3:] == 0).all()  # max_tokens 3
    alone = rows(ids[1:2], [2], [1.5], [0], [0.9], [3])
    np.testing.assert_array_equal(alone[0], mixed[1])  # its seed alone decides its sample


def test_dss_infer_refuses_rationales_from_a_model_trained_without_them(student, tmp_path):
    import shutil

    d = tmp_path / "no_rationales"
    shutil.copytree(student, d)
    fmt = json.loads((d / "inference.json").read_text())
    (d / "inference.json").write_text(json.dumps({**fmt, "method": "standard", "label_prefix": "", "rationale_prefix": None}))
    inp = tmp_path / "in.txt"
    inp.write_text("plum apple\n")
    line = _one_error_line(_cli("dss_jax.infer", f"--model_dir={d}", f"--input={inp}", "--rationales"), "dss-infer")
    assert "--rationales" in line and str(d / "inference.json") in line
