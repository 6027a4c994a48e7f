"""`lorakit serve` over real HTTP on 127.0.0.1: a tiny LLaMA, a char-level tokenizer, two adapters."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import lorakit
from conftest import char_tokenizer, tiny_llama
from lorakit.adapters import randomize_adapters

httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")
tokenizers = pytest.importorskip("tokenizers")

from lorakit.serve import Engine, Job, RequestError, create_app  # noqa: E402

MAX_WAIT = 0.4  # seconds a batch waits for more requests: concurrent requests below arrive well within it
#: A chat template in the character tokenizer's alphabet; like real ones, it refuses some conversations.
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' and not loop.first %}"
    "{{ raise_exception('the system message must come first') }}{% endif %}"
    "{{ m['role'] }}: {{ m['content'] }}. {% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)


def offline(model, tokenizer, prompt: str, adapter: str | None, max_tokens: int) -> str:
    """Greedy completion of one prompt with one adapter (None: base), without the server."""
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    with torch.no_grad():
        if adapter is None:
            with lorakit.disable_adapters(model):
                out = model.generate(ids, max_new_tokens=max_tokens, do_sample=False, pad_token_id=0, eos_token_id=2)
        else:
            lorakit.set_adapter(model, adapter)
            out = model.generate(ids, max_new_tokens=max_tokens, do_sample=False, pad_token_id=0, eos_token_id=2)
    new = out[0, ids.shape[1]:].tolist()
    return tokenizer.decode(new[: new.index(2)] if 2 in new else new, skip_special_tokens=True)


@contextlib.contextmanager
def running(app):
    """The app served by uvicorn in a thread on a free loopback port; yields its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not srv.started and time.time() < deadline:
        time.sleep(0.02)
    assert srv.started, "server did not start"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(timeout=10)
        sock.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(base URL, model, tokenizer with a chat template, folder of a third adapter) with the server running in a thread."""
    tmp = tmp_path_factory.mktemp("serve")
    model, tok = tiny_llama(seed=3), char_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8), adapter="sql")
    lorakit.inject(model, lorakit.LoraConfig(r=8, alpha=8, target_modules="all-linear"), adapter="nli")
    lorakit.inject(model, lorakit.LoraConfig(r=2, alpha=4, use_rslora=True), adapter="extra")
    randomize_adapters(model, std=0.3, seed=4)
    lorakit.save_adapter(model, tmp / "extra", adapter="extra")
    lorakit.delete_adapter(model, "extra")
    with running(create_app(Engine(model, tok, max_new_tokens=32), max_batch=8, max_wait=MAX_WAIT)) as url:
        yield url, model, tok, tmp / "extra"


def post(url: str, path: str, **kwargs) -> httpx.Response:
    return httpx.post(url + path, timeout=30, **kwargs)


def complete(url: str, model: str, prompt, max_tokens: int = 8) -> httpx.Response:
    return post(url, "/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": max_tokens})


def chat(url: str, model: str, messages: list[dict], max_tokens: int | None = 8, **fields) -> httpx.Response:
    return post(url, "/v1/chat/completions", json={"model": model, "messages": messages, "max_tokens": max_tokens, **fields})


def templated(tok, messages: list[dict]) -> str:
    """The prompt text the chat endpoint should send: `messages` in the chat template, ending in the assistant's turn."""
    return tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


def test_health_and_models(server):
    url, *_ = server
    r = httpx.get(url + "/health", timeout=10)
    assert r.status_code == 200 and r.json()["status"] == "ok" and r.json()["models"] == ["base", "sql", "nli"]
    head = httpx.head(url + "/health", timeout=10)  # liveness probes send HEAD
    assert head.status_code == 200 and head.content == b""
    ids = [m["id"] for m in httpx.get(url + "/v1/models", timeout=10).json()["data"]]
    assert ids == ["base", "sql", "nli"]


def test_completion_matches_offline_generation(server):
    url, model, tok, _ = server
    expected = {name: offline(model, tok, "select the ", name, 8) for name in ("sql", "nli", None)}
    assert len(set(expected.values())) == 3  # the adapters do change the text
    for name, text in expected.items():
        r = complete(url, name or "base", "select the ")
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["object"] == "text_completion" and body["model"] == (name or "base")
        assert body["choices"][0]["text"] == text
        assert body["usage"]["prompt_tokens"] == len(tok("select the ")["input_ids"])


