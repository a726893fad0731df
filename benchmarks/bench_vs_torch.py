"""Our CPU train step next to PyTorch's, on the same model, weights and batch: LoRA-XS, LoRA, full.

The demo's shape by default: all-MiniLM-L6-v2 (real weights), a mean-pooled 2-way head, batch
32×64 of random token ids, the paper's four GLUE targets, rank 8, α 16, AdamW, dropout off.
Both sides get the same threads (``--threads``, default every core: 2 on the reference machine)
and run side by side in one process, interleaved round by round (ours, torch, ours, torch, …
with the starting contender rotating), so a shared machine's load hits both alike; we report
the median over rounds of the paired ratio ours/torch.

Ours runs as the demo runs it: the CPU runtime settings of the demo's config (``runtime`` section
of ``configs/minilm_sst2.py``: host devices, data-parallel step) applied before JAX starts.

PyTorch (the ``reference`` extra) is transformers' ``BertModel`` in eager mode with the same
adapters written out: LoRA-XS ``y = xW + b + (α/r)·((x·A)·R)·B`` with A, B frozen buffers and R
trained; LoRA ``y = xW + b + (α/r)·(x·A)·B`` with A, B trained; full: every weight trained.

    python -m benchmarks.bench_vs_torch [--smoke] [--reps N] [--single-device]
"""

from __future__ import annotations

import math
import os
import re
import tempfile
from pathlib import Path

from benchmarks import common

METHODS = ("loraxs", "lora", "full")
LABELS = {"loraxs": "LoRA-XS (R only)", "lora": "LoRA (A, B)", "full": "full fine-tuning"}


# ----------------------------------------------------------------------------- ours
def _our_steps(folder: Path, batch: dict, rank: int, alpha: float, devices: int) -> dict:
    """{method: thunk} for our jitted steps; the batch split over ``devices`` host devices
    (data parallel, params replicated) when ``devices`` > 1."""
    import jax
    import optax

    import loraxs_jax
    from loraxs_jax.models import encoder as enc

    cfg, params = enc.load_encoder(folder, num_labels=2, head="mean", hidden_dropout=0.0,
                                   attention_dropout=0.0)
    model = enc.Encoder(cfg)
    setup = common.Setup("vs-torch", "encoder", model, params, batch, common.ENCODER_TARGETS,
                         rank, alpha, cfg.hidden_size, "")
    mesh = jax.sharding.Mesh(jax.devices()[:devices], ("data",))
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    whole = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    on_mesh = {k: jax.device_put(v, rows) for k, v in batch.items()}
    tx = optax.adamw(1e-3)
    steps = {}
    for m in METHODS:
        if m == "loraxs":
            lcfg = setup.loraxs_config(rank)
            t, f = loraxs_jax.split(loraxs_jax.apply(params, lcfg, 0), lcfg)
            fn = loraxs_jax.wrap(model.apply)
        elif m == "lora":
            t, f = common.lora_split(common.lora_apply(params, setup.targets, rank, alpha, 0))
            fn = common.lora_wrap(model.apply)
        else:
            t, f, fn = params, {}, model.apply
        # copies: the step donates its state, and full fine-tuning's state is the base
        # params that the other methods' frozen halves hold too
        t = jax.tree.map(lambda x: jax.device_put(x, whole).copy(), t)
        f = jax.device_put(f, whole)
        state = [t, jax.device_put(tx.init(t), whole)]
        step = jax.jit(common.optimizer_step(lambda p, b, fn=fn: setup.loss(fn, p, b), tx),
                       donate_argnums=(0, 1))

        def thunk(step=step, state=state, f=f):
            loss, state[0], state[1] = step(state[0], state[1], f, on_mesh)
            return loss

        steps[m] = thunk
    return steps


