"""The HTTP server on localhost with a real client (httpx): concurrent requests for different
adapters are batched together and answer what the library's single-adapter path computes; bad
input gets a 4xx naming the problem and the server keeps serving; adapters are listed, loaded
and unloaded. The client is the standard library's urllib (no extra dependency)."""

import concurrent.futures
import http.client
import json
import re
import socket
import threading
import time
import urllib.error
import urllib.request

import jax
import numpy as np
import pytest
import uvicorn

import loraxs_jax as lx
from loraxs_jax.models.generate import generate
from loraxs_jax.serving import AdapterBank, AdapterDirectory
from loraxs_jax.serving.engine import Engine, bucket
from loraxs_jax.serving.server import create_app


class Reply:
    def __init__(self, status: int, body: bytes):
        self.status_code, self.text = status, body.decode()

    def json(self):
        return json.loads(self.text)


class Client:
    """A tiny HTTP client over urllib: every answer (2xx or 4xx) comes back as a Reply."""

    def __init__(self, base_url: str, timeout: float = 120):
        self.base_url, self.timeout = base_url, timeout

    def request(self, method, path, json_body=None, content=None):
        data = content if content is not None else (
            None if json_body is None else json.dumps(json_body).encode())
        req = urllib.request.Request(self.base_url + path, data=data, method=method,
                                     headers={"content-type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                return Reply(r.status, r.read())
        except urllib.error.HTTPError as e:
            return Reply(e.code, e.read())

    def post(self, path, json=None, content=None, headers=None):
        return self.request("POST", path, json, content)

    def get(self, path):
        return self.request("GET", path)

    def delete(self, path):
        return self.request("DELETE", path)


def _serve(app):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(600):
        if server.started:
            break
        time.sleep(0.05)
    assert server.started
    return server, thread, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def decoder_server(decoder_zoo):
    z = decoder_zoo
    bank = AdapterBank(z.base, z.cfg, 4, source=AdapterDirectory(z.folder))   # LRU: 3 slots
    engine = Engine("decoder", z.model, z.tokenizer, bank, max_prompt_tokens=24,
                    max_new_tokens=8)
    app = create_app(engine, max_batch=8, max_wait_ms=300, max_inputs=4)
    server, thread, url = _serve(app)
    yield url, app
    server.should_exit = True
    thread.join(30)


@pytest.fixture(scope="module")
def encoder_server(encoder_zoo):
    z = encoder_zoo
    bank = AdapterBank(z.base, z.cfg, 4, source=AdapterDirectory(z.folder))
    engine = Engine("encoder", z.model, z.tokenizer, bank, max_prompt_tokens=32)
    server, thread, url = _serve(create_app(engine, max_batch=8, max_wait_ms=300))
    yield url
    server.should_exit = True
    thread.join(30)


def _post_all(url, path, bodies):
    c = Client(url, timeout=300)
    with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(lambda b: c.post(path, json=b), bodies))


def _library_completion(z, name, prompt, max_tokens):
    ids = np.asarray(z.tokenizer(prompt, add_special_tokens=False)["input_ids"])[None]
    if name == "base":
        out = generate(z.model.apply, z.base, z.config, ids, max_new_tokens=bucket(max_tokens))
    else:
        out = generate(lx.wrap(z.model.apply), z.alone(name), z.config, ids,
                       max_new_tokens=bucket(max_tokens))
    return z.tokenizer.decode(np.asarray(out[0, :max_tokens]).tolist(), skip_special_tokens=True)


def test_concurrent_completions_across_adapters_equal_the_library(decoder_server, decoder_zoo):
    url, app = decoder_server
    z = decoder_zoo
    bodies = [{"model": "a0", "prompt": "the cat sat on", "max_tokens": 5},
              {"model": "s2", "prompt": ["hello world", "a much longer prompt about films"],
               "max_tokens": 4},
              {"model": "a2", "prompt": "serving many adapters", "max_tokens": 6},
              {"model": "base", "prompt": "the cat sat on", "max_tokens": 5},
              {"model": "a1", "prompt": "one two three", "max_tokens": 3, "temperature": 0}]
    answers = _post_all(url, "/v1/completions", bodies)
    for body, r in zip(bodies, answers):
        assert r.status_code == 200, r.text
        data = r.json()
        assert data["object"] == "text_completion" and data["model"] == body["model"]
        prompts = [body["prompt"]] if isinstance(body["prompt"], str) else body["prompt"]
        assert len(data["choices"]) == len(prompts)
        for choice, prompt in zip(data["choices"], prompts):
            assert choice["finish_reason"] == "length"
            assert choice["text"] == _library_completion(z, body["model"], prompt,
                                                         body["max_tokens"])
        assert data["usage"]["completion_tokens"] == len(prompts) * body["max_tokens"]
    assert max(app.state.batcher.batches) > 1                 # requests were batched together
    texts = {r.json()["choices"][0]["text"] for r in answers[:1] + answers[3:4]}
    assert len(texts) == 2                                    # a0 and the base differ


def test_bad_input_gets_a_4xx_and_the_server_survives(decoder_server):
    url, _ = decoder_server
    long = " ".join(["word"] * 40)
    cases = [
        ({"content": b"{not json", "headers": {"content-type": "application/json"}}, 400,
         "malformed JSON"),
        ({"json": ["a list"]}, 400, "must be an object"),
        ({"json": {"model": "nope", "prompt": "x"}}, 404, "unknown adapter 'nope'"),
        ({"json": {"model": "../a0", "prompt": "x"}}, 404, "unknown adapter"),
        ({"json": {"model": "a0", "prompt": ["x"] * 5}}, 413, "at most 4"),
        ({"json": {"model": "a0", "prompt": long}}, 413, "at most 24"),
        ({"json": {"model": "a0", "prompt": "x", "max_tokens": 9}}, 413, r"outside \[1, 8\]"),
        ({"json": {"model": "a0", "prompt": "x", "stream": True}}, 422, "'stream'=True is not"),
        ({"json": {"model": "a0", "prompt": "x", "stop": ["."]}}, 422, "'stop'"),
        ({"json": {"model": "a0", "prompt": 3}}, 422, "'prompt' must be a string"),
        ({"json": {"model": "a0", "prompt": "x", "temperature": "hot"}}, 422, "must be a number"),
        ({"json": {"model": "a0", "prompt": "x", "colour": 1}}, 422, "unknown fields"),
    ]
    c = Client(url)
    for kw, status, message in cases:
        r = c.post("/v1/completions", **kw)
        assert r.status_code == status, (kw, r.text)
        err = r.json()["error"]
        assert err["code"] == status and re.search(message, err["message"])
    # an oversized body is refused from its Content-Length, before it is read
    conn = http.client.HTTPConnection(url.split("//")[1], timeout=60)
    conn.putrequest("POST", "/v1/completions")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(2 << 20))
    conn.endheaders()
    r = conn.getresponse()
    err = json.loads(r.read())["error"]
    assert r.status == 413 and err["message"] == "request body of 2097152 bytes exceeds 1048576"
    conn.close()
    assert c.post("/v1/classify", json={"model": "a0", "input": "x"}).status_code == 404
    assert c.get("/v1/nothing").status_code == 404
    assert c.get("/health").json()["status"] == "ok"
    ok = c.post("/v1/completions", json={"model": "a0", "prompt": "still here",
                                         "max_tokens": 2})
    assert ok.status_code == 200 and len(ok.json()["choices"]) == 1