def test_concurrent_requests_for_different_adapters_share_a_batch(server):
    url, model, tok, _ = server
    prompts = [("sql", "count rows"), ("nli", "premise: a"), ("base", "hello you!"), ("sql", "join table")]
    expected = [offline(model, tok, p, None if a == "base" else a, 6) for a, p in prompts]
    batches, rows = metric(url, "lorakit_batches_total"), metric(url, "lorakit_batch_rows_total")
    with ThreadPoolExecutor(len(prompts)) as pool:
        responses = list(pool.map(lambda ap: complete(url, ap[0], ap[1], 6), prompts))
    assert [r.json()["choices"][0]["text"] for r in responses] == expected
    assert metric(url, "lorakit_batch_rows_total") - rows == 4
    assert metric(url, "lorakit_batches_total") - batches < 4  # requests were batched together


def test_prompt_list_is_one_request_with_several_choices(server):
    url, model, tok, _ = server
    r = complete(url, "nli", ["ab", "a longer prompt"], 5)
    assert r.status_code == 200
    texts = [c["text"] for c in r.json()["choices"]]
    assert texts == [offline(model, tok, p, "nli", 5) for p in ("ab", "a longer prompt")]


@pytest.mark.parametrize(
    "body, status, message",
    [
        ({"model": "nope", "prompt": "hi"}, 404, "does not exist"),
        ({"model": "sql", "prompt": "hi", "max_tokens": 1000}, 400, "exceeds this server's limit"),
        ({"model": "sql", "prompt": "x" * 60, "max_tokens": 20}, 400, "exceeds the context"),
        ({"model": "sql"}, 400, "prompt"),
        ({"model": "sql", "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
        ({"model": "sql", "prompt": "hi", "stream": True}, 400, "stream"),
        ({"model": "sql", "prompt": []}, 400, "list of 1..8"),
        ({"model": "sql", "prompt": "hi", "n": 2}, 400, "n"),
        ({"model": "sql", "prompt": "hi", "max_tokens": True}, 400, "max_tokens"),
        ({"model": "sql", "prompt": "hi", "stream": "yes"}, 400, "stream"),
        ({"model": "sql", "prompt": "hi", "temperature": "0.5"}, 400, "temperature: Input should be a valid number"),
        ({"model": "sql", "prompt": "hi", "top_p": "1"}, 400, "top_p: Input should be a valid number"),
        ({"model": "sql", "prompt": "hi", "temperature": True}, 400, "temperature: Input should be a valid number"),
        ({"model": "sql", "prompt": "hi", "logprobs": 5, "echo": True}, 400, "echo, logprobs not supported"),
        ({"model": "sql", "prompt": "hi", "presence_penalty": 0.5}, 400, "presence_penalty not supported"),
        ({"model": "sql", "prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 400, "up to 4 non-empty strings"),
        ({"model": "sql", "prompt": "hi", "stop": "x" * 257}, 400, "up to 256 characters"),
        ({"model": "sql", "prompt": "hi", "seed": 42, "temperature": 1.0}, 400, "seed not supported"),
        ({"model": "sql", "prompt": "hi", "temprature": 1.5}, 400, "temprature: Extra inputs are not permitted"),
        ({"model": "sql", "prompt": "x" * 6401}, 400, "6,401 characters, more than fit in the context of 64 tokens"),
    ],
)
def test_bad_requests_get_4xx_and_the_server_stays_up(server, body, status, message):
    url, *_ = server
    r = post(url, "/v1/completions", json=body)
    assert r.status_code == status and message in r.json()["error"]["message"], r.text
    assert httpx.get(url + "/health", timeout=10).status_code == 200


@pytest.mark.parametrize("prompt", ['"\\ud800"', '["ok", "\\udfff"]'])
def test_a_prompt_that_is_not_valid_text_is_a_400(server, prompt):
    url, *_ = server
    before = metric(url, 'lorakit_request_errors_total{status="400"}')
    r = post(url, "/v1/completions", content=f'{{"model": "sql", "prompt": {prompt}}}'.encode(),
             headers={"content-type": "application/json"})
    assert r.status_code == 400 and "is not valid text: surrogates not allowed" in r.json()["error"]["message"], r.text
    assert metric(url, 'lorakit_request_errors_total{status="400"}') == before + 1


def test_max_tokens_null_means_the_default_and_a_body_without_json_header_is_told_so(server):
    url, *_ = server
    r = post(url, "/v1/completions", json={"model": "sql", "prompt": "hi", "max_tokens": None})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 16, r.text
    nulls = dict.fromkeys(["temperature", "top_p", "n", "stream", "echo", "presence_penalty", "frequency_penalty",
                           "logprobs", "best_of", "suffix", "logit_bias", "stop", "seed", "stream_options"])
    r = post(url, "/v1/completions", json={"model": "sql", "prompt": "hi", "max_tokens": 4, **nulls, "user": "x"})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == complete(url, "sql", "hi", 4).json()["choices"][0]["text"]
    assert post(url, "/v1/completions", json={"model": "sql", "prompt": "hi", "best_of": True}).status_code == 400
    ints = post(url, "/v1/completions", json={"model": "sql", "prompt": "hi", "max_tokens": 4, "temperature": 0, "top_p": 1})
    assert ints.status_code == 200 and ints.json()["choices"] == r.json()["choices"], ints.text  # JSON ints are numbers
    r = post(url, "/v1/completions", content=b'{"model": "sql", "prompt": "hi"}', headers={"content-type": "text/plain"})
    assert r.status_code == 400 and "content-type: application/json" in r.json()["error"]["message"], r.text


def test_malformed_json_gets_400(server):
    url, *_ = server
    r = post(url, "/v1/completions", content=b'{"model": "sql", "prompt": ', headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    for body in (b"[" * 100_000 + b"]" * 100_000, b'{"model": "\xff\xfe"}'):  # nested too deeply; not UTF-8
        r = post(url, "/v1/completions", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400 and "could not be parsed as JSON (not UTF-8 text, or nested too deeply)" in r.json()["error"]["message"], r.text
    assert complete(url, "sql", "still fine").status_code == 200


@pytest.mark.parametrize(
    ("method", "path", "content", "status"),
    [("POST", "/v1/completions", b'{"model": "\xff\xfe"}', 400),  # not UTF-8: FastAPI's own parse error
     ("GET", "/v1/nowhere", b"", 404), ("PUT", "/v1/completions", b"{}", 405)],
)
def test_framework_errors_come_in_the_same_shape_and_are_counted(server, method, path, content, status):
    url, *_ = server
    before = metric(url, f'lorakit_request_errors_total{{status="{status}"}}')
    r = httpx.request(method, url + path, content=content, headers={"content-type": "application/json"}, timeout=10)
    assert r.status_code == status and r.json()["error"]["code"] == status and path in r.json()["error"]["message"]
    assert metric(url, f'lorakit_request_errors_total{{status="{status}"}}') == before + 1


def test_load_and_unload_adapters_at_run_time(server):
    url, model, tok, folder = server
    r = post(url, "/v1/adapters", json={"name": "extra", "path": str(folder)})
    assert r.status_code == 201 and "extra" in r.json()["adapters"]
    assert post(url, "/v1/adapters", json={"name": "extra", "path": str(folder)}).status_code == 409
    bad = post(url, "/v1/adapters", json={"name": "other", "path": str(folder / "missing")})
    assert bad.status_code == 400 and "does not exist" in bad.json()["error"]["message"]
    text = complete(url, "extra", "abc", 6).json()["choices"][0]["text"]
    assert text == offline(model, tok, "abc", "extra", 6)
    assert httpx.delete(url + "/v1/adapters/extra", timeout=10).status_code == 200
    assert "extra" not in lorakit.list_adapters(model)
    assert complete(url, "extra", "abc").status_code == 404
    assert httpx.delete(url + "/v1/adapters/extra", timeout=10).status_code == 404
    assert metric(url, "lorakit_adapters_loaded") == 2


def test_metrics_report_requests_errors_and_tokens(server):
    url, *_ = server
    complete(url, "sql", "metrics", 3)
    complete(url, "unknown-adapter", "metrics")
    text = httpx.get(url + "/metrics", timeout=10).text
    assert 'lorakit_requests_total{model="sql"}' in text
    assert metric(url, 'lorakit_request_errors_total{status="404"}') >= 1
    assert metric(url, "lorakit_completion_tokens_total") > 0


def test_an_adapter_unloaded_while_queued_fails_only_its_own_jobs():
    """The batcher checks adapters before the lock; a DELETE in between must not fail the whole batch."""
    model, tok = tiny_llama(seed=5), char_tokenizer()
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8), adapter="kept")
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8), adapter="gone")
    randomize_adapters(model, std=0.3, seed=6)
    engine = Engine(model, tok, max_new_tokens=8)
    jobs = [Job("kept", engine.encode(["abc"], 5), 5), Job("gone", engine.encode(["abc"], 5), 5), Job("base", engine.encode(["xy"], 5), 5)]
    engine.unload("gone")  # after the batcher's check, before generate takes the lock
    kept, gone, base = engine.generate(jobs)
    assert isinstance(gone, RequestError) and gone.status == 404 and "'gone' does not exist" in str(gone)
    assert kept[0][0] == offline(model, tok, "abc", "kept", 5)
    assert base[0][0] == offline(model, tok, "xy", None, 5)


def test_adapter_with_a_saved_head_served_and_deleted_leaves_the_base_as_it_was(server, tmp_path):
    url, model, tok, _ = server
    trained = tiny_llama(seed=3)
    lorakit.inject(trained, lorakit.LoraConfig(r=2, alpha=4, modules_to_save=["lm_head"]), adapter="head")
    randomize_adapters(trained, std=0.3, seed=7)
    with torch.no_grad():
        trained.lm_head.modules_to_save["head"].weight.mul_(-1)
    lorakit.save_adapter(trained, tmp_path, adapter="head")
    before = {n: complete(url, n, "abc", 6).json()["choices"][0]["text"] for n in ("base", "sql")}
    assert post(url, "/v1/adapters", json={"name": "head", "path": str(tmp_path)}).status_code == 201
    assert complete(url, "head", "abc", 6).json()["choices"][0]["text"] == offline(trained, tok, "abc", "head", 6)
    assert {n: complete(url, n, "abc", 6).json()["choices"][0]["text"] for n in ("base", "sql")} == before
    assert httpx.delete(url + "/v1/adapters/head", timeout=10).status_code == 200
    assert type(model.lm_head) is torch.nn.Linear
    assert {n: complete(url, n, "abc", 6).json()["choices"][0]["text"] for n in ("base", "sql")} == before


def test_adapter_names_with_dots_or_newlines_are_a_400(server):
    url, _, _, folder = server
    for name in ("v1.2", "nl\n"):
        r = post(url, "/v1/adapters", json={"name": name, "path": str(folder)})
        assert r.status_code == 400 and "must match" in r.json()["error"]["message"], r.text


def test_malformed_adapter_config_is_a_400(server, tmp_path):
    import json
    import shutil

    url, _, _, folder = server
    shutil.copytree(folder, tmp_path / "bad")
    config = json.loads((tmp_path / "bad" / "adapter_config.json").read_text())
    (tmp_path / "bad" / "adapter_config.json").write_text(json.dumps({**config, "target_modules": 5}))
    r = post(url, "/v1/adapters", json={"name": "bad", "path": str(tmp_path / "bad")})
    assert r.status_code == 400 and "target_modules must be a list of module names" in r.json()["error"]["message"], r.text


@pytest.mark.parametrize("spec, message", [("base=./x", "not be 'base'"), ("a b=./x", "must match"), ("v1.2=./x", "must match"),
                                           ("sql=./x", "given twice")])
def test_serve_cli_refuses_bad_adapter_names_before_loading(spec, message, capsys):
    from lorakit.cli import main

    extra = ["--adapter", "sql=./y"] if message == "given twice" else []
    assert main(["serve", "--model", "./no-model-needed", "--adapter", spec, *extra]) == 1
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("option, value", [("--port", "99999"), ("--max-batch", "0"), ("--max-tokens", "-1"),
                                           ("--max-wait-ms", "-5"), ("--max-context", "0"), ("--max-body-mb", "0")])
def test_serve_cli_refuses_out_of_range_options(option, value, capsys):
    from lorakit.cli import main

    with pytest.raises(SystemExit):
        main(["serve", "--model", "./no-model-needed", option, value])
    assert f"argument {option}: expected" in capsys.readouterr().err


def test_a_request_whose_client_left_while_queued_is_not_generated():
    """A client that times out while its job waits behind a running batch: the job is dropped, not run."""
    model, tok = tiny_llama(seed=5), char_tokenizer()
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8), adapter="a")
    engine, release, ran = Engine(model, tok, max_new_tokens=8), threading.Event(), []
    real = engine.generate

    def slow(jobs):
        ran.append([job.prompts for job in jobs])
        release.wait(10)
        return real(jobs)

    engine.generate = slow
    with running(create_app(engine, max_batch=1, max_wait=0.0)) as url, ThreadPoolExecutor(2) as pool:
        first = pool.submit(complete, url, "a", "abc")
        while not ran:
            time.sleep(0.01)
        with pytest.raises(httpx.TimeoutException):  # queued behind the first batch; the client gives up
            httpx.post(url + "/v1/completions", json={"model": "a", "prompt": "xy", "max_tokens": 4}, timeout=0.5)
        time.sleep(0.5)  # the server notices the disconnect within its poll interval
        release.set()
        assert first.result().status_code == 200
        assert complete(url, "a", "zz").status_code == 200
        assert metric(url, "lorakit_abandoned_requests_total") == 1
    assert ran == [[[tok("abc")["input_ids"]]], [[tok("zz")["input_ids"]]]]  # "xy" never reached the model


