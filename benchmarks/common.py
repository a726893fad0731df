"""What every benchmark shares: the machine record, interleaved timing, result files, the models
and batches we measure, the four train steps (floor, LoRA-XS, LoRA, full), and the LoRA baseline.

Timing: absolute times on a shared machine are noisy, so contenders run side by side in one
process, interleaved round by round (A B C D, B C D A, ...), and we report medians and ratios of
medians. Memory comes from the compiled program (``memory_analysis``), FLOPs from
``cost_analysis``; both are deterministic, unlike wall clock.

LoRA (Hu et al. 2021) lives here as the baseline, written so it can be lifted into the library
unchanged: ``lora_apply(params, targets, rank, alpha, rng)`` inserts ``kernel_lora_A`` (in, r),
Kaiming-uniform as PEFT, ``kernel_lora_B`` (r, out) zeros and a frozen ``kernel_lora_scale`` = α/r
beside each targeted 2-D kernel; ``lora_wrap(fn)`` intercepts ``nn.Dense`` exactly as
``loraxs_jax.wrap`` does and adds (α/r)·(x·A)·B.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import math
import os
import platform
import re
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import loraxs_jax
from loraxs_jax.bases import path_key
from loraxs_jax.models import decoder as dec
from loraxs_jax.models import encoder as enc
from loraxs_jax.tree import flatten, path_str, unflatten

RESULTS = Path(__file__).resolve().parent / "results"
DECODER_TARGETS = dec.PAPER_TARGETS   # the paper's seven projections
ENCODER_TARGETS = enc.PAPER_TARGETS
MB = 2 ** 20


# ----------------------------------------------------------------------------- machine, files
def machine() -> dict[str, Any]:
    """Where and with what a result was measured."""
    import flax
    import sklearn

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, cwd=RESULTS.parent, check=False).stdout.strip()
    except OSError:
        commit = ""
    dev = jax.devices()[0]
    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu, "cores": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2),
        "backend": jax.default_backend(), "device": dev.device_kind,
        "python": platform.python_version(), "jax": jax.__version__, "flax": flax.__version__,
        "optax": optax.__version__, "numpy": np.__version__, "sklearn": sklearn.__version__,
        "loraxs_jax": loraxs_jax.__version__, "git": commit,
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
    }


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def fmt(x):
        if isinstance(x, float):
            return f"{x:.3g}" if abs(x) < 1e4 else f"{x:,.0f}"
        if isinstance(x, int):
            return f"{x:,}"
        return str(x)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def results_dir(smoke: bool) -> Path:
    """``$LORAXS_BENCH_RESULTS`` if set (tests), else ``benchmarks/results`` (``/smoke`` for
    smoke runs, so they never overwrite the real numbers)."""
    root = Path(os.environ.get("LORAXS_BENCH_RESULTS") or RESULTS)
    out = root / "smoke" if smoke else root
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_result(name: str, data: dict, tables: Callable[[dict], str], smoke: bool) -> Path:
    """``<name>.json`` (data + machine) and ``<name>.md`` (``tables(data)`` under a title and
    the machine line); returns the markdown's path."""
    payload = {"benchmark": name, "smoke": smoke, "machine": machine(), **data}
    (results_dir(smoke) / f"{name}.json").write_text(
        json.dumps(payload, indent=1, default=float) + "\n")
    return write_markdown(payload, tables)


def write_markdown(payload: dict, tables: Callable[[dict], str]) -> Path:
    """``<benchmark>.md`` from a result's JSON payload (also to re-render old results)."""
    name, smoke, m = payload["benchmark"], payload["smoke"], payload["machine"]
    head = (f"# {name}{' (smoke)' if smoke else ''}\n\n{m['date_utc']} · {m['cpu']} × "
            f"{m['cores']} cores ({m['backend']}, load {m['load_avg_1m']}) · jax {m['jax']}, "
            f"flax {m['flax']}, numpy {m['numpy']}, scikit-learn {m['sklearn']} · git "
            f"{m['git']}\n\n")
    path = results_dir(smoke) / f"{name}.md"
    path.write_text(head + tables(payload).strip() + "\n")
    return path


def cli(doc: str, run: Callable[..., dict], argv: Sequence[str] | None = None,
        reps: bool = True, **switches: str) -> None:
    """The command line of a benchmark: ``--smoke``, ``--reps N`` (if ``reps``), and one
    ``--flag`` per keyword (``exact_7b="help"`` → ``--exact-7b``, passed as ``exact_7b=True``)."""
    import argparse

    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes, few reps (seconds)")
    if reps:
        p.add_argument("--reps", type=int, default=None, help="interleaved timing rounds")
    for name, text in switches.items():
        p.add_argument("--" + name.replace("_", "-"), action="store_true", help=text)
    print(run(**vars(p.parse_args(argv)))["path"])