# ----------------------------------------------------------------------------- torch
def _torch_steps(folder: Path, batch: dict, rank: int, alpha: float) -> dict:
    """{method: thunk}: transformers' BertModel + mean pooling + a linear head, AdamW."""
    import numpy as np
    import torch
    from transformers import BertModel

    targets = [re.compile(t) for t in common.ENCODER_TARGETS]

    class Adapted(torch.nn.Module):
        def __init__(self, base: torch.nn.Linear, how: str, gen: torch.Generator):
            super().__init__()
            self.base, self.how, self.scale = base, how, alpha / rank
            d_in, d_out = base.in_features, base.out_features
            w = base.weight.detach().T                       # (in, out)
            if how == "loraxs":                              # A = U_r, B = Σ_r V_rᵀ (frozen)
                u, s, vh = torch.linalg.svd(w, full_matrices=False)
                self.register_buffer("a", u[:, :rank].contiguous())
                self.register_buffer("b", (s[:rank, None] * vh[:rank]).contiguous())
                self.r = torch.nn.Parameter(torch.randn(rank, rank, generator=gen) * 1e-5)
            else:
                bound = 1.0 / math.sqrt(d_in)
                self.a = torch.nn.Parameter(torch.empty(d_in, rank).uniform_(-bound, bound,
                                                                             generator=gen))
                self.b = torch.nn.Parameter(torch.zeros(rank, d_out))

        def forward(self, x):
            h = x @ self.a
            if self.how == "loraxs":
                h = h @ self.r
            return self.base(x) + (h @ self.b) * self.scale

    class Classifier(torch.nn.Module):
        def __init__(self, how: str):
            super().__init__()
            self.bert = BertModel.from_pretrained(folder, add_pooling_layer=False,
                                                  attn_implementation="sdpa",
                                                  hidden_dropout_prob=0.0,
                                                  attention_probs_dropout_prob=0.0)
            self.classifier = torch.nn.Linear(self.bert.config.hidden_size, 2)
            gen = torch.Generator().manual_seed(0)
            if how != "full":
                for p in self.bert.parameters():
                    p.requires_grad_(False)
                for name, mod in list(self.bert.named_modules()):
                    path = name.replace(".", "/") + "/kernel"
                    if isinstance(mod, torch.nn.Linear) and any(t.search(path) for t in targets):
                        parent, _, child = name.rpartition(".")
                        setattr(self.bert.get_submodule(parent), child, Adapted(mod, how, gen))

        def forward(self, ids, mask):
            hidden = self.bert(input_ids=ids, attention_mask=mask).last_hidden_state
            m = mask.unsqueeze(-1).to(hidden.dtype)
            return self.classifier((hidden * m).sum(1) / m.sum(1).clamp(min=1e-9))

    ids = torch.from_numpy(np.asarray(batch["input_ids"]).astype(np.int64))
    mask = torch.from_numpy(np.asarray(batch["attention_mask"]).astype(np.int64))
    labels = torch.from_numpy(np.asarray(batch["labels"]).astype(np.int64))
    steps = {}
    for m in METHODS:
        net = Classifier(m).train()
        opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-3)

        def thunk(net=net, opt=opt):
            opt.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(net(ids, mask), labels)
            loss.backward()
            opt.step()
            return None

        steps[m] = thunk
    return steps


def _tiny_bert(folder: Path) -> Path:
    """A random 1-layer BERT folder (smoke runs: no asset needed)."""
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(vocab_size=256, hidden_size=64, num_hidden_layers=1,
                         num_attention_heads=4, intermediate_size=128,
                         max_position_embeddings=64)).save_pretrained(folder)
    return folder


# ----------------------------------------------------------------------------- run
def measure(folder: Path, batch_size: int, seq: int, rank: int, alpha: float, reps: int,
            devices: int, threads: int) -> dict:
    import jax
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    vocab = 256 if batch_size * seq <= 256 else 30522
    rng = np.random.default_rng(0)
    batch = {"input_ids": rng.integers(3, vocab, (batch_size, seq)).astype(np.int32),
             "attention_mask": np.ones((batch_size, seq), np.int32),
             "labels": rng.integers(0, 2, (batch_size,)).astype(np.int32)}
    ours = _our_steps(folder, batch, rank, alpha, devices)
    theirs = _torch_steps(folder, batch, rank, alpha)
    fns = {f"ours/{m}": ours[m] for m in METHODS} | {f"torch/{m}": theirs[m] for m in METHODS}
    if devices > 1:              # the step before the runtime section: one device
        one = _our_steps(folder, batch, rank, alpha, 1)
        fns |= {f"ours_1dev/{m}": one[m] for m in METHODS}
    times = common.interleaved(fns, reps, warmup=2)
    rows = {}
    for m in METHODS:
        a, b = times[f"ours/{m}"], times[f"torch/{m}"]
        rows[m] = {"ours_median_s": common.median(a), "torch_median_s": common.median(b),
                   "ours_times_s": a, "torch_times_s": b,
                   "ratio": common.median([x / y for x, y in zip(a, b)]),
                   "ratio_of_medians": common.median(a) / common.median(b)}
        if devices > 1:
            c = times[f"ours_1dev/{m}"]
            rows[m] |= {"ours_1dev_median_s": common.median(c), "ours_1dev_times_s": c,
                        "ratio_1dev": common.median([x / y for x, y in zip(c, b)]),
                        "ours_over_1dev": common.median([x / y for x, y in zip(a, c)])}
    return {"setup": f"batch {batch_size}×{seq} random ids, rank {rank}, α {alpha}, AdamW, "
                     f"dropout off, {threads} threads each; ours on {devices} host device(s) "
                     f"({jax.device_count()} present)",
            "rank": rank, "devices": devices, "threads": threads, "torch": torch.__version__,
            "methods": rows}