def test_stop_sequences_cut_the_text_and_a_tiny_temperature_is_greedy(server):
    url, model, tok, _ = server
    full = offline(model, tok, "ab", "sql", 12)
    stop = full[3:5]
    r = post(url, "/v1/completions", json={"model": "sql", "prompt": "ab", "max_tokens": 12, "stop": stop})
    choice = r.json()["choices"][0]
    assert choice["text"] == full[: full.index(stop)] and choice["finish_reason"] == "stop", r.text
    assert r.json()["usage"]["completion_tokens"] == len(tok(full[: full.index(stop) + len(stop)])["input_ids"])
    # overlapping stops: the one that completes first ends generation (as if streamed), even if another starts earlier
    late = full[1:8]
    i, j = next((i, j) for i in range(2, 7) for j in range(i + 1, 8) if full.find(full[i:j]) == i and full.find(late) == 1)
    early = full[i:j]  # starts after `late` starts, completes before `late` completes
    r = post(url, "/v1/completions", json={"model": "sql", "prompt": "ab", "max_tokens": 12, "stop": [late, early]})
    choice = r.json()["choices"][0]
    assert choice["text"] == full[:i] and r.json()["usage"]["completion_tokens"] == len(tok(full[:j])["input_ids"]), r.text
    r = post(url, "/v1/completions", json={"model": "sql", "prompt": "ab", "max_tokens": 12, "temperature": 1e-300})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == full, r.text  # it overflowed fp32: a 500


