"""Serving many adapters of one base: throughput of mixed batches, memory per adapter, load
times, a PEFT mixed-batch LoRA anchor, and a large memory-mapped store of adapters.

Side by side in one run, per model (MiniLM classification: the real all-MiniLM-L6-v2 when its
asset is there; a SmolLM2-style Llama decoder with random weights, forward/scoring only):

* throughput (rows/s, forward of B rows × T tokens) of the ``AdapterBank`` per-row path with 1,
  16, 256 (and, full size, 4096) distinct adapters in the batch, against the merged single model
  (the base's program) and the unmerged single adapter (``loraxs_jax.wrap``); contenders are
  interleaved (``common.interleaved``);
* memory per resident adapter: the bank's bytes per slot against r² × matrices × 4 (+ head);
* time to load one adapter file into a slot (read + every check + scatter), and a cold
  adapter from the memory-mapped ``AdapterStore``;
* PEFT (torch, CPU) with the same targets at the same rank, mixed batch (``adapter_names=``),
  1 and 16 adapters: an outside anchor for the per-row cost;
* the store: N synthetic adapter files written with ``io.save_tensors`` (the format
  ``save_adapter`` writes, digest included) and packed through ``AdapterBank.pack`` (every check
  ``load_adapter`` makes), then random requests through a bank of 257 slots: p50/p99 cold-adapter
  time and rows/s against all-resident. N is bounded by a time budget on this machine; the
  million-adapter figures are extrapolated from it and say so.

    python -m benchmarks.bench_serving [--smoke] [--reps N]
    python -m benchmarks.bench_serving --anchor   # ours vs PEFT at 1, 16, 256 adapters
"""

from __future__ import annotations

import functools
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import loraxs_jax as lx
from benchmarks import common
from loraxs_jax import io as lxio
from loraxs_jax.models import decoder as dec
from loraxs_jax.models import encoder as enc
from loraxs_jax.serving import AdapterBank, AdapterStore, rows

MILLION = 1_000_000


def _models(smoke: bool) -> list[dict]:
    """(name, kind, model, params, cfg, rows B, tokens T, description) per model."""
    out = []
    if not smoke and common.have_asset("minilm"):
        from loraxs_jax.experiments.assets import asset_path

        c, params = enc.load_encoder(asset_path("minilm"), num_labels=2, head="mean")
        name, desc = "minilm", f"all-MiniLM-L6-v2 (real weights) H={c.hidden_size} L={c.num_layers}"
    else:
        c = (enc.EncoderConfig(vocab_size=256, hidden_size=64, num_layers=1, num_heads=4,
                               intermediate_size=128, max_positions=64) if smoke else
             enc.EncoderConfig(vocab_size=30522, hidden_size=384, num_layers=6, num_heads=12,
                               intermediate_size=1536))
        params = enc.init_encoder(c, jax.random.key(0))
        name, desc = "minilm-shaped", f"MiniLM-shaped encoder, random weights H={c.hidden_size}"
    rank = 4 if smoke else 16
    out.append({"name": name, "kind": "encoder", "model": enc.Encoder(c), "params": params,
                "cfg": lx.LoraXSConfig(rank=rank, alpha=16.0, targets=enc.PAPER_TARGETS,
                                       trainable=(r"^classifier/",)),
                "vocab": c.vocab_size, "desc": desc + ", 2-label mean-pooled head per adapter",
                "torch": name == "minilm"})
    d = (dec.DecoderConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=1,
                           num_heads=4, num_kv_heads=2, head_dim=16) if smoke else
         dec.DecoderConfig(vocab_size=8192, hidden_size=576, intermediate_size=1536, num_layers=4,
                           num_heads=9, num_kv_heads=3, head_dim=64))
    out.append({"name": "smollm2-style", "kind": "decoder", "model": dec.DecoderForCausalLM(d),
                "params": dec.init_params(d, jax.random.key(0)),
                "cfg": lx.LoraXSConfig(rank=rank, alpha=2.0 * rank, targets=dec.PAPER_TARGETS),
                "vocab": d.vocab_size, "torch": False,
                "desc": (f"SmolLM2-135M-shaped layers (H={d.hidden_size}, I={d.intermediate_size}, "
                         f"heads {d.num_heads}/{d.num_kv_heads}) but {d.num_layers} layers and vocab "
                         f"{d.vocab_size}, random weights; forward (scoring) only")})
    return out