def table(data: dict) -> str:
    r = data["result"]
    one = r["devices"] > 1
    rows = [[LABELS[m], d["ours_median_s"] * 1e3, d["torch_median_s"] * 1e3, d["ratio"],
             d["ratio_of_medians"]] + ([d["ours_1dev_median_s"] * 1e3, d["ratio_1dev"],
                                        d["ours_over_1dev"]] if one else [])
            for m, d in r["methods"].items()]
    t = common.md_table(["method", "ours ms (median)", "torch ms (median)",
                         "ours/torch (paired median)", "ratio of medians"]
                        + (["ours on 1 device ms", "1 device/torch (paired)",
                            "ours/1 device (paired)"] if one else []), rows)
    return (f"## {data['model']}\n\n{r['setup']}; torch {r['torch']}; "
            f"{len(r['methods']['loraxs']['ours_times_s'])} rounds\n\n{t}\n\n{NOTES}"
            + ("" if data.get("smoke") else FINDINGS))


NOTES = """Notes. One process, all contenders interleaved round-robin (the starting one rotates
each round); "paired" is the median over rounds of ours/torch timed back to back in that round,
robust to load that drifts on a shared machine. The machine is shared with other jobs: read the
ratios, not the absolute times. Ours runs the demo's CPU runtime settings (the config's ``runtime``
section); torch runs eager with ``torch.set_num_threads`` equal to our core count. "1 device":
our step as it ran before the runtime section (one host device), in the same rounds.
"""