def test_an_unexpected_failure_is_a_500_in_openai_shape_and_counted(server, monkeypatch):
    url, *_ = server
    from lorakit import serve

    before = metric(url, 'lorakit_request_errors_total{status="500"}')
    monkeypatch.setattr(serve.Engine, "_complete", lambda self, jobs: 1 / 0)
    r = complete(url, "sql", "hi")
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error", r.text
    assert "ZeroDivisionError" in r.json()["error"]["message"]
    assert metric(url, 'lorakit_request_errors_total{status="500"}') == before + 1


def test_an_adapter_that_trains_base_biases_is_refused_and_leaves_the_model_as_it_was(tmp_path):
    """Its biases are the base model's own, so no mixed batch could hold it beside other adapters."""
    from conftest import tiny_gpt2

    trained = tiny_gpt2(seed=3)
    lorakit.inject(trained, lorakit.LoraConfig(r=2, alpha=4, bias="lora_only"), adapter="gb")
    randomize_adapters(trained, std=0.3, seed=1)
    with torch.no_grad():
        trained.transformer.h[0].attn.c_attn.bias.add_(1.0)
    lorakit.save_adapter(trained, tmp_path, adapter="gb")
    model = tiny_gpt2(seed=3)  # the first adapter on the server (with others there, load_adapter refuses it anyway)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    engine = Engine(model, char_tokenizer(), max_new_tokens=8)
    with pytest.raises(RequestError, match="changes the base model.s own weights.*trained biases") as info:
        engine.load("gb", str(tmp_path))
    assert info.value.status == 400 and engine.adapters() == ["base"]
    assert before.keys() == model.state_dict().keys() and all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_requests_that_fit_alone_but_not_together_run_in_separate_batches():
    """One generate runs every row to the longest prompt + the largest max_tokens: the batcher keeps that in the context."""
    import asyncio

    from lorakit.serve import Batcher

    model, tok = tiny_llama(seed=5), char_tokenizer()
    engine = Engine(model, tok, max_new_tokens=60, max_context=64)
    batcher = Batcher(engine, max_batch=8, max_wait=0.05)
    long_prompt = Job("base", engine.encode(["y" * 50], 10), 10)
    long_answer = Job("base", engine.encode(["y"], 60), 60)
    short = Job("base", engine.encode(["yy"], 5), 5)

    async def collect():
        for job in (long_prompt, long_answer, short):
            await batcher.queue.put(job)
        return await batcher._collect(), await batcher._collect()

    first, second = asyncio.run(collect())
    assert first == [long_prompt, short] and second == [long_answer]  # short still fits beside long_prompt