# ----------------------------------------------------------------------------- adapter files
def _template(m: dict, folder: Path) -> tuple[dict, dict, list[str]]:
    """One real adapter file (``save_adapter``), read back: its tensors and metadata."""
    cfg, base = m["cfg"], m["params"]
    adapted = lx.apply(base, cfg, 0)
    if m["kind"] == "encoder":
        adapted = {**adapted, "classifier": jax.tree.map(np.asarray, base["classifier"])}
    path = lx.save_adapter(folder / "template", adapted, cfg)
    tensors, meta = lxio.read_tensors(path)
    return tensors, {k: v for k, v in meta.items() if k != "sha256"}, sorted(tensors)


def write_adapters(m: dict, folder: Path, n: int, budget_s: float, seed: int = 0
                   ) -> tuple[list[tuple[str, Path]], float]:
    """Up to ``n`` adapter files (random R ~ N(0, 0.1²), random heads) in at most ``budget_s``
    seconds, each through ``io.save_tensors`` with the template's metadata (the bytes
    ``save_adapter`` writes for such an adapter: same header, digest over the new data).
    Returns [(name, path)] and seconds per file."""
    tensors, meta, names = _template(m, folder)
    rng = np.random.default_rng(seed)
    out, t0 = [], time.perf_counter()
    for i in range(n):
        if time.perf_counter() - t0 > budget_s:
            break
        new = {k: (rng.normal(0, 0.1, v.shape)).astype(v.dtype) for k, v in tensors.items()}
        name = f"ad{i:07d}"
        out.append((name, lxio.save_tensors(folder / f"{name}.safetensors", new, meta)))
    return out, (time.perf_counter() - t0) / max(1, len(out))


# ----------------------------------------------------------------------------- forwards
def _forward_fns(m: dict, bank: AdapterBank, adapter_file: Path, batch: dict):
    """Thunks: merged single model, unmerged single adapter, and ``bank(slots)``."""
    model, base, cfg = m["model"], m["params"], m["cfg"]
    one = lx.load_adapter(adapter_file, base)
    merged = lx.merge(one)
    if m["kind"] == "encoder":
        args = (batch["input_ids"], batch["attention_mask"])
        plain = jax.jit(lambda p: model.apply({"params": p}, *args))
        wrapped = jax.jit(lambda p: lx.wrap(model.apply)({"params": p}, *args))
        per_row = jax.jit(functools.partial(rows.encoder_logits, model))
    else:
        args = (batch["input_ids"],)
        plain = jax.jit(lambda p: model.apply({"params": p}, *args))
        wrapped = jax.jit(lambda p: lx.wrap(model.apply)({"params": p}, *args))
        per_row = jax.jit(functools.partial(rows.decoder_logits, model))
    del cfg

    def bank_fn(slots):
        s = jnp.asarray(slots)
        return lambda: per_row(bank.arrays(), s, *args)

    return {"merged": lambda: plain(merged), "unmerged-1": lambda: wrapped(one)}, bank_fn


def _batch(m: dict, b: int, t: int) -> dict:
    ids = jax.random.randint(jax.random.key(1), (b, t), 3, m["vocab"], jnp.int32)
    return {"input_ids": ids, "attention_mask": jnp.ones((b, t), jnp.int32)}


def throughput(m: dict, bank: AdapterBank, names: list[str], files: dict, b: int, t: int,
               distinct: list[int], reps: int) -> dict:
    batch = _batch(m, b, t)
    fixed, bank_fn = _forward_fns(m, bank, files[names[0]], batch)
    fns = dict(fixed)
    rng = np.random.default_rng(0)
    for d in distinct:
        slots = bank.ensure(names[:d])                 # resident before timing
        fns[f"bank-{d}"] = bank_fn(rng.permutation(np.resize(slots, b)))
    times = common.interleaved(fns, reps)
    med = {k: common.median(v) for k, v in times.items()}
    return {"rows": b, "tokens": t, "median_s": med,
            "rows_per_s": {k: b / v for k, v in med.items()},
            "over_merged": {k: v / med["merged"] for k, v in med.items()}}


