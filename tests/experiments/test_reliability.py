"""The reliability suite (issue 12): bad inputs across the command line, configs, the library API
and files, each refused with our error naming the culprit; kill-and-resume rounds that end
bit-identical to an uninterrupted run; NaN never reaching what is kept; no network with the
assets cached.

Runs use the tiny BERT of conftest.py at max_length 16 (one compiled train shape)."""

import json
import math
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from safetensors.numpy import load_file

import loraxs_jax as lx
from loraxs_jax.experiments import evaluate as evaluate_lib
from loraxs_jax.experiments import modeling, train
from loraxs_jax.experiments.reporting import read_metrics
from loraxs_jax.experiments.validate import ConfigError
from loraxs_jax.io import AdapterFileError


def run_config(tiny_config, tiny_bert, **over):
    """6 steps of 16; log every 3, evaluate every 3, checkpoint every 2 (so a checkpoint falls
    inside a logging window)."""
    return tiny_config(tiny_bert, **{"task.max_length": 16, "log_every_steps": 3, **over})


# ----------------------------------------------------------------------------- shared inputs
@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Small adapter files, good and bad, and the base they belong to."""
    d = tmp_path_factory.mktemp("files")
    rng = np.random.default_rng(0)
    base = {f"l{i}": {"q": {"kernel": jnp.asarray(rng.normal(size=(8, 6)), jnp.float32)}}
            for i in range(2)}
    cfg = lx.LoraXSConfig(rank=2, targets=(r"q/kernel$",))
    good = lx.save_adapter(d / "good", lx.apply(base, cfg, 0), cfg)
    data = good.read_bytes()
    out = {"base": base, "cfg": cfg, "good": good, "dir": d}
    for name, content in {"half": data[:len(data) // 2], "empty": b"",
                          "renamed": json.dumps({"config": cfg.to_dict()}).encode(),
                          "flipped": data[:-3] + bytes([data[-3] ^ 0x10]) + data[-2:],
                          "huge": (2**62).to_bytes(8, "little") + data[8:]}.items():
        (d / f"{name}.safetensors").write_bytes(content)
        out[name] = d / f"{name}.safetensors"
    bases = lx.io.save_tensors(d / "bases.safetensors", {"x": np.zeros(2, np.float32)},
                               {"format": "loraxs-jax/bases-v2"})
    out["bases"] = bases
    (d / "metrics.jsonl").write_text('{"split": "train", "step": 1}\n{"spl\n{"step": 3}\n')
    return out


def _refused_before_building(ctx, monkeypatch, path):
    """eval.py on a bad adapter: our error, before any model is built (it took 106 s)."""
    monkeypatch.setattr(modeling, "build_model", lambda *a: pytest.fail("model was built"))
    evaluate_lib.evaluate(ctx["config"], str(path), "adapted")


def _save_with_nan(ctx):
    adapted = lx.apply(ctx["base"], ctx["cfg"], 0)
    adapted["l1"]["q"]["kernel_loraxs_R"] = jnp.full((2, 2), jnp.nan)
    lx.save_adapter(ctx["dir"] / "x", adapted, ctx["cfg"])


def _train(ctx, **fields):
    train.train_and_evaluate(ctx["with_values"](ctx["config"], **fields), ctx["workdir"])


def _in_workdir(ctx, old, new):
    """A workdir whose config.json holds ``old`` changes; run ``new`` changes in it."""
    (ctx["workdir"]).mkdir()
    (ctx["workdir"] / "config.json").write_text(
        ctx["with_values"](ctx["config"], **old).to_json_best_effort(indent=2))
    ctx["keep"] = (ctx["workdir"] / "config.json").read_bytes()
    _train(ctx, **new)


BAD_INPUTS = [
    # config: refused by train_and_evaluate before anything is loaded or written
    ("config", "optim.lr=-1", lambda c, m: _train(c, **{"optim.lr": -1.0}),
     ConfigError, r"config.optim.lr=-1.0: expected a finite number in \(0, inf\)"),
    ("config", "log_every_steps=0", lambda c, m: _train(c, log_every_steps=0),
     ConfigError, r"config.log_every_steps=0: expected an int >= 1"),
    ("config", "model.dtype=float33", lambda c, m: _train(c, **{"model.dtype": "float33"}),
     ConfigError, r"config.model.dtype='float33': expected one of float32, bfloat16"),
    ("config", "loraxs.alpha=0", lambda c, m: _train(c, **{"loraxs.alpha": 0.0}),
     ConfigError, r"config.loraxs: LoraXSConfig.alpha=0.0"),
    ("config", "loraxs.rank=4.5", lambda c, m: _train(c, **{"loraxs.rank": 4.5}),
     ConfigError, r"config.loraxs: LoraXSConfig.rank=4.5: expected an int >= 1"),
    ("config", "grad_accum=3 of 16", lambda c, m: _train(c, **{"optim.grad_accum": 3}),
     ConfigError, r"config.batch_size=16 is not divisible by config.optim.grad_accum=3"),
    ("config", "keep_checkpoints=0", lambda c, m: _train(c, keep_checkpoints=0),
     ConfigError, r"config.keep_checkpoints=0"),
    ("config", "task.glue=mnli", lambda c, m: _train(c, **{"task.glue": "mnli"}),
     ConfigError, r"config.task.glue='mnli': expected one of sst2"),
    ("config", "warmup_ratio=nan", lambda c, m: _train(c, **{"optim.warmup_ratio": math.nan}),
     ConfigError, r"config.optim.warmup_ratio=nan"),
    ("config", "model.path missing", lambda c, m: _train(c, **{"model.path": "/no/such/bert"}),
     ConfigError, r"config.model.path='/no/such/bert': expected an existing folder"),
    ("config", "train_limit=-1", lambda c, m: _train(c, **{"task.train_limit": -1}),
     ConfigError, r"config.task.train_limit=-1"),
    ("config", "optim.learning_rate", lambda c, m: _train(c, **{"optim.learning_rate": 1e-3}),
     ConfigError, r"config.optim.learning_rate: unknown field"),
    ("config", "mesh.data=0", lambda c, m: _train(c, **{"mesh.data": 0}),
     ConfigError, r"config.mesh.data=0"),
    ("config", "schedule=constant", lambda c, m: _train(c, **{"optim.schedule": "constant"}),
     ConfigError, r"config.optim.schedule='constant': expected one of linear, cosine"),
    ("config", "eval_every_steps=-1", lambda c, m: _train(c, eval_every_steps=-1),
     ConfigError, r"config.eval_every_steps=-1"),
    ("config", "resume=loraxs.rank", lambda c, m: _train(c, resume="loraxs.rank"),
     ConfigError, r"config.resume='loraxs.rank': .*loraxs.rank cannot change in a workdir"),
    # workdir: a workdir belongs to one config; config.json is left as it was
    ("workdir", "rank 16 -> 4", lambda c, m: _in_workdir(c, {"loraxs.rank": 16}, {}),
     ConfigError, r"holds a run of another config: loraxs.rank: 16 -> 4"),
    ("workdir", "lr without resume", lambda c, m: _in_workdir(c, {}, {"optim.lr": 1e-4}),
     ConfigError, r"optim.lr: 0.005 -> 0.0001\. .* add --config.resume=optim.lr"),
    ("workdir", "seed changed", lambda c, m: _in_workdir(c, {}, {"seed": 1}),
     ConfigError, r"holds a run of another config: seed: 0 -> 1"),
    # library API
    ("api", "bases_dtype=float33", lambda c, m: lx.LoraXSConfig(targets="q", bases_dtype="float33"),
     ValueError, r"LoraXSConfig.bases_dtype='float33'"),
    ("api", "alpha='16'", lambda c, m: lx.LoraXSConfig(targets="q", alpha="16"),
     ValueError, r"LoraXSConfig.alpha='16'"),
    ("api", "r_dtype=int8", lambda c, m: lx.LoraXSConfig(targets="q", r_dtype="int8"),
     ValueError, r"LoraXSConfig.r_dtype='int8'"),
    ("api", "alpha=nan", lambda c, m: lx.LoraXSConfig(targets="q", alpha=math.nan),
     ValueError, r"LoraXSConfig.alpha=nan"),
    ("api", "r_std=nan", lambda c, m: lx.LoraXSConfig(targets="q", r_std=math.nan),
     ValueError, r"LoraXSConfig.r_std=nan"),
    ("api", "rank={'query': 4.5}", lambda c, m: lx.LoraXSConfig(targets="q", rank={"query": 4.5}),
     ValueError, r"LoraXSConfig.rank\['query'\]=4.5"),
    ("api", "svd_batch=0", lambda c, m: lx.LoraXSConfig(targets="q", svd_batch=0),
     ValueError, r"LoraXSConfig.svd_batch=0"),
    ("api", "oversample=-5", lambda c, m: lx.LoraXSConfig(targets="q", oversample=-5),
     ValueError, r"LoraXSConfig.oversample=-5"),
    ("api", "save rank-2 params with rank 3",
     lambda c, m: lx.save_adapter(c["dir"] / "x", lx.apply(c["base"], c["cfg"], 0),
                                  lx.LoraXSConfig(rank=3, targets=(r"q/kernel$",))),
     ValueError, r"l0/q/kernel: cfg gives R \(3, 3\), the params hold \(2, 2\)"),
    ("api", "save NaN R", lambda c, m: _save_with_nan(c),
     ValueError, r"refusing to write .*x.safetensors: tensor loraxs_R/r2 holds 4 NaN/Inf of 8"),
    ("api", "load a missing adapter", lambda c, m: lx.load_adapter(c["dir"] / "nope", c["base"]),
     FileNotFoundError, r"no adapter file at .*nope.safetensors"),
    ("api", "load with another config",
     lambda c, m: lx.load_adapter(c["good"], c["base"], lx.LoraXSConfig(rank=2, targets="q")),
     ValueError, r"different config: targets: file \['q/kernel\$'\] vs given \['q'\]"),
    # files
    ("file", "adapter truncated to half", lambda c, m: _refused_before_building(c, m, c["half"]),
     AdapterFileError, r"half.safetensors: declares a .*-byte header but the file holds"),
    ("file", "empty adapter", lambda c, m: _refused_before_building(c, m, c["empty"]),
     AdapterFileError, r"empty.safetensors: 0 bytes, too short"),
    ("file", "JSON renamed .safetensors", lambda c, m: _refused_before_building(c, m, c["renamed"]),
     AdapterFileError, r"renamed.safetensors: declares a .*-byte header"),
    ("file", "a flipped bit in R", lambda c, m: _refused_before_building(c, m, c["flipped"]),
     AdapterFileError, r"flipped.safetensors: content does not match its sha256"),
    ("file", "header size 2**62", lambda c, m: lx.io.adapter_info(c["huge"]),
     AdapterFileError, r"huge.safetensors: declares a 4,611,686,018,427,387,904-byte header"),
    ("file", "adapter_info on half", lambda c, m: lx.io.adapter_info(c["half"]),
     AdapterFileError, r"half.safetensors"),
    ("file", "a bases cache as adapter", lambda c, m: lx.load_adapter(c["bases"], c["base"]),
     AdapterFileError, r"bases.safetensors: not a loraxs-jax adapter \(format='loraxs-jax/bases"),
    ("file", "a folder as adapter", lambda c, m: lx.io.adapter_info(c["dir"]),
     FileNotFoundError, r"no adapter file at"),
    ("file", "metrics.jsonl torn mid-file", lambda c, m: read_metrics(c["dir"]),
     ValueError, r"metrics.jsonl, line 2, is not a JSON record"),
]


@pytest.mark.parametrize("layer,name,call,error,culprit", BAD_INPUTS,
                         ids=[f"{b[0]}: {b[1]}" for b in BAD_INPUTS])
def test_bad_inputs_are_refused_naming_the_culprit(files, tiny_config, tiny_bert, with_values,
                                                   tmp_path, monkeypatch, layer, name, call, error,
                                                   culprit):
    ctx = {**files, "config": run_config(tiny_config, tiny_bert), "workdir": tmp_path / "run",
           "with_values": with_values}
    t0 = time.perf_counter()
    with pytest.raises(error, match=culprit):
        call(ctx, monkeypatch)
    assert time.perf_counter() - t0 < 10          # refused at once, not after building a model
    if layer == "config":
        assert not ctx["workdir"].exists()         # nothing was made
    if layer == "workdir":
        assert sorted(p.name for p in ctx["workdir"].iterdir()) == ["config.json"]
        assert (ctx["workdir"] / "config.json").read_bytes() == ctx["keep"]


CLI = [
    ("train.py", ["--config.log_every_steps=0"], "config.log_every_steps=0: expected an int >= 1"),
    ("train.py", ["--config.model.dtype=float33"], "config.model.dtype='float33': expected one"),
    ("train.py", ["--config.optim.lr=-1"], "config.optim.lr=-1.0: expected a finite number"),
    ("eval.py", ["--adapter={renamed}"], "renamed.safetensors: declares a"),
    ("eval.py", ["--adapter={half}"], "half.safetensors: declares a"),
]


@pytest.fixture(scope="module")
def cli_runs(repo, files, tiny_bert, tmp_path_factory):
    """Every CLI case at once (in parallel): (return code, stderr, workdir, seconds)."""
    procs = []
    for i, (program, args, _) in enumerate(CLI):
        workdir = tmp_path_factory.mktemp("cli") / f"run{i}"
        argv = [sys.executable, str(repo / program), f"--config={repo}/configs/minilm_sst2.py:"
                "rank=4", f"--config.model.path={tiny_bert}",
                *(a.format(**{k: v for k, v in files.items() if k in ("renamed", "half")})
                  for a in args)]
        if program == "train.py":
            argv.append(f"--workdir={workdir}")
        procs.append((subprocess.Popen(argv, cwd=repo, stderr=subprocess.PIPE, text=True),
                      workdir, time.perf_counter()))
    out = []
    for p, workdir, t0 in procs:
        err = p.communicate(timeout=300)[1]
        out.append((p.returncode, err, workdir, time.perf_counter() - t0))
    return out


@pytest.mark.parametrize("i", range(len(CLI)), ids=[f"{c[0]} {' '.join(c[1])}" for c in CLI])
def test_the_programs_refuse_bad_input_in_one_line(cli_runs, i):
    code, err, workdir, seconds = cli_runs[i]
    assert code == 1, err[-2000:]
    assert err.strip().splitlines()[-1].startswith("error: ") and CLI[i][2] in err
    assert "Traceback" not in err and not workdir.exists()


def test_the_suite_holds_forty_distinct_bad_inputs():
    names = [b[:2] for b in BAD_INPUTS] + [(c[0], " ".join(c[1])) for c in CLI]
    assert len(set(names)) == len(names) >= 40


# ----------------------------------------------------------------------------- runs
def _r(path):
    return load_file(path)


def _records(workdir):
    """metrics.jsonl without the one timing field."""
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in read_metrics(workdir)]


def _assert_same_files(a, b):
    for name in ("adapter.safetensors", "adapter_best.safetensors"):
        x, y = _r(a / name), _r(b / name)
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=f"{name}: {k}")   # bit-identical


@pytest.fixture(scope="module")
def reference(tiny_config, tiny_bert, tmp_path_factory):
    """The uninterrupted run, with every socket connection refused: with the assets cached a
    run needs no network."""
    workdir = tmp_path_factory.mktemp("reference") / "run"
    mp = pytest.MonkeyPatch()

    def no_network(self, address, *a):
        raise AssertionError(f"a network connection was attempted: {address}")

    mp.setattr(socket.socket, "connect", no_network)
    mp.setattr(socket.socket, "connect_ex", no_network)
    try:
        summary = train.train_and_evaluate(run_config(tiny_config, tiny_bert), workdir)
    finally:
        mp.undo()
    return workdir, summary


def test_a_checkpoint_of_another_config_without_config_json_is_refused(reference, tiny_config,
                                                                       tiny_bert, tmp_path):
    """Row 5 without the workdir's config.json: orbax's shape error came after 427 lines of
    'Event loop is closed'; now one error names the checkpoint and both shapes."""
    import shutil

    shutil.copytree(reference[0] / "checkpoints", tmp_path / "run" / "checkpoints")
    with pytest.raises(ConfigError, match=r"checkpoint 6 in .*run/checkpoints does not fit this "
                                          r"config \(Requested shape: \(8, 8\) is not compatible "
                                          r"with the stored shape: \(4, 4\)\), and the workdir has "
                                          r"no config.json"):
        train.train_and_evaluate(run_config(tiny_config, tiny_bert, **{"loraxs.rank": 8}),
                                 tmp_path / "run")
    assert not (tmp_path / "run" / "config.json").exists()


def _kill_at(step):
    def hook(opt_step, _):
        if opt_step == step:
            raise KeyboardInterrupt(f"killed after step {step}")
    return hook


def test_kill_and_resume_rounds_end_bit_identical(reference, tiny_config, tiny_bert, tmp_path,
                                                  monkeypatch):
    """Three kills: after step 3 (checkpoint 2; step 3's records were written), after step 5
    (checkpoint 4 holds a half-filled logging window) and during the final adapter save. Each
    restart drops the records past its checkpoint; the end is the uninterrupted run's R, best
    adapter and metrics.jsonl, record for record, and no temporary file survives."""
    ref_dir, ref_summary = reference
    config = run_config(tiny_config, tiny_bert)
    wd = tmp_path / "killed"
    for step in (3, 5):
        with pytest.raises(KeyboardInterrupt):
            train.train_and_evaluate(config, wd, hooks=[_kill_at(step)])
        # step 3's records, past checkpoint 2, were written twice: once each
        assert [(r["split"], r["step"]) for r in read_metrics(wd)] == [("train", 3), ("eval", 3)]
    import os

    real_replace = os.replace

    def die_on_adapter(src, dst):
        if str(dst).endswith("/adapter.safetensors"):
            # what a SIGKILL here leaves (tests/parallel/test_hosts.py: the temp file stays)
            (wd / ".adapter.safetensors.k1ll3d.tmp").write_bytes(b"half an adapter")
            raise KeyboardInterrupt("killed while saving the adapter")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", die_on_adapter)
    with pytest.raises(KeyboardInterrupt, match="saving the adapter"):
        train.train_and_evaluate(config, wd)
    monkeypatch.setattr(os, "replace", real_replace)
    assert not (wd / "adapter.safetensors").exists()
    summary = train.train_and_evaluate(config, wd)                  # resumes at step 6

    _assert_same_files(ref_dir, wd)
    assert _records(wd) == _records(ref_dir)
    assert [(r["split"], r["step"]) for r in read_metrics(wd)] == [
        ("train", 3), ("eval", 3), ("train", 6), ("eval", 6)]
    assert {k: summary[k] for k in ("steps", "best_step", "final_accuracy")} == {
        k: ref_summary[k] for k in ("steps", "best_step", "final_accuracy")}
    assert not list(wd.glob(".*.tmp"))


def nan_from(update: int) -> optax.GradientTransformation:
    """Updates become NaN from the ``update``-th on (0-based): training that diverges on cue."""
    def init(params):
        return {"count": jnp.zeros((), jnp.int32)}

    def update_fn(updates, state, params=None):
        bad = state["count"] >= update
        return (jax.tree.map(lambda u: jnp.where(bad, jnp.nan, u), updates),
                {"count": state["count"] + 1})

    return optax.GradientTransformation(init, update_fn)


def test_nan_at_a_save_step_keeps_the_last_finite_checkpoint_and_adapter(
        tiny_config, tiny_bert, with_values, tmp_path, monkeypatch, capsys):
    """Row 1 of the reliability issue: NaN was checked only at log steps, both kept checkpoints
    and adapter_best were 100% NaN, and the message called one "the last good checkpoint".
    Here step 4 (a checkpoint step, not an evaluation or log step) turns R to NaN: the run
    stops before saving it, naming step 4, the finite checkpoint 2 and adapter_best of step 3;
    it then continues from step 2 with a lower learning rate named in config.resume."""
    real = train.make_optimizer
    diverge_at = {"update": 3}
    monkeypatch.setattr(train, "make_optimizer",
                        lambda *a: optax.chain(real(*a), nan_from(diverge_at["update"])))
    config = run_config(tiny_config, tiny_bert)
    wd = tmp_path / "nan"
    with pytest.raises(train.NonFiniteLoss, match=(
            r"non-finite at optimizer step 4 \(loss [-0-9.e]+, gradient norm [0-9.e]+, and the "
            r"trained parameters hold NaN/Inf\); stopped before logging, evaluating or saving "
            r"anything of it\. The last finite checkpoint is step 2 in .*nan/checkpoints; "
            r"adapter_best.safetensors \(step 3\) is intact\. Lower optim.lr \(now 0.005")):
        train.train_and_evaluate(config, wd)
    assert sorted(p.name for p in (wd / "checkpoints").iterdir()) == ["2"]
    best = _r(wd / "adapter_best.safetensors")
    assert all(np.isfinite(v).all() for v in best.values())
    assert not (wd / "adapter.safetensors").exists()
    assert [(r["split"], r["step"]) for r in read_metrics(wd)] == [("train", 3), ("eval", 3)]
    assert all(math.isfinite(v) for r in read_metrics(wd) for v in r.values()
               if isinstance(v, float))

    diverge_at["update"] = 10**6          # same optimizer state, no more NaN
    lower = with_values(config, **{"optim.lr": 1e-3})
    with pytest.raises(ConfigError, match=r"optim.lr: 0.005 -> 0.001\. .*resume=optim.lr"):
        train.train_and_evaluate(lower, wd)
    capsys.readouterr()
    summary = train.train_and_evaluate(with_values(lower, resume="optim.lr"), wd)
    assert ("resumed from step 2 of 6 (data epoch 0, batch 2) with changes named in "
            "config.resume: optim.lr: 0.005 -> 0.001") in capsys.readouterr().out
    assert summary["steps"] == 6
    assert json.loads((wd / "config.json").read_text())["optim"]["lr"] == 1e-3
    assert all(np.isfinite(v).all() for v in _r(wd / "adapter.safetensors").values())
    assert [(r["split"], r["step"]) for r in read_metrics(wd)] == [
        ("train", 3), ("eval", 3), ("train", 6), ("eval", 6)]