def test_a_request_that_samples_otherwise_waits_for_the_next_batch_without_cutting_this_one():
    """Interleaved greedy and sampled requests: each batch takes every queued request that samples like its first."""
    import asyncio

    from lorakit.serve import Batcher

    model, tok = tiny_llama(seed=5), char_tokenizer()
    engine = Engine(model, tok, max_new_tokens=8)
    batcher = Batcher(engine, max_batch=3, max_wait=0.05)
    jobs = [Job("base", engine.encode(["ab"], 4), 4, temperature=0.5 * (i % 2)) for i in range(7)]

    async def collect():
        for job in jobs:
            await batcher.queue.put(job)
        return [await batcher._collect() for _ in range(3)]

    greedy, sampled, rest = asyncio.run(collect())
    assert greedy == jobs[0:5:2] and sampled == jobs[1:6:2] and rest == [jobs[6]]  # arrival order kept within each


def test_the_default_max_tokens_fits_a_server_with_a_lower_limit():
    model, tok = tiny_llama(seed=5), char_tokenizer()
    with running(create_app(Engine(model, tok, max_new_tokens=8), max_batch=4, max_wait=0.01)) as url:
        r = post(url, "/v1/completions", json={"model": "base", "prompt": "hi"})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 8, r.text
        r = complete(url, "base", "hi", 9)
        assert r.status_code == 400 and "max_tokens=9 exceeds this server's limit of 8" in r.json()["error"]["message"]


