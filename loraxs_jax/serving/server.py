"""An HTTP server for many adapters of one base: ``loraxs-serve --model BASE --adapters DIR``.

Starlette (the ASGI toolkit FastAPI is built on: small, typed, one dependency) on Uvicorn (the
reference ASGI server, pure-Python h11 parser, graceful shutdown). Both are maintained by the
Encode team and used in production very widely; an ASGI app also runs under any other ASGI
server. JAX work never runs on the event loop: requests are validated there, queued, and a
dynamic batcher hands batches to one worker thread (so the bank is touched by one thread).

Endpoints (JSON in and out; errors are ``{"error": {"message", "type", "code"}}`` with a 4xx):

* ``POST /v1/completions`` (decoder): OpenAI's completion request, ``model`` = adapter name
  (``base`` for the base model); ``prompt`` a string or a list, ``max_tokens``, ``temperature``,
  ``top_p``, ``top_k``. Fields we cannot honour (``stream``, ``stop``, ``n`` > 1, ``logprobs``,
  ...) are refused by name, never ignored.
* ``POST /v1/classify`` (encoder): ``{"model": adapter, "input": str | [str]}`` → per input the
  logits, softmax probabilities and the argmax label, from that adapter's R's and head.
* ``GET /v1/models``: OpenAI-style list of adapters (resident or in the directory).
* ``GET /v1/adapters``, ``POST /v1/adapters {"name"}`` (load and pin), ``DELETE
  /v1/adapters/{name}`` (unload); ``GET /health``.

Dynamic batching: rows from concurrent requests (different adapters mixed) are collected until
``max_batch`` rows or ``max_wait_ms`` after the first, then run as one batch
(``Engine.classify`` / ``Engine.complete``; completions grouped by sampling settings).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import json
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from loraxs_jax.serving.engine import Engine, RequestError, load_engine

logger = logging.getLogger(__name__)

COMPLETION_FIELDS = {"model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "user"}
UNSUPPORTED = {"stream": False, "n": 1, "best_of": 1, "echo": False, "logprobs": None,
               "stop": None, "suffix": None, "logit_bias": None, "presence_penalty": 0,
               "frequency_penalty": 0, "seed": None}


class Batcher:
    """Collects items from concurrent requests into batches of at most ``max_batch`` items,
    waiting at most ``max_wait_s`` after the first; ``run(items) -> results`` runs on the one
    worker thread. An exception from ``run`` goes to every request of that batch."""

    def __init__(self, run: Callable[[list], list], executor: concurrent.futures.Executor,
                 max_batch: int, max_wait_s: float):
        self.run, self.executor = run, executor
        self.max_batch, self.max_wait_s = max_batch, max_wait_s
        self.queue: asyncio.Queue | None = None
        self.batches: list[int] = []              # sizes of the batches run (for tests, stats)

    async def submit(self, items: Sequence) -> list:
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in items]
        for item, fut in zip(items, futures):
            await self.queue.put((item, fut))
        return list(await asyncio.gather(*futures))

    async def loop(self) -> None:
        self.queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            deadline = loop.time() + self.max_wait_s
            while len(batch) < self.max_batch:
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), left))
                except asyncio.TimeoutError:
                    break
            self.batches.append(len(batch))
            try:
                results = await loop.run_in_executor(self.executor, self.run,
                                                     [item for item, _ in batch])
                for (_, fut), res in zip(batch, results, strict=True):
                    if not fut.done():
                        fut.set_result(res)
            except Exception as e:  # noqa: BLE001  (a failed batch fails its requests only)
                logger.exception("batch of %d failed", len(batch))
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(e)


def _error(status: int, message: str):
    from starlette.responses import JSONResponse

    kind = {400: "invalid_request_error", 404: "not_found_error", 409: "conflict_error",
            413: "request_too_large", 422: "invalid_request_error"}.get(status, "server_error")
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status)


async def _body(request, max_bytes: int) -> dict:
    size = request.headers.get("content-length")
    if size is not None and size.isdigit() and int(size) > max_bytes:
        raise RequestError(413, f"request body of {size} bytes exceeds {max_bytes}")
    raw = await request.body()
    if len(raw) > max_bytes:
        raise RequestError(413, f"request body of {len(raw)} bytes exceeds {max_bytes}")
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(400, f"malformed JSON body: {e}") from None
    if not isinstance(body, dict):
        raise RequestError(400, "the JSON body must be an object")
    return body


def _strings(body: dict, field: str, limit: int) -> list[str]:
    value = body.get(field)
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(isinstance(x, str) for x in items):
        raise RequestError(422, f"'{field}' must be a string or a non-empty list of strings")
    if len(items) > limit:
        raise RequestError(413, f"{len(items)} inputs in one request; at most {limit}")
    return items


def _number(body: dict, field: str, kind: type, default, lo, hi):
    v = body.get(field, default)
    if v is None and default is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and v != int(v)):
        raise RequestError(422, f"'{field}' must be a{'n integer' if kind is int else ' number'}")
    if not lo <= v <= hi:
        raise RequestError(413 if field == "max_tokens" and v > hi else 422,
                           f"'{field}'={v} is outside [{lo}, {hi}]")
    return kind(v)


def create_app(engine: Engine, *, max_batch: int = 32, max_wait_ms: float = 10.0,
               max_inputs: int | None = None, max_body_bytes: int = 1 << 20):
    """The Starlette app serving ``engine``. ``max_inputs``: inputs per request (default
    ``max_batch``)."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="loraxs-engine")
    max_inputs = max_inputs or max_batch

    def run(items):
        """items: (name, input, settings) rows; grouped by settings, one engine call each."""
        out: list[Any] = [None] * len(items)
        groups: dict[tuple, list[int]] = {}
        for i, (_, _, settings) in enumerate(items):       # (max_tokens, *sampling) or ()
            groups.setdefault(settings[1:], []).append(i)
        for settings, idx in groups.items():
            names = [items[i][0] for i in idx]
            inputs = [items[i][1] for i in idx]
            try:
                if engine.kind == "encoder":
                    res = engine.classify(names, inputs)
                else:
                    temperature, top_p, top_k = settings
                    res = engine.complete(names, inputs, [items[i][2][0] for i in idx],
                                          temperature, top_p, top_k)
            except RequestError as e:
                res = [e] * len(idx)
            for i, r in zip(idx, res):
                out[i] = r
        return out

    batcher = Batcher(run, executor, max_batch, max_wait_ms / 1000)

    async def on_engine(fn, *args):
        return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)

    def handler(fn):
        async def wrapped(request):
            try:
                return await fn(request)
            except RequestError as e:
                return _error(e.status, str(e))
        return wrapped

    async def check(name: Any) -> str:
        if not isinstance(name, str):
            raise RequestError(422, "'model' must be the name of an adapter (a string)")
        engine.check_adapter(name)
        return name

    async def submit(rows):
        results = await batcher.submit(rows)
        for r in results:
            if isinstance(r, Exception):
                raise r
        return results

    @handler
    async def completions(request):
        if engine.kind != "decoder":
            raise RequestError(404, "this server runs an encoder: POST /v1/classify")
        body = await _body(request, max_body_bytes)
        for field, neutral in UNSUPPORTED.items():
            if field in body and body[field] != neutral:
                raise RequestError(422, f"'{field}'={body[field]!r} is not supported by this "
                                        f"server (supported: {sorted(COMPLETION_FIELDS)})")
        unknown = sorted(set(body) - COMPLETION_FIELDS - set(UNSUPPORTED))
        if unknown:
            raise RequestError(422, f"unknown fields {unknown} (supported: "
                                    f"{sorted(COMPLETION_FIELDS)})")
        name = await check(body.get("model"))
        prompts = _strings(body, "prompt", max_inputs)
        max_tokens = _number(body, "max_tokens", int, min(16, engine.max_new_tokens), 1,
                             engine.max_new_tokens)
        temperature = _number(body, "temperature", float, 0.0, 0.0, 10.0)
        top_p = _number(body, "top_p", float, None, 0.0, 1.0)
        top_k = _number(body, "top_k", int, None, 1, 1 << 20)
        engine.tokenize(prompts, left=True)                # 413 / 422 before queuing
        settings = (max_tokens, temperature, top_p, top_k)
        res = await submit([(name, p, settings) for p in prompts])
        n_prompt = sum(r["prompt_tokens"] for r in res)
        n_new = sum(len(r["tokens"]) for r in res)
        return JSONResponse({
            "id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
            "created": int(time.time()), "model": name,
            "choices": [{"index": i, "text": r["text"], "finish_reason": r["finish_reason"],
                         "logprobs": None} for i, r in enumerate(res)],
            "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_new,
                      "total_tokens": n_prompt + n_new}})

    @handler
    async def classify(request):
        if engine.kind != "encoder":
            raise RequestError(404, "this server runs a decoder: POST /v1/completions")
        body = await _body(request, max_body_bytes)
        unknown = sorted(set(body) - {"model", "input", "user"})
        if unknown:
            raise RequestError(422, f"unknown fields {unknown} (supported: model, input)")
        name = await check(body.get("model"))
        texts = _strings(body, "input", max_inputs)
        engine.tokenize(texts, left=False)
        res = await submit([(name, t, ()) for t in texts])
        return JSONResponse({"object": "list", "model": name,
                             "data": [{"index": i, **r} for i, r in enumerate(res)]})

    @handler
    async def models(request):
        resident = engine.bank.resident
        return JSONResponse({"object": "list", "data": [
            {"id": n, "object": "model", "owned_by": "loraxs-jax", "loaded": n in resident}
            for n in engine.available()]})

    @handler
    async def adapters(request):
        if request.method == "POST":
            body = await _body(request, max_body_bytes)
            name = body.get("name")
            slot = await on_engine(engine.load, name)
            return JSONResponse({"name": name, "slot": slot, "loaded": True})
        info = await on_engine(engine.bank.describe)
        return JSONResponse({**info, "available": engine.available()})

    @handler
    async def unload(request):
        name = request.path_params["name"]
        await on_engine(engine.unload, name)
        return JSONResponse({"name": name, "loaded": False})

    async def health(request):
        return JSONResponse({"status": "ok", "kind": engine.kind})

    async def not_found(request, exc):
        return _error(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        task = asyncio.create_task(batcher.loop())
        try:
            yield
        finally:
            task.cancel()
            executor.shutdown(wait=False, cancel_futures=True)

    from starlette.exceptions import HTTPException

    app = Starlette(routes=[
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/classify", classify, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/adapters", adapters, methods=["GET", "POST"]),
        Route("/v1/adapters/{name}", unload, methods=["DELETE"]),
        Route("/health", health, methods=["GET"]),
    ], lifespan=lifespan, exception_handlers={HTTPException: not_found})
    app.state.batcher = batcher
    return app