def test_list_load_and_unload_adapters(decoder_server):
    url, _ = decoder_server
    c = Client(url)
    listed = c.get("/v1/models").json()
    assert {m["id"] for m in listed["data"]} == {"base", "a0", "a1", "a2", "s2"}
    r = c.post("/v1/adapters", json={"name": "a1"})
    assert r.status_code == 200 and r.json()["loaded"] is True
    info = c.get("/v1/adapters").json()
    assert {"name": "a1", "slot": r.json()["slot"], "pinned": True} in info["adapters"]
    assert info["bytes_per_adapter"] == 2 * 7 * 16 * 4
    assert c.delete("/v1/adapters/a1").json() == {"name": "a1", "loaded": False}
    assert c.delete("/v1/adapters/a1").status_code == 404
    assert c.delete("/v1/adapters/base").status_code == 422     # slot 0 stays
    assert c.post("/v1/adapters", json={"name": "zz"}).status_code == 404
    assert c.post("/v1/adapters", json={"name": "../x"}).status_code == 422


def test_concurrent_classification_equals_the_library(encoder_server, encoder_zoo):
    z = encoder_zoo
    bodies = [{"model": "e0", "input": ["a gripping, funny film", "dull"]},
              {"model": "e2", "input": "the cast is great"},
              {"model": "base", "input": "I loved it"},
              {"model": "e1", "input": ["not my kind of movie", "fine", "meh"]}]
    answers = _post_all(encoder_server, "/v1/classify", bodies)
    for body, r in zip(bodies, answers):
        assert r.status_code == 200, r.text
        texts = [body["input"]] if isinstance(body["input"], str) else body["input"]
        for row, text in zip(r.json()["data"], texts):
            tok = z.tokenizer([text], return_tensors="np")
            params = z.base if body["model"] == "base" else z.alone(body["model"])
            fn = z.model.apply if body["model"] == "base" else lx.wrap(z.model.apply)
            want = np.asarray(fn({"params": params}, tok["input_ids"], tok["attention_mask"]))[0]
            np.testing.assert_allclose(row["logits"], want, rtol=1e-5, atol=1e-5)
            assert row["label"] == int(np.argmax(want))
            np.testing.assert_allclose(row["probs"], np.asarray(jax.nn.softmax(want)), atol=1e-6)
    c = Client(encoder_server)
    assert c.post("/v1/completions", json={"model": "e0", "prompt": "x"}).status_code == 404
    r = c.post("/v1/classify", json={"model": "e0", "input": []})
    assert r.status_code == 422