def test_a_body_over_the_limit_is_a_413_before_it_is_read_and_the_server_stays_up():
    model, tok = tiny_llama(seed=5), char_tokenizer()
    with running(create_app(Engine(model, tok, max_new_tokens=8), max_batch=4, max_wait=0.01, max_body=2000)) as url:
        big = {"model": "base", "prompt": "y" * 3000, "max_tokens": 2}
        r = post(url, "/v1/completions", json=big)  # Content-Length says it
        assert r.status_code == 413 and "over this server's limit of 2000 bytes" in r.json()["error"]["message"], r.text
        chunks = (b'{"model": "base", "prompt": "', b"y" * 1500, b"y" * 1500, b'", "max_tokens": 2}')
        r = post(url, "/v1/completions", content=iter(chunks), headers={"content-type": "application/json"})  # chunked
        assert r.status_code == 413, r.text
        assert complete(url, "base", "y" * 10, 2).status_code == 200
        assert metric(url, 'lorakit_request_errors_total{status="413"}') == 2


def test_max_context_caps_a_request_and_cannot_exceed_the_model():
    model, tok = tiny_llama(seed=5), char_tokenizer()
    with pytest.raises(ValueError, match="between 1 and the model's context of"):
        Engine(model, tok, max_context=model.config.max_position_embeddings + 1)
    with running(create_app(Engine(model, tok, max_new_tokens=8, max_context=40), max_batch=4, max_wait=0.01)) as url:
        assert complete(url, "base", "y" * 30, 8).status_code == 200
        r = complete(url, "base", "y" * 40, 8)
        assert r.status_code == 400 and "exceeds this server's context of 40 tokens (--max-context)" in r.json()["error"]["message"], r.text
        r = post(url, "/v1/completions", json={"model": "base", "prompt": "y" * 30})  # no max_tokens: 10 fit, not 16
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 10, r.text
        r = post(url, "/v1/completions", json={"model": "base", "prompt": "y" * 45})  # no max_tokens and no room left
        message = r.json()["error"]["message"]
        assert r.status_code == 400 and "leaves no room for a completion" in message and "max_tokens=" not in message, r.text


def test_chat_completion_is_the_generation_on_the_templated_prompt(server):
    url, model, tok, _ = server
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "select the"}]
    prompt = templated(tok, messages)
    assert prompt == "system: be brief. user: select the. assistant:"
    for name in ("sql", "nli", None):
        r = chat(url, name or "base", messages)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["object"] == "chat.completion" and body["model"] == (name or "base") and body["id"].startswith("chatcmpl-")
        [choice] = body["choices"]
        assert choice["message"] == {"role": "assistant", "content": offline(model, tok, prompt, name, 8)}
        assert choice["finish_reason"] in ("stop", "length") and choice["index"] == 0
        assert body["usage"]["prompt_tokens"] == len(tok(prompt)["input_ids"])
        assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
    raw = complete(url, "sql", "select the").json()["choices"][0]["text"]  # /v1/completions: the text as it is
    assert raw == offline(model, tok, "select the", "sql", 8) != chat(url, "sql", messages[1:]).json()["choices"][0]["message"]["content"]