# ----------------------------------------------------------------------------- timing
def block(x):
    return jax.block_until_ready(x)


def interleaved(fns: Mapping[str, Callable[[], Any]], reps: int, warmup: int = 1
                ) -> dict[str, list[float]]:
    """Seconds per call of each thunk, measured round-robin (the starting contender rotates each
    round) so slow phases of a shared machine hit every contender alike."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            block(fns[n]())
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(reps):
        for n in names[i % len(names):] + names[:i % len(names)]:
            t = time.perf_counter()
            block(fns[n]())
            times[n].append(time.perf_counter() - t)
    return times


def median(xs: Sequence[float]) -> float:
    return float(np.median(np.asarray(xs)))


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t = time.perf_counter()
    out = block(fn())
    return out, time.perf_counter() - t


# ----------------------------------------------------------------------------- compiled stats
def compile_stats(compiled) -> dict[str, float]:
    """FLOPs and memory of a compiled XLA program. ``peak`` = arguments + outputs + temporaries
    − aliased bytes: what the program needs resident while it runs."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    mem = compiled.memory_analysis()
    args, out = mem.argument_size_in_bytes, mem.output_size_in_bytes
    temp, alias = mem.temp_size_in_bytes, mem.alias_size_in_bytes
    return {"flops": float(cost.get("flops", float("nan"))),
            "bytes_accessed": float(cost.get("bytes accessed", float("nan"))),
            "args_bytes": int(args), "out_bytes": int(out), "temp_bytes": int(temp),
            "peak_bytes": int(args + out + temp - alias)}


# ----------------------------------------------------------------------------- LoRA baseline
LORA = "_lora_"


def lora_apply(params: Mapping, targets: Sequence[str], rank: int, alpha: float, rng: Any = 0
               ) -> dict:
    """LoRA (Hu et al. 2021) beside every 2-D kernel whose '/'-joined path ``re.search``-es one
    of ``targets``: ``<name>_lora_A`` (in, r) ~ U(±1/√in) (PEFT's kaiming_uniform(a=√5)),
    ``<name>_lora_B`` (r, out) = 0, ``<name>_lora_scale`` = α/r (frozen). Base arrays are kept."""
    key = jax.random.key(rng) if isinstance(rng, int) else rng
    flat = flatten(params)
    new = dict(flat)
    hits = 0
    for path, w in flat.items():
        name = path_str(path)
        if len(np.shape(w)) != 2 or not any(re.search(t, name) for t in targets):
            continue
        d_in, d_out = np.shape(w)
        if rank > min(d_in, d_out):
            raise ValueError(f"rank {rank} exceeds min(in, out)={min(d_in, d_out)} for {name}")
        k = path_key(key, name)
        bound = 1.0 / math.sqrt(d_in)
        *parent, leaf = path
        new[(*parent, f"{leaf}{LORA}A")] = jax.random.uniform(k, (d_in, rank), jnp.float32,
                                                             -bound, bound)
        new[(*parent, f"{leaf}{LORA}B")] = jnp.zeros((rank, d_out), jnp.float32)
        new[(*parent, f"{leaf}{LORA}scale")] = jnp.asarray(alpha / rank, jnp.float32)
        hits += 1
    if not hits:
        raise ValueError(f"LoRA targets {list(targets)} matched no 2-D kernel")
    return unflatten(new, params)


def lora_split(params: Mapping) -> tuple[dict, dict]:
    """(trainable A and B leaves, everything else)."""
    flat = flatten(params)
    train = {p: v for p, v in flat.items() if str(p[-1]).endswith((f"{LORA}A", f"{LORA}B"))}
    return unflatten(train, {}), unflatten({p: v for p, v in flat.items() if p not in train}, {})