def big_batch(m: dict, bank: AdapterBank, names: list[str], files: dict, d: int, t: int) -> dict:
    """One batch of ``d`` rows, each its own adapter, against the merged model on the same batch
    (one timed call each after a warm-up: at this size a call takes seconds here)."""
    batch = _batch(m, d, t)
    fixed, bank_fn = _forward_fns(m, bank, files[names[0]], batch)
    fns = {"merged": fixed["merged"], f"bank-{d}": bank_fn(bank.ensure(names[:d]))}
    times = common.interleaved(fns, 1)
    med = {k: common.median(v) for k, v in times.items()}
    return {"rows": d, "tokens": t, "median_s": med,
            "rows_per_s": {k: d / v for k, v in med.items()},
            "over_merged": {k: v / med["merged"] for k, v in med.items()}}


# ----------------------------------------------------------------------------- PEFT anchor
def peft_anchor(b: int, t: int, rank: int, reps: int, distinct=(1, 16)) -> dict:
    """Real all-MiniLM-L6-v2 in torch with PEFT LoRA on the same kernels (query, value, both
    output denses) at the same rank, mixed batch by ``adapter_names``; plus the torch base."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    from loraxs_jax.experiments.assets import asset_path

    torch.set_num_threads(2)
    base = AutoModel.from_pretrained(asset_path("minilm")).eval()
    ids = torch.randint(3, base.config.vocab_size, (b, t), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    cfg = LoraConfig(r=rank, lora_alpha=16, init_lora_weights=False, target_modules=
                     r".*\.(attention\.self\.(query|value)|attention\.output\.dense|"
                     r"layer\.\d+\.output\.dense)")
    out = {}
    with torch.inference_mode():
        fns = {"torch base": lambda: base(input_ids=ids, attention_mask=mask).last_hidden_state}
        times = common.interleaved(fns, reps)
        out["torch base"] = common.median(times["torch base"])
        model = get_peft_model(base, cfg, adapter_name="p0")
        for i in range(1, max(distinct)):
            model.add_adapter(f"p{i}", cfg)
        model.eval()
        fns = {}
        for d in distinct:
            names = [f"p{i % d}" for i in range(b)]
            fns[f"peft-{d}"] = functools.partial(
                lambda n: model(input_ids=ids, attention_mask=mask,
                                adapter_names=n).last_hidden_state, names)
        times = common.interleaved(fns, reps)
        out.update({k: common.median(v) for k, v in times.items()})
    return {"rows": b, "tokens": t, "rank": rank, "median_s": out,
            "rows_per_s": {k: b / v for k, v in out.items()},
            "over_torch_base": {k: v / out["torch base"] for k, v in out.items()}}


# ----------------------------------------------------------------------------- the store
def store_bench(m: dict, files: list[tuple[str, Path]], folder: Path, capacity: int, b: int,
                t: int, requests: int) -> dict:
    bank = AdapterBank(m["params"], m["cfg"], capacity)
    t0 = time.perf_counter()
    store = AdapterStore.create(folder / "store", bank, files, len(files))
    pack_s = (time.perf_counter() - t0) / len(files)
    bank = AdapterBank(m["params"], m["cfg"], capacity, source=store)
    names = store.names()
    rng = np.random.default_rng(1)
    bank.ensure([names[0]])                            # compile the one-row scatter
    cold = []
    for _ in range(requests):                          # one cold adapter at a time
        name = names[rng.integers(len(names))]
        while name in bank:
            name = names[rng.integers(len(names))]
        t1 = time.perf_counter()
        bank.ensure([name])
        jax.block_until_ready(bank.state)
        cold.append(time.perf_counter() - t1)
    batch = _batch(m, b, t)
    per_row = jax.jit(functools.partial(
        rows.encoder_logits if m["kind"] == "encoder" else rows.decoder_logits, m["model"]))
    args = ((batch["input_ids"], batch["attention_mask"]) if m["kind"] == "encoder"
            else (batch["input_ids"],))
    draws = [list(rng.choice(names, b, replace=False)) for _ in range(4)]

    def cold_batch(k):                                 # b random adapters, mostly not resident
        slots = bank.ensure(draws[k])
        return per_row(bank.arrays(), jnp.asarray(slots), *args)

    common.block(cold_batch(0))                        # compile
    cold_batch_s = []
    for k in range(1, 4):
        t1 = time.perf_counter()
        common.block(cold_batch(k))
        cold_batch_s.append(time.perf_counter() - t1)
    resident = jnp.asarray(bank.ensure(draws[3]))
    warm = common.interleaved({"resident": lambda: per_row(bank.arrays(), resident, *args)}, 3)
    row_bytes = store.rows_file.shape[1] * 4
    return {"adapters": len(files), "capacity": capacity, "pack_s_per_file": pack_s,
            "store_bytes": int(row_bytes * len(files)), "row_bytes": row_bytes,
            "cold_one_s": {"p50": float(np.percentile(cold, 50)),
                           "p99": float(np.percentile(cold, 99)), "n": len(cold)},
            "cold_batch": {"rows": b, "median_s": common.median(cold_batch_s),
                           "rows_per_s": b / common.median(cold_batch_s)},
            "resident_batch": {"rows": b, "median_s": common.median(warm["resident"]),
                               "rows_per_s": b / common.median(warm["resident"])}}


# ----------------------------------------------------------------------------- run
def anchor_run(reps: int) -> dict:
    """The PEFT anchor at the issue's point: the real MiniLM, 256 rows x 16 tokens naming 1, 16
    and 256 distinct adapters, our bank against PEFT's mixed batch at the same rank and
    targets, both with 2 threads on this CPU, one after the other in this process."""
    m = _models(False)[0]
    if not m["torch"]:
        raise SystemExit("--anchor needs the real MiniLM asset: python -m "
                         "loraxs_jax.experiments.assets fetch minilm")
    b, t, distinct = 256, 16, [1, 16, 256]
    with tempfile.TemporaryDirectory() as tmp:
        files, _ = write_adapters(m, Path(tmp), max(distinct), 1e9)
        by_name = dict(files)
        bank = AdapterBank(m["params"], m["cfg"], max(distinct) + 1, source=_Files(by_name))
        ours = throughput(m, bank, [n for n, _ in files], by_name, b, t, distinct, reps)
    peft = peft_anchor(b, t, m["cfg"].rank, reps, distinct=tuple(distinct))
    over = {d: ours["rows_per_s"][f"bank-{d}"] / peft["rows_per_s"][f"peft-{d}"]
            for d in distinct}
    res = {"setup": m["desc"], "rank": m["cfg"].rank, "rows": b, "tokens": t, "reps": reps,
           "ours": ours, "peft": peft, "ours_over_peft_throughput": over}
    path = common.write_result("serving_anchor", res, anchor_tables, False)
    return {"path": str(path), **res}


def anchor_tables(r: dict) -> str:
    rows_ = []
    for d, x in r["ours_over_peft_throughput"].items():
        rows_.append([d, r["ours"]["rows_per_s"][f"bank-{d}"], r["peft"]["rows_per_s"][f"peft-{d}"],
                      x])
    return (f"{r['setup']}; rank {r['rank']}; {r['rows']} rows × {r['tokens']} tokens per batch, "
            f"medians of {r['reps']} rounds. Ours: the `AdapterBank` per-row path (JAX); PEFT: "
            "LoRA at the same rank on the same kernels, mixed batch by `adapter_names` (torch "
            "CPU, 2 threads). Merged single model (ours): "
            f"{r['ours']['rows_per_s']['merged']:,.0f} rows/s; torch base: "
            f"{r['peft']['rows_per_s']['torch base']:,.0f} rows/s.\n\n"
            + common.md_table(["distinct adapters in the batch", "ours rows/s", "PEFT rows/s",
                               "ours / PEFT throughput"], rows_) + "\n")


def run(smoke: bool = False, reps: int | None = None, anchor: bool = False) -> dict:
    if anchor:
        return anchor_run(reps or 3)
    reps = reps or (2 if smoke else 3)
    b, t = (16, 8) if smoke else (256, 16)
    distinct = [1, 4, 16] if smoke else [1, 16, 256]
    big = None if smoke else 4096
    budget_s = 5 if smoke else 45
    res: dict = {"reps": reps, "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for m in _models(smoke):
            folder = Path(tmp) / m["name"]
            folder.mkdir()
            n_files = max(big or 0, max(distinct)) + (200 if smoke else 100_000)
            t0 = time.perf_counter()
            files, write_s = write_adapters(m, folder, n_files, budget_s)
            need = max(big or 0, max(distinct))
            if len(files) < need:                       # the budget must cover the batches
                more, _ = write_adapters(m, folder, need, 1e9, seed=1)
                files = files + [(f"x{n}", p) for n, p in more[len(files):need]]
            print(f"[serving] {m['name']}: {len(files)} adapter files in "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)
            by_name = dict(files)
            names = [n for n, _ in files]
            cap = (big or max(distinct)) + 1
            bank = AdapterBank(m["params"], m["cfg"], cap, source=_Files(by_name))
            r: dict = {"setup": m["desc"], "rank": m["cfg"].rank,
                       "matrices": len(bank.targets), "write_s_per_file": write_s}
            heads = sum(int(np.prod(s)) * d.itemsize for p, s, d in bank.layout
                        if not p.endswith("_loraxs_R"))
            r["memory"] = {"bytes_per_adapter": bank.bytes_per_adapter(),
                           "r2_matrices_4": sum(int(np.prod(t_.stack or (1,))) for t_ in
                                                bank.targets) * m["cfg"].rank ** 2 * 4,
                           "head_bytes": heads,
                           "state_bytes_per_slot": sum(v.nbytes for v in bank.state.values())
                           // bank.capacity,
                           "file_bytes": int(files[0][1].stat().st_size)}
            loads = []
            for name, path in files[:64 if not smoke else 8]:
                t1 = time.perf_counter()
                bank.load("L" + name, path, pin=False)
                jax.block_until_ready(bank.state)
                loads.append(time.perf_counter() - t1)
            r["load_file_s"] = {"p50": float(np.percentile(loads[1:], 50)),
                                "p99": float(np.percentile(loads[1:], 99)), "first": loads[0]}
            for name, _ in files[:len(loads)]:
                bank.unload("L" + name)
            r["throughput"] = throughput(m, bank, names, by_name, b, t, distinct, reps)
            print(f"[serving] {m['name']}: rows/s " + ", ".join(
                f"{k} {v:,.0f}" for k, v in r["throughput"]["rows_per_s"].items()), flush=True)
            if big:
                r["big_batch"] = big_batch(m, bank, names, by_name, big, t)
                print(f"[serving] {m['name']}: {big} adapters in one batch: "
                      f"{r['big_batch']['over_merged']}", flush=True)
            del bank
            if m["torch"]:
                r["peft"] = peft_anchor(min(b, 64), t, m["cfg"].rank, reps)
                print(f"[serving] peft: {r['peft']['rows_per_s']}", flush=True)
            r["store"] = store_bench(m, files, folder, b + 1, b, t,
                                     200 if not smoke else 10)
            s = r["store"]
            s["million"] = {"store_bytes": s["row_bytes"] * MILLION,
                            "write_s": (write_s + s["pack_s_per_file"]) * MILLION,
                            "extrapolated": len(files) < MILLION}
            print(f"[serving] {m['name']}: store of {s['adapters']:,}: cold p50 "
                  f"{s['cold_one_s']['p50'] * 1e3:.2f} ms", flush=True)
            res["models"][m["name"]] = r
    path = common.write_result("serving", res, tables, smoke)
    return {"path": str(path), **res}


class _Files:
    """A source over {name: adapter file}: the bank packs each on ``ensure``."""

    def __init__(self, files: dict):
        self.files = files

    def __contains__(self, name):
        return name in self.files

    def names(self):
        return list(self.files)

    def rows(self, bank, names):
        return np.stack([bank.pack(self.files[n]) for n in names])


def tables(res: dict) -> str:
    out = ["Measured on the CPU named above (no GPU), shared with other jobs: absolute rows/s are "
           "low and noisy; the ratios between contenders, measured side by side, are the point. "
           "`bank-D`: the per-row path with D distinct adapters resident and mixed in the batch; "
           "`merged`: the single adapter merged into W (the base's program); `unmerged-1`: one "
           "adapter through `loraxs_jax.wrap`."]
    for name, r in res["models"].items():
        tp = r["throughput"]
        rows_ = [[k, tp["median_s"][k] * 1e3, tp["rows_per_s"][k], tp["over_merged"][k]]
                 for k in tp["median_s"]]
        if "big_batch" in r:
            bb = r["big_batch"]
            rows_ += [[f"{k} (batch of {bb['rows']})", bb["median_s"][k] * 1e3,
                       bb["rows_per_s"][k], bb["over_merged"][k]] for k in bb["median_s"]]
        out.append(f"## {name}\n\n{r['setup']}; rank {r['rank']}, {r['matrices']} adapted "
                   f"matrices; batch {tp['rows']} rows × {tp['tokens']} tokens.\n\n"
                   + common.md_table(["contender", "ms / batch", "rows / s", "time / merged"],
                                     rows_))
        mem = r["memory"]
        out.append(common.md_table(
            ["bytes per resident adapter", "r² × matrices × 4", "+ head", "device state / slot",
             "adapter file"],
            [[mem["bytes_per_adapter"], mem["r2_matrices_4"], mem["head_bytes"],
              mem["state_bytes_per_slot"], mem["file_bytes"]]]))
        lf = r["load_file_s"]
        out.append(f"Load one adapter file into a slot (read, sha256, every check, scatter): p50 "
                   f"{lf['p50'] * 1e3:.2f} ms, p99 {lf['p99'] * 1e3:.2f} ms (first, with "
                   f"compile: {lf['first'] * 1e3:.0f} ms).")
        if "peft" in r:
            p = r["peft"]
            out.append(f"PEFT anchor (torch CPU, real MiniLM, LoRA r={p['rank']} on the same "
                       f"kernels, mixed batch by adapter_names):\n\n" + common.md_table(
                           ["contender", "ms / batch", "rows / s", "time / torch base"],
                           [[k, v * 1e3, p["rows_per_s"][k], p["over_torch_base"][k]]
                            for k, v in p["median_s"].items()]))
        s = r["store"]
        mil = s["million"]
        out.append(
            f"Store: {s['adapters']:,} adapters written and packed here ({r['write_s_per_file'] * 1e3:.2f}"
            f" ms to write + {s['pack_s_per_file'] * 1e3:.2f} ms to pack per file), "
            f"{s['store_bytes'] / common.MB:,.1f} MiB memory-mapped; bank of {s['capacity']} "
            f"slots. Cold adapter (ensure of one non-resident adapter): p50 "
            f"{s['cold_one_s']['p50'] * 1e3:.2f} ms, p99 {s['cold_one_s']['p99'] * 1e3:.2f} ms "
            f"over {s['cold_one_s']['n']} requests. A batch of {s['cold_batch']['rows']} random "
            f"adapters, mostly cold: {s['cold_batch']['rows_per_s']:,.0f} rows/s vs "
            f"{s['resident_batch']['rows_per_s']:,.0f} rows/s all resident. "
            f"{'Extrapolated' if mil['extrapolated'] else 'Measured'} to 10⁶ adapters: "
            f"{mil['store_bytes'] / 2**30:,.1f} GiB of rows, "
            f"{mil['write_s'] / 3600:,.1f} h to write and pack on this machine (one core).")
    return "\n\n".join(out) + "\n"


def main(argv=None):
    common.cli(__doc__, run, argv, anchor="only the PEFT anchor at 256 rows (1, 16, 256 "
               "adapters), into serving_anchor.md")


if __name__ == "__main__":
    main()