def test_chat_max_tokens_default_to_what_fits_and_max_completion_tokens_is_its_new_name(server):
    url, model, tok, _ = server
    messages = [{"role": "user", "content": "a long question that fills the context"}]
    prompt = templated(tok, messages)
    room = 64 - len(tok(prompt)["input_ids"])  # the tiny model's context is 64 tokens, the server's limit 32
    assert 0 < room < 32
    r = chat(url, "sql", messages, None)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= room, r.text
    assert r.json()["choices"][0]["message"]["content"] == offline(model, tok, prompt, "sql", room)
    r = chat(url, "sql", messages, None, max_completion_tokens=3)
    assert r.json()["choices"][0]["message"]["content"] == offline(model, tok, prompt, "sql", 3), r.text


def test_chat_and_completion_requests_share_a_batch(server):
    url, model, tok, _ = server
    messages = [{"role": "user", "content": "count rows"}]
    expected = [offline(model, tok, templated(tok, messages), "nli", 6), offline(model, tok, "count rows", "sql", 6)]
    batches, rows = metric(url, "lorakit_batches_total"), metric(url, "lorakit_batch_rows_total")
    with ThreadPoolExecutor(2) as pool:
        asked = pool.submit(chat, url, "nli", messages, 6), pool.submit(complete, url, "sql", "count rows", 6)
        replies = [r.result().json()["choices"][0] for r in asked]
    assert [replies[0]["message"]["content"], replies[1]["text"]] == expected
    assert metric(url, "lorakit_batch_rows_total") - rows == 2
    assert metric(url, "lorakit_batches_total") - batches == 1


def test_chat_without_a_chat_template_is_a_400_that_names_the_fix(server, monkeypatch):
    url, _, tok, _ = server
    monkeypatch.setattr(tok, "chat_template", None)
    r = chat(url, "sql", [{"role": "user", "content": "hi"}])
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", r.text
    assert "has no chat template" in r.json()["error"]["message"] and "/v1/completions" in r.json()["error"]["message"]
    assert complete(url, "sql", "hi").status_code == 200


USER = {"role": "user", "content": "hi"}


@pytest.mark.parametrize(
    "body, status, message",
    [
        ({"model": "sql"}, 400, "messages: Field required"),
        ({"model": "sql", "messages": None}, 400, "messages"),
        ({"model": "sql", "messages": []}, 400, "messages: List should have at least 1 item"),
        ({"model": "sql", "messages": "hi"}, 400, "messages: Input should be a valid list"),
        ({"model": "sql", "messages": [{"role": "user"}]}, 400, "messages.0.content: Field required"),
        ({"model": "sql", "messages": [{"role": "robot", "content": "x"}]}, 400, "messages.0.role: Input should be"),
        ({"model": "sql", "messages": [{"role": "user", "content": 5}]}, 400, "messages.0.content"),
        ({"model": "sql", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}, 400,
         "messages.0.content"),
        ({"model": "sql", "messages": [USER, {"role": "user", "content": "x", "name": "bob"}]}, 400,
         "messages.1.name: Extra inputs are not permitted"),
        ({"model": "sql", "messages": [USER, {"role": "system", "content": "late"}]}, 400,
         "the chat template refuses these messages: the system message must come first"),
        ({"model": "sql", "messages": [USER], "prompt": "hi"}, 400, "prompt: Extra inputs are not permitted"),
        ({"model": "nope", "messages": [USER]}, 404, "does not exist"),
        ({"model": "sql", "messages": [USER], "max_tokens": 1000}, 400, "exceeds this server's limit"),
        ({"model": "sql", "messages": [USER], "max_tokens": 4, "max_completion_tokens": 4}, 400, "not both"),
        ({"model": "sql", "messages": [{"role": "user", "content": "x" * 50}], "max_tokens": 8}, 400,
         "the templated conversation has"),
        ({"model": "sql", "messages": [USER], "stream": True}, 400, "stream"),
        ({"model": "sql", "messages": [USER], "n": 2}, 400, "n"),
        ({"model": "sql", "messages": [USER], "logprobs": True}, 400, "logprobs not supported"),
        ({"model": "sql", "messages": [USER], "tools": [{"type": "function"}]}, 400, "tools not supported"),
        ({"model": "sql", "messages": [USER], "response_format": {"type": "json_object"}}, 400, "response_format not supported"),
    ],
)
def test_bad_chat_requests_get_4xx_and_the_server_stays_up(server, body, status, message):
    url, *_ = server
    r = post(url, "/v1/chat/completions", json=body)
    assert r.status_code == status and message in r.json()["error"]["message"], r.text
    assert httpx.get(url + "/health", timeout=10).status_code == 200
    assert chat(url, "sql", [USER], 2).status_code == 200