def _lora_interceptor(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != "__call__" or not module.has_variable("params", f"kernel{LORA}A"):
        return next_fun(*args, **kwargs)
    if not isinstance(module, nn.Dense):
        raise NotImplementedError(f"{'/'.join(module.path)} is a {type(module).__name__}; "
                                  "lora_wrap adapts nn.Dense only")
    y = next_fun(*args, **kwargs)
    x = args[0] if args else kwargs["inputs"]
    a, b, s = (module.get_variable("params", f"kernel{LORA}{r}") for r in ("A", "B", "scale"))
    dtype = module.dtype or x.dtype
    h = x.astype(dtype) @ a.astype(dtype)
    return y + ((h @ b.astype(dtype)) * s.astype(dtype)).astype(y.dtype)


def lora_wrap(fn: Callable) -> Callable:
    """``fn`` (e.g. ``model.apply``) with LoRA active in every adapted ``nn.Dense``."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with nn.intercept_methods(_lora_interceptor):
            return fn(*args, **kwargs)

    return wrapped


# ----------------------------------------------------------------------------- the floor
EMBED_NAMES = ("word_embeddings", "embed_tokens")


def with_input_delta(fn: Callable, delta: jax.Array) -> Callable:
    """``fn`` with ``delta`` (B, T, H) added to the token-embedding output. Differentiating
    w.r.t. ``delta`` is forward + backward to the inputs with every weight frozen: the activation
    gradients that any adapter in the first layer needs, and nothing else (the floor)."""

    def interceptor(next_fun, args, kwargs, context):
        y = next_fun(*args, **kwargs)
        if context.method_name == "__call__" and context.module.name in EMBED_NAMES:
            return y + delta.astype(y.dtype)
        return y

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with nn.intercept_methods(interceptor):
            return fn(*args, **kwargs)

    return wrapped


# ----------------------------------------------------------------------------- models
@dataclasses.dataclass
class Setup:
    """One model + batch to benchmark. ``loss(apply_fn, params, batch)`` is a scalar."""

    name: str
    kind: str                    # "decoder" or "encoder"
    model: nn.Module
    params: dict
    batch: dict
    targets: tuple[str, ...]
    rank: int
    alpha: float
    hidden: int
    description: str

    def loss(self, apply_fn: Callable, params: Mapping, batch: Mapping) -> jax.Array:
        if self.kind == "decoder":
            logits = apply_fn({"params": params}, batch["input_ids"]).astype(jnp.float32)
            return optax.softmax_cross_entropy_with_integer_labels(
                logits[:, :-1], batch["input_ids"][:, 1:]).mean()
        logits = apply_fn({"params": params}, batch["input_ids"], batch["attention_mask"],
                          deterministic=True)
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()

    def loraxs_config(self, rank: int | None = None, **kw) -> loraxs_jax.LoraXSConfig:
        r = rank or self.rank
        return loraxs_jax.LoraXSConfig(rank=r, alpha=self.alpha, targets=self.targets, **kw)


def _tokens(key, batch: int, seq: int, vocab: int, kind: str) -> dict:
    ids = jax.random.randint(key, (batch, seq), 3, vocab, jnp.int32)
    out = {"input_ids": ids}
    if kind == "encoder":
        out["attention_mask"] = jnp.ones((batch, seq), jnp.int32)
        out["labels"] = jax.random.randint(jax.random.fold_in(key, 1), (batch,), 0, 2, jnp.int32)
    return out


@functools.cache
def llama_small(smoke: bool = False, batch: int = 4, seq: int = 128, rank: int = 16) -> Setup:
    """A small Llama-family decoder (GQA, SwiGLU, RoPE), random weights; the seven LLM targets
    of the paper (q, k, v, o, gate, up, down), α = 2r as the commonsense setup."""
    if smoke:
        c = dec.DecoderConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=1,
                              num_heads=4, num_kv_heads=2, head_dim=16)
        batch, seq, rank = 2, 16, min(rank, 4)
    else:
        c = dec.DecoderConfig(vocab_size=4096, hidden_size=512, intermediate_size=1376,
                              num_layers=4, num_heads=8, num_kv_heads=4, head_dim=64)
    params = dec.init_params(c, jax.random.key(0))
    desc = (f"Llama-family decoder H={c.hidden_size} I={c.intermediate_size} L={c.num_layers} "
            f"heads={c.num_heads}/{c.num_kv_heads} vocab={c.vocab_size}, batch {batch}×{seq}")
    return Setup("llama-small", "decoder", dec.DecoderForCausalLM(c), params,
                 _tokens(jax.random.key(1), batch, seq, c.vocab_size, "decoder"),
                 DECODER_TARGETS, rank, 2.0 * rank, c.hidden_size, desc)


@functools.cache
def bert_small(smoke: bool = False, batch: int = 4, seq: int = 128, rank: int = 16) -> Setup:
    """A BERT-family encoder, random weights, the paper's GLUE targets, α = 16."""
    if smoke:
        c = enc.EncoderConfig(vocab_size=256, hidden_size=64, num_layers=1, num_heads=4,
                              intermediate_size=128, max_positions=64)
        batch, seq, rank = 2, 16, min(rank, 4)
    else:
        c = enc.EncoderConfig(hidden_size=512, num_layers=4, num_heads=8, intermediate_size=2048)
    params = enc.init_encoder(c, jax.random.key(0))
    desc = (f"BERT-family encoder H={c.hidden_size} I={c.intermediate_size} L={c.num_layers}, "
            f"batch {batch}×{seq}")
    return Setup("bert-small", "encoder", enc.Encoder(c), params,
                 _tokens(jax.random.key(1), batch, seq, c.vocab_size, "encoder"),
                 ENCODER_TARGETS, rank, 16.0, c.hidden_size, desc)


@functools.cache
def minilm(batch: int = 32, seq: int = 128, rank: int = 16) -> Setup:
    """The real all-MiniLM-L6-v2 (6 layers, H=384) with a mean-pooled head, the paper's GLUE
    targets; the demo's shape (SST-2, batch 32, max length 128)."""
    from loraxs_jax.experiments.assets import asset_path

    c, params = enc.load_encoder(asset_path("minilm"), num_labels=2, head="mean")
    desc = f"all-MiniLM-L6-v2 (real weights) H={c.hidden_size} L={c.num_layers}, batch {batch}×{seq}"
    return Setup("minilm", "encoder", enc.Encoder(c), params,
                 _tokens(jax.random.key(1), batch, seq, c.vocab_size, "encoder"),
                 ENCODER_TARGETS, rank, 16.0, c.hidden_size, desc)


def have_asset(name: str) -> bool:
    from loraxs_jax.experiments.assets import asset_path

    try:
        asset_path(name)
        return True
    except FileNotFoundError:
        return False


# ----------------------------------------------------------------------------- train steps
@dataclasses.dataclass
class Step:
    """A compiled step and the arguments it runs on."""

    compiled: Any
    args: tuple
    trainable: int

    def __call__(self):
        return self.compiled(*self.args)


def optimizer_step(loss: Callable, tx: optax.GradientTransformation):
    def step(trainable, opt_state, frozen, batch):
        value, grads = jax.value_and_grad(lambda t: loss(combine(t, frozen), batch))(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return value, optax.apply_updates(trainable, updates), opt_state

    return step


def combine(a: Mapping, b: Mapping) -> dict:
    return loraxs_jax.combine(a, b) if b else dict(a)


def _n(tree) -> int:
    return int(sum(np.size(x) for x in jax.tree_util.tree_leaves(tree)))


METHODS = ("floor", "loraxs", "lora", "full")


_STEPS: dict[tuple, Step] = {}


def train_steps(s: Setup, methods: Sequence[str] = METHODS, rank: int | None = None,
                lr: float = 1e-3, bases: Mapping | None = None) -> dict[str, Step]:
    """Compiled train steps on the same model and batch.

    floor:  forward + backward to the embedding output, weights frozen, no optimizer.
    loraxs: gradient w.r.t. R only (``split``), AdamW on R.
    lora:   gradient w.r.t. LoRA A, B only, AdamW on them (same targets, same rank).
    full:   gradient w.r.t. every param, AdamW on all.

    ``bases``: precomputed LoRA-XS bases {kernel path: (A, B)} (e.g. sliced from a higher-rank
    exact SVD, to sweep ranks without an SVD per rank).
    """
    rank = rank or s.rank
    tx = optax.adamw(lr)
    loss = lambda fn: (lambda p, b: s.loss(fn, p, b))
    out: dict[str, Step] = {}
    for m in methods:
        key = (id(s), m, 0 if m in ("floor", "full") else rank, lr)
        if key in _STEPS:        # one process runs several benchmarks on the same setups
            out[m] = _STEPS[key]
            continue
        if m == "floor":
            x = s.batch["input_ids"]
            delta = jnp.zeros(x.shape + (s.hidden,), jnp.float32)

            def floor(delta, params, batch):
                return jax.value_and_grad(
                    lambda d: s.loss(with_input_delta(s.model.apply, d), params, batch))(delta)

            args, fn, n = (delta, s.params, s.batch), floor, 0
        else:
            if m == "loraxs":
                cfg = s.loraxs_config(rank)
                t, f = loraxs_jax.split(loraxs_jax.apply(s.params, cfg, 0, bases=bases), cfg)
                fn = optimizer_step(loss(loraxs_jax.wrap(s.model.apply)), tx)
            elif m == "lora":
                t, f = lora_split(lora_apply(s.params, s.targets, rank, s.alpha, 0))
                fn = optimizer_step(loss(lora_wrap(s.model.apply)), tx)
            elif m == "full":
                t, f = s.params, {}
                fn = optimizer_step(loss(s.model.apply), tx)
            else:
                raise ValueError(f"unknown method {m!r}; choose from {METHODS}")
            args, n = (t, tx.init(t), f, s.batch), _n(t)
        out[m] = _STEPS[key] = Step(jax.jit(fn).lower(*args).compile(), args, n)
    return out


def eval_step(s: Setup, apply_fn: Callable, params: Mapping) -> Step:
    """A compiled forward (logits) of ``apply_fn`` on the setup's batch."""
    def fwd(params, batch):
        if s.kind == "decoder":
            return apply_fn({"params": params}, batch["input_ids"])
        return apply_fn({"params": params}, batch["input_ids"], batch["attention_mask"])

    args = (params, s.batch)
    return Step(jax.jit(fwd).lower(*args).compile(), args, 0)
