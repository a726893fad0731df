"""Offline scoring: a JSONL file of ``{"adapter", "input"}`` rows through one Engine, many
adapters mixed, written as JSONL in the input's order.

    loraxs-score --model BASE --adapters DIR --in rows.jsonl --out scored.jsonl
    loraxs-serve --model BASE --adapters DIR --batch rows.jsonl --out scored.jsonl   (the same)

Each input line is a JSON object: ``adapter`` (a name, or ``base``), ``input`` (a string),
optionally ``id`` (copied to the output; default: the line number) and, for a decoder,
``max_tokens``. Output lines: ``{"id", "adapter", ...}`` plus the classification (``logits``,
``probs``, ``label``) or the completion (``text``, ``finish_reason``, ``tokens``).

Every line is checked before any work (JSON, fields, adapter known, length): a bad line stops
the run with its line number and nothing is written, so an output file is always complete.
Rows are sorted by adapter before batching (each adapter is loaded into the bank once when the
bank is smaller than the number of adapters), and written back in input order, atomically.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loraxs_jax.serving.engine import Engine, RequestError

FIELDS = {"adapter", "input", "id", "max_tokens"}


class ScoreError(ValueError):
    """A bad input file or line; the message names the file, the line and the problem."""


def read_rows(path: str | os.PathLike, engine: Engine, max_tokens: int = 16) -> list[dict]:
    """The rows of a JSONL file, each checked against ``engine`` (see the module docstring)."""
    p = Path(path)
    if not p.is_file():
        raise ScoreError(f"no input file at {p}")
    rows = []
    with open(p, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue

            def bad(why: str, n: int = n) -> ScoreError:
                return ScoreError(f"{p} line {n}: {why}")

            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise bad(f"not JSON ({e})") from None
            if not isinstance(row, dict):
                raise bad(f"a JSON {type(row).__name__}, not an object")
            unknown = sorted(set(row) - FIELDS)
            if unknown:
                raise bad(f"unknown fields {unknown} (supported: {sorted(FIELDS)})")
            name, text = row.get("adapter"), row.get("input")
            if not isinstance(name, str):
                raise bad("'adapter' must be the name of an adapter (a string)")
            if not isinstance(text, str):
                raise bad("'input' must be a string")
            mt = row.get("max_tokens", max_tokens)
            if engine.kind == "encoder" and "max_tokens" in row:
                raise bad("'max_tokens' is for completions; this model is an encoder")
            if isinstance(mt, bool) or not isinstance(mt, int) or not \
                    1 <= mt <= engine.max_new_tokens:
                raise bad(f"'max_tokens'={mt!r} is not an integer in [1, "
                          f"{engine.max_new_tokens}]")
            try:
                engine.check_adapter(name)
                engine.tokenize([text], left=engine.kind == "decoder")
            except RequestError as e:
                raise bad(str(e)) from None
            rows.append({"id": row.get("id", n), "adapter": name, "input": text,
                         "max_tokens": mt})
    if not rows:
        raise ScoreError(f"{p} holds no rows")
    return rows


def score(engine: Engine, rows: Sequence[dict], batch_size: int = 32) -> list[dict[str, Any]]:
    """Results for ``rows`` (as ``read_rows`` returns them), in their order."""
    order = sorted(range(len(rows)), key=lambda i: rows[i]["adapter"])
    out: list[dict[str, Any]] = [{}] * len(rows)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        names = [rows[i]["adapter"] for i in idx]
        texts = [rows[i]["input"] for i in idx]
        if engine.kind == "encoder":
            res = engine.classify(names, texts)
        else:
            res = engine.complete(names, texts, [rows[i]["max_tokens"] for i in idx])
        for i, r in zip(idx, res):
            r = {k: v for k, v in r.items() if k != "prompt_tokens"}
            out[i] = {"id": rows[i]["id"], "adapter": rows[i]["adapter"], **r}
    return out


def score_file(engine: Engine, src: str | os.PathLike, dst: str | os.PathLike,
               batch_size: int = 32, max_tokens: int = 16) -> int:
    """Score ``src`` into ``dst`` (written atomically); returns the number of rows."""
    results = score(engine, read_rows(src, engine, max_tokens), batch_size)
    dst = Path(dst)
    tmp = dst.with_name(dst.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in results:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, dst)
    return len(results)


def main(argv: Sequence[str] | None = None) -> None:
    """``loraxs-score``: score a JSONL of {adapter, input} rows offline."""
    from loraxs_jax.serving.server import parser

    p = parser(main.__doc__)
    p.add_argument("--in", dest="src", required=True, help="JSONL of {adapter, input} rows")
    p.add_argument("--out", required=True, help="JSONL written in the input's order")
    a = p.parse_args(argv)
    run_batch(a, a.src)


def run_batch(a, src: str) -> None:
    from loraxs_jax.serving.bank import BankError
    from loraxs_jax.serving.server import engine_from_args

    try:
        engine = engine_from_args(a)
        n = score_file(engine, src, a.out, batch_size=a.max_batch)
    except (ScoreError, BankError, RequestError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    print(f"scored {n} rows into {a.out}")


if __name__ == "__main__":
    main()