def parser(description: str | None) -> argparse.ArgumentParser:
    """The options that build an Engine (shared by ``loraxs-serve`` and ``loraxs-score``)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", required=True, help="base model: HF folder or Llama GGUF file")
    p.add_argument("--adapters", required=True, help="folder of <name>.safetensors adapters")
    p.add_argument("--kind", choices=["encoder", "decoder"], default=None,
                   help="default: from the model's config.json (GGUF: decoder)")
    p.add_argument("--capacity", type=int, default=64, help="device slots (incl. the base)")
    p.add_argument("--num-labels", type=int, default=2, help="encoder head outputs")
    p.add_argument("--head", default="mean", help="encoder head: mean or cls")
    p.add_argument("--rank", type=int, default=None, help="bank rank (default: the largest)")
    p.add_argument("--max-batch", type=int, default=32, help="rows per batch")
    p.add_argument("--max-prompt-tokens", type=int, default=512)
    p.add_argument("--max-new-tokens", type=int, default=256)
    return p


def engine_from_args(a: argparse.Namespace) -> Engine:
    return load_engine(a.model, a.adapters, kind=a.kind, capacity=a.capacity,
                       num_labels=a.num_labels, head=a.head, rank=a.rank,
                       max_prompt_tokens=a.max_prompt_tokens, max_new_tokens=a.max_new_tokens)


def main(argv: Sequence[str] | None = None) -> None:
    """``loraxs-serve``: load a base and a folder of adapters, serve them over HTTP (or, with
    ``--batch IN --out OUT``, score a JSONL file offline: ``serving.score``)."""
    p = parser(main.__doc__)
    p.add_argument("--max-wait-ms", type=float, default=10.0, help="batching window")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--batch", default=None, help="score this JSONL of {adapter, input} rows "
                   "offline instead of serving (needs --out)")
    p.add_argument("--out", default=None, help="with --batch: the JSONL to write")
    a = p.parse_args(argv)
    if (a.batch is None) != (a.out is None):
        p.error("--batch and --out go together")
    if a.batch is not None:
        from loraxs_jax.serving.score import run_batch

        return run_batch(a, a.batch)
    import uvicorn

    from loraxs_jax.serving.bank import BankError

    try:
        engine = engine_from_args(a)
    except (BankError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    app = create_app(engine, max_batch=a.max_batch, max_wait_ms=a.max_wait_ms)
    uvicorn.run(app, host=a.host, port=a.port, log_level="info")


if __name__ == "__main__":
    main()