def test_chat_takes_openai_nulls_and_defaults(server):
    url, model, tok, _ = server
    nulls = dict.fromkeys(["temperature", "top_p", "n", "stream", "stop", "seed", "logprobs", "top_logprobs", "tools",
                           "tool_choice", "response_format", "max_completion_tokens", "stream_options"])
    expected = offline(model, tok, templated(tok, [USER]), "sql", 4)
    for fields in (nulls, {"tools": [], "tool_choice": "none", "response_format": {"type": "text"}, "user": "x"}):
        r = chat(url, "sql", [USER], 4, **fields)
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == expected, r.text


def test_usage_counts_the_eos_token_that_ended_the_completion(monkeypatch):
    """OpenAI's usage counts every token generated, the stop token too; the text leaves it out."""
    model, tok = tiny_llama(seed=5), char_tokenizer()
    engine = Engine(model, tok, max_new_tokens=8)
    made = {"ends": tok.convert_tokens_to_ids(list("xy")) + [2, 0, 0, 0], "runs on": tok.convert_tokens_to_ids(list("xyzwvu"))}
    for row, expected in (("ends", ("xy", 3, "stop")), ("runs on", ("xyzwvu", 6, "length"))):
        monkeypatch.setattr(model, "generate", lambda ids, row=row, **kwargs: torch.cat([ids, torch.tensor([made[row]])], 1))
        assert engine.generate([Job("base", engine.encode(["ab"], 6), 6)]) == [[expected]]


@pytest.mark.parametrize("use_chat_template", [None, False])
def test_a_finetuned_adapter_records_its_chat_template_and_the_server_says_which_endpoint(
    server, tmp_path, caplog, use_chat_template
):
    """None (the default) uses the tokenizer's template; the server warns that such an adapter wants /v1/chat/completions."""
    import json

    url, model, tok, _ = server
    trained = tiny_llama(seed=3)  # the served base
    data = [{"prompt": "name a color", "completion": " red"}, {"prompt": "name a fruit", "completion": " fig"}]
    cfg = lorakit.TrainConfig(steps=2, batch_size=2, lr=1e-2, precision="fp32", use_chat_template=use_chat_template)
    lorakit.finetune(trained, tok, data, config=cfg, out_dir=tmp_path)
    used = json.loads((tmp_path / "run_finished.json").read_text())["used_chat_template"]
    assert used is (use_chat_template is None)
    caplog.set_level("WARNING", logger="lorakit.serve")
    assert post(url, "/v1/adapters", json={"name": "tuned", "path": str(tmp_path)}).status_code == 201
    try:
        warned = [r.getMessage() for r in caplog.records if r.name == "lorakit.serve"]
        assert warned == (["adapter 'tuned' was trained on prompts in the tokenizer's chat template: send its requests to "
                           "/v1/chat/completions (/v1/completions passes the prompt to the model as it is)"] if used else [])
        messages = [{"role": "user", "content": "name a color"}]
        r = chat(url, "tuned", messages, 6)
        assert r.json()["choices"][0]["message"]["content"] == offline(model, tok, templated(tok, messages), "tuned", 6)
    finally:
        assert httpx.delete(url + "/v1/adapters/tuned", timeout=10).status_code == 200


def test_an_adapter_with_nan_weights_is_a_400_and_never_joins_a_batch(server, tmp_path):
    import shutil

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    url, _, _, folder = server
    shutil.copytree(folder, tmp_path / "nan")
    file = tmp_path / "nan" / "adapter_model.safetensors"
    tensors = load_file(file)
    next(t for k, t in tensors.items() if "lora_A" in k).view(-1)[0] = float("nan")
    save_file(tensors, file, metadata=safe_open(file, "pt").metadata())
    r = post(url, "/v1/adapters", json={"name": "nan", "path": str(tmp_path / "nan")})
    assert r.status_code == 400 and "values are NaN or inf" in r.json()["error"]["message"], r.text
    assert "nan" not in [m["id"] for m in httpx.get(url + "/v1/models", timeout=10).json()["data"]]
    r = post(url, "/v1/completions", json={"model": "sql", "prompt": "ab", "max_tokens": 3, "temperature": 0.8})
    assert r.status_code == 200, r.text