FINDINGS = """
## Findings (2026-12-01, this machine: AMD EPYC (Zen 4, AVX-512), 2 cores shared with other jobs)

**Load caveat.** Every measurement below ran at load average 7–10 on 2 cores (a training
queue at nice 19 and other test runs). Under that load PyTorch's 2-thread step collapses
(OpenMP threads wait at barriers for cores they do not get: 8–16 s a step here against
0.479 s measured on a quieter machine), so the ours/torch column above says nothing about
the quiet-machine gap; the paired ours/1-device column (the same rounds, the same load) does.
Earlier quiet-machine numbers from the issue (2 threads each, LoRA-XS r=8): ours 0.695 s, torch
0.479 s (1.39×); LoRA 1.54×; full 1.55×; our encoder equals transformers' FlaxBert.

**Where the time goes.** The compiled LoRA-XS step (32×64, r=8, one device) is 92.3 GFLOP
(cost_analysis): 0.695 s is 133 GFLOP/s, torch's 0.479 s is 193 GFLOP/s, so the gap is matmul
throughput, not extra work. The entry computation holds 695 fusions (387 loop, 308 dot fusions;
270 dots in the module, no library custom calls: XLA's own CPU matmuls), 94 transposes and
147 copies, almost all around the attention heads ((32, 64, 12, 32) ↔ (32, 12, 64, 32)) and the
rank-8 products (f32[8, 32, 64]: x·A and its gradient transposed).

**Tried, not kept** (separate processes at load 7–8, ours alone, 1 device, LoRA-XS 32×64):
`--xla_cpu_use_xnnpack=true` 1.60 s and `--xla_cpu_use_onednn=true` 1.59 s against 1.56 s
(no gain within noise); `model.scan_layers=True` compiles ~20 % faster but steps ~5 % slower;
dropout PRNG `rbg`/`unsafe_rbg` instead of threefry: no gain (0.66/0.72 s against 0.64 s at
the demo's width 32). Dropout itself costs ~20 % of a demo step (0.53 s without against 0.64 s
at width 32) but is the checkpoint's and stays (accuracy). Attention already runs
`jax.nn.dot_product_attention` whenever no attention dropout is drawn. Padding every batch to
32-token multiples instead of 16 (2 compiles instead of 4) would add 18.6 % tokens to an epoch
(12,864 against 10,848 token columns × 32): more than the two compiles it saves.

**Kept** (the config's `runtime` section, applied before JAX starts): `runtime.host_devices=2`
for the demo, a data-parallel step over the two cores: paired 0.98 (LoRA-XS), 0.84 (LoRA),
0.78 (full) of the one-device step in the 5 rounds above (ratios of medians 0.93, 0.86, 0.93);
0.95 for LoRA-XS in an earlier interleaved run at load 10 (6 rounds); 0.83 in the issue's
quieter measurement (0.67 s against 0.81 s). A small gain for LoRA-XS, in every measurement.
`runtime.compile_cache` (JAX's
persistent compilation cache, on by default): the first step of three length buckets took
48.6 s cold (36.9 s in another cold run) and 12.4 s from the cache; setup was too noisy to
tell (29–58 s cold, 43 s cached). The demo compiles one train step per
length bucket (widths 16, 32, 48, 64). The demo's accuracy is unchanged: 0.8394 final on SST-2
validation with both, as before (83.94 %).

**The demo** (`train.py --config=configs/minilm_sst2.py`, 304 steps, 4 evaluations), two runs
started together at load ~8 (so each had the other as load too): before (one device, no
cache: `--config.runtime.host_devices=0 --config.runtime.compile_cache=`) 606 s wall, progress
bar 8:46; after (the defaults, cache warm from an earlier run) 558 s wall, bar 7:49 (0.92 of
the wall, 0.89 of the bar). Both print `step 100/304: accuracy=0.8234`, `step 200/304:
accuracy=0.8383`, final 0.8394. A cold-cache run of the defaults took 707 s next to this
benchmark. At this load the issue's 3-minute goal cannot be judged: the issue's 4:53 was
measured on a quieter machine. The console holds the bar, one line per evaluation and the
summary; log.txt in the workdir holds the 175 orbax/absl INFO lines.

**Quiet machine** (06:08 UTC, the training queue paused, load 0.0 at the start; the table
above is this run): ours/torch paired 0.70 (LoRA-XS), 0.73 (LoRA), 0.77 (full) with the demo's
2 host devices, and 0.65, 0.86, 0.83 on one device: the goal (≤ 1.0) and the stretch goal
(≤ 0.8) are met for LoRA-XS either way. Our one-device LoRA-XS step is 378 ms here against the
issue's 695 ms, torch's 587 ms against 479 ms; this benchmark builds the encoder directly, so
the cause of the issue's figure is not known here. The demo, which builds its model through
the config, rematerialised every encoder layer until issue 12's fix (`model.remat='none'`
reached the encoder as a truthy string): the likeliest reason for most of the demo's drop from
4:53 to 2:10 below. Data parallelism over the
two cores helps LoRA (0.86) and full fine-tuning (0.92) but not LoRA-XS (1.07, whose step is
too small to split well); the demo keeps 2 devices, the default for every method.
The demo with the defaults and an empty compilation cache (a user's first run): **2:10 wall**
(`/usr/bin/time`), 126 s from start to summary, accuracies 0.8234 / 0.8383 / 0.8394 as before.
"""

def run(smoke: bool = False, reps: int | None = None, single_device: bool = False) -> dict:
    from loraxs_jax.experiments import runtime

    reps = reps or (2 if smoke else 9)
    # the demo's data-parallel width, where JAX has that many devices (a process that
    # started JAX elsewhere, e.g. the tests', may have more or fewer)
    wanted = max(runtime.demo_runtime().host_devices, 1)
    devices = 1 if single_device or runtime.host_devices() < wanted else wanted
    threads = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        if smoke:
            folder, name, shape, rank = _tiny_bert(Path(tmp)), "tiny-bert", (4, 16), 4
        else:
            from loraxs_jax.experiments.assets import asset_path

            folder, name, shape, rank = Path(asset_path("minilm")), "all-MiniLM-L6-v2", (32, 64), 8
        result = measure(folder, *shape, rank, 16.0, reps, devices, threads)
    print("[vs_torch] " + ", ".join(f"{m} ours/torch {d['ratio']:.3f}"
                                    for m, d in result["methods"].items()), flush=True)
    path = common.write_result("vs_torch", {"model": name, "result": result}, table, smoke)
    return {"path": str(path), "model": name, "result": result}


def main(argv=None):
    from loraxs_jax.experiments import runtime

    runtime.configure_cpu_from_default()      # before JAX starts: the demo's CPU settings
    common.cli(__doc__, run, argv, single_device="ours on one host device (no data parallel)")


if __name__ == "__main__":
    main()
