"""The paper's "millions of personalized models", literally: 10⁶ adapters of one MiniLM served
from one memory-mapped store.

Every adapter is a real adapter file (R of rank 8 on MiniLM's 24 paper targets, synthetic
values R ~ N(0, 0.1²), written by ``io.save_tensors`` with ``save_adapter``'s metadata: header,
config, base fingerprint and sha256) packed into the store through ``AdapterBank.pack``, the
checks ``load_adapter`` makes. The files pass through one path in turn (each is packed before
the next is written), so the run needs the store's disk (6 GiB), not 10⁶ inodes.

Then, against a bank of 257 device slots over the store:

* resident memory (RSS) of the serving process, with the store mapped;
* time to make a cold adapter servable (``ensure`` of one adapter not in a slot: read its row
  from the map, scatter it into a slot): p50/p99 over random adapters of the million;
* throughput of batches of 256 rows naming 256 random adapters of the million (mostly cold),
  against the same batch with all its adapters already in slots, side by side.

    python -m benchmarks.bench_million [--smoke] [--adapters N]
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import loraxs_jax as lx
from benchmarks import common
from loraxs_jax import io as lxio
from loraxs_jax.models import encoder as enc
from loraxs_jax.serving import AdapterBank, AdapterStore, rows


def rss_bytes() -> dict[str, int]:
    """This process's resident memory (Linux /proc; zeros elsewhere): ``total`` (VmRSS),
    ``anon`` (private memory) and ``file`` (mapped file pages, the store's among them, which the
    kernel can drop and re-read)."""
    out = {"total": 0, "anon": 0, "file": 0}
    keys = {"VmRSS:": "total", "RssAnon:": "anon", "RssFile:": "file"}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            k = line.split(":")[0] + ":"
            if k in keys:
                out[keys[k]] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return out


def _model(smoke: bool):
    if not smoke and common.have_asset("minilm"):
        from loraxs_jax.experiments.assets import asset_path

        c, params = enc.load_encoder(asset_path("minilm"), num_labels=2, head="mean")
        desc = f"all-MiniLM-L6-v2 (real weights) H={c.hidden_size} L={c.num_layers}"
    else:
        c = enc.EncoderConfig(vocab_size=256, hidden_size=64, num_layers=2, num_heads=4,
                              intermediate_size=128, max_positions=64, num_labels=2)
        params = enc.init_encoder(c, jax.random.key(0))
        desc = f"tiny encoder, random weights H={c.hidden_size} L={c.num_layers}"
    return c, params, desc


def run(smoke: bool = False, adapters: int | None = None) -> dict:
    n = adapters or (3_000 if smoke else 1_000_000)
    capacity, b, t = (33, 32, 8) if smoke else (257, 256, 16)
    requests = 200 if smoke else 2_000
    c, params, desc = _model(smoke)
    cfg = lx.LoraXSConfig(rank=8, alpha=16.0, targets=enc.PAPER_TARGETS)
    rss0 = rss_bytes()
    with tempfile.TemporaryDirectory(dir=os.environ.get("LORAXS_BENCH_TMP")) as tmp:
        tmp = Path(tmp)
        template = lx.save_adapter(tmp / "template", lx.apply(params, cfg, 0), cfg)
        tensors, meta = lxio.read_tensors(template)
        meta = {k: v for k, v in meta.items() if k != "sha256"}   # a new digest per file
        file_bytes = template.stat().st_size
        bank = AdapterBank(params, cfg, capacity)
        bank.pack(template)                                 # the base fingerprint, once
        rng = np.random.default_rng(0)
        timing = {"write": 0.0}

        # The files are transient (each deleted once packed): they are written where fsync is
        # free when a RAM filesystem is there, since save_tensors fsyncs every file and 10⁶
        # fsyncs on a shared disk cost more than everything else. The bytes are the same.
        scratch = Path(tempfile.mkdtemp(dir="/dev/shm" if Path("/dev/shm").is_dir() else tmp))

        def files():
            previous = None
            for i in range(n):
                t0 = time.perf_counter()
                if previous is not None:
                    previous.unlink()
                new = {k: rng.normal(0, 0.1, v.shape).astype(v.dtype) for k, v in tensors.items()}
                previous = lxio.save_tensors(scratch / f"user{i:07d}.safetensors", new, meta)
                timing["write"] += time.perf_counter() - t0
                yield f"user{i:07d}", previous

        t0 = time.perf_counter()
        every = max(n // 20, 1)
        store = AdapterStore.create(
            tmp / "store", bank, files(), n,
            progress=lambda i: print(f"[million] {i:,}/{n:,} adapters written and packed, "
                                     f"{time.perf_counter() - t0:,.0f} s", flush=True)
            if i % every == 0 or i == n else None)
        build_s = time.perf_counter() - t0
        shutil.rmtree(scratch, ignore_errors=True)
        store_bytes = (tmp / "store" / "rows.npy").stat().st_size
        del bank, store
        rss_before_open = rss_bytes()

        # ------------------------------------------------------------------ serving
        store = AdapterStore(tmp / "store")
        bank = AdapterBank(params, cfg, capacity, source=store)
        names = store.names()
        rss_open = rss_bytes()
        bank.ensure([names[0]])                             # compile the one-row scatter
        cold = []
        for _ in range(requests):
            name = names[rng.integers(n)]
            while name in bank:
                name = names[rng.integers(n)]
            t1 = time.perf_counter()
            bank.ensure([name])
            jax.block_until_ready(bank.state)
            cold.append(time.perf_counter() - t1)
        ids = jnp.asarray(rng.integers(1, c.vocab_size, (b, t)), jnp.int32)
        mask = jnp.ones((b, t), jnp.int32)
        per_row = jax.jit(functools.partial(rows.encoder_logits, enc.Encoder(c)))
        draws = [list(rng.choice(n, b, replace=False)) for _ in range(6)]
        draws = [[names[i] for i in d] for d in draws]

        def cold_batch(k):
            slots = bank.ensure(draws[k])
            return per_row(bank.arrays(), jnp.asarray(slots), ids, mask)

        common.block(cold_batch(0))                         # compile
        resident = jnp.asarray(bank.ensure(draws[0]))
        cold_s, warm_s = [], []
        for k in range(1, len(draws)):                      # interleaved: cold, then resident
            t1 = time.perf_counter()
            common.block(cold_batch(k))
            cold_s.append(time.perf_counter() - t1)
            resident = jnp.asarray(bank.ensure(draws[k]))   # now all in slots
            t1 = time.perf_counter()
            common.block(per_row(bank.arrays(), resident, ids, mask))
            warm_s.append(time.perf_counter() - t1)
        rss_served = rss_bytes()
        res = {
            "setup": desc, "rank": cfg.rank, "matrices": len(bank.targets), "adapters": n,
            "file_bytes": file_bytes, "row_bytes": bank.row_size * 4, "store_bytes": store_bytes,
            "build_s": build_s, "write_s_per_adapter": timing["write"] / n,
            "pack_s_per_adapter": (build_s - timing["write"]) / n, "capacity": capacity,
            "scratch": str(scratch.parent),
            "rss": {"start": rss0, "after_build": rss_before_open, "store_open": rss_open,
                    "after_serving": rss_served},
            "cold_one_s": {"p50": float(np.percentile(cold, 50)),
                           "p99": float(np.percentile(cold, 99)), "n": len(cold)},
            "batch": {"rows": b, "tokens": t, "cold_s": cold_s, "resident_s": warm_s,
                      "cold_rows_per_s": b / common.median(cold_s),
                      "resident_rows_per_s": b / common.median(warm_s),
                      "cold_over_resident_time": common.median(
                          [x / y for x, y in zip(cold_s, warm_s)])},
        }
    path = common.write_result("million", res, tables, smoke)
    return {"path": str(path), **res}


def tables(r: dict) -> str:
    gib = 2 ** 30
    rss = r["rss"]
    bt = r["batch"]
    return "\n\n".join([
        f"{r['setup']}; LoRA-XS rank {r['rank']} on {r['matrices']} matrices, no head: "
        f"{r['row_bytes']:,} B of R per adapter (r² × matrices × 4), {r['file_bytes']:,} B per "
        "adapter file (header, config, fingerprint, sha256; written transiently under "
        f"{r['scratch']}). CPU named above, no GPU, shared "
        "with other jobs.",
        common.md_table(
            ["adapters registered", "store on disk", "build (write + pack)", "write / adapter",
             "pack / adapter"],
            [[f"{r['adapters']:,}", f"{r['store_bytes'] / gib:.2f} GiB",
              f"{r['build_s'] / 60:.1f} min", f"{r['write_s_per_adapter'] * 1e3:.2f} ms",
              f"{r['pack_s_per_adapter'] * 1e3:.2f} ms"]]),
        "Resident memory of the process (VmRSS = private + mapped file pages):",
        common.md_table(
            ["", "at start", "after building", f"store opened (bank of {r['capacity']} slots)",
             "after serving"],
            [[kind] + [f"{rss[k][key] / common.MB:,.0f} MiB" for k in
                       ("start", "after_build", "store_open", "after_serving")]
             for kind, key in (("VmRSS", "total"), ("private (RssAnon)", "anon"),
                               ("mapped file (RssFile)", "file"))]),
        f"Cold adapter made servable (one `ensure`: its row read from the map, scattered into a "
        f"slot): p50 {r['cold_one_s']['p50'] * 1e3:.2f} ms, p99 "
        f"{r['cold_one_s']['p99'] * 1e3:.2f} ms over {r['cold_one_s']['n']:,} random adapters "
        "of the store.",
        common.md_table(
            [f"batch of {bt['rows']} rows × {bt['tokens']} tokens, {bt['rows']} random adapters",
             "rows / s", "time / all-resident (paired)"],
            [["mostly cold (rows read from the store, scattered, then the forward)",
              f"{bt['cold_rows_per_s']:,.0f}", f"{bt['cold_over_resident_time']:.2f}"],
             ["all resident (the forward alone)", f"{bt['resident_rows_per_s']:,.0f}", "1"]]),
    ]) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="3,000 adapters of a tiny encoder")
    p.add_argument("--adapters", type=int, default=None, help="how many (default 10⁶)")
    print(run(**vars(p.parse_args(argv)))["path"])


if __name__ == "__main__":
    main()
