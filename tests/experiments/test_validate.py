"""The one check of an experiment config (every field of defaults.base()) and of a workdir's
config before a run continues in it."""

import json
import math

import ml_collections
import pytest

from loraxs_jax.experiments import defaults, validate
from loraxs_jax.experiments.validate import ConfigError

# (field, a bad value, what the error says it expects): every field of defaults.base().
BAD = [
    ("method", "qlora", r"one of loraxs, lora, full, head"),
    ("seed", -1, r"an int >= 0"),
    ("resume", "optim.lrr", r"names of config fields; 'optim.lrr' is no field \(did you mean "
                            r"'optim.lr'\?\); the fields of optim are lr, head_lr, weight_decay"),
    ("model.kind", "seq2seq", r"one of encoder, decoder"),
    ("model.path", "", r"\(it is empty\)"),
    ("model.head", "max", r"one of cls, mean"),
    ("model.fresh_head", "yes", r"True or False"),
    ("model.dtype", "float33", r"one of float32, bfloat16, float16"),
    ("model.param_dtype", "int8", r"one of float32, bfloat16, float16"),
    ("model.scan_layers", 1, r"True or False"),
    ("model.remat", "some", r"one of none, full, dots_saveable"),
    ("model.dropout", 1.5, r"-1 \(keep the checkpoint's\) or a finite number in \[0, 1\)"),
    ("loraxs.rank", 4.5, r"LoraXSConfig.rank=4.5: expected an int >= 1"),
    ("loraxs.alpha", 0.0, r"LoraXSConfig.alpha=0.0: expected a finite number > 0"),
    ("loraxs.targets", (), r"LoraXSConfig.targets is empty"),
    ("loraxs.init", "kaiming", r"LoraXSConfig.init='kaiming': unknown"),
    ("loraxs.r_std", math.nan, r"LoraXSConfig.r_std=nan"),
    ("loraxs.svd_method", "lanczos", r"LoraXSConfig.svd_method='lanczos'"),
    ("loraxs.power_iters", -1, r"LoraXSConfig.power_iters=-1"),
    ("loraxs.oversample", -5, r"LoraXSConfig.oversample=-5"),
    ("loraxs.krylov_iters", 0, r"LoraXSConfig.krylov_iters=0"),
    ("loraxs.bases_dtype", "float33", r"LoraXSConfig.bases_dtype='float33'"),
    ("loraxs.r_dtype", "int8", r"LoraXSConfig.r_dtype='int8'"),
    ("loraxs.bases_seed", -1, r"LoraXSConfig.bases_seed=-1"),
    ("loraxs.svd_batch", 0, r"LoraXSConfig.svd_batch=0"),
    ("loraxs.trainable", ("head(",), r"bad regex 'head\(' in LoraXSConfig.trainable"),
    ("task.name", "squad", r"one of glue, commonsense, math"),
    ("task.glue", "mnli", r"one of sst2, mrpc, cola, qnli, rte, stsb"),
    ("task.train_source", "/no/such/file", r"one of auto, assets, hub, gsm_symbolic or an "
                                           r"existing path"),
    ("task.eval_source", "s3://bucket/x", r"an existing path"),
    ("task.max_length", 1, r"an int >= 2"),
    ("task.train_limit", -1, r"an int >= 0"),
    ("task.tasks", ("boolq", "nope"), r"a list of names from boolq, piqa"),
    ("task.eval_sets", ("gsm8k", "aime"), r"a list of names from gsm8k, math, not empty"),
    ("task.eval_limit", -5, r"an int >= 0"),
    ("task.bucket", "yes", r"True or False"),
    ("optim.lr", -1.0, r"a finite number in \(0, inf\)"),          # was: gradient ascent
    ("optim.head_lr", 0.0, r"a finite number in \(0, inf\)"),
    ("optim.weight_decay", -0.1, r"a finite number in \[0, inf\)"),
    ("optim.b1", 1.0, r"a finite number in \[0, 1\)"),
    ("optim.b2", 1.5, r"a finite number in \[0, 1\)"),
    ("optim.eps", 0.0, r"a finite number in \(0, inf\)"),
    ("optim.schedule", "constant", r"one of linear, cosine"),
    ("optim.warmup_ratio", 1.5, r"a finite number in \[0, 1\]"),
    ("optim.warmup_steps", -2, r"an int >= 0 or -1"),
    ("optim.grad_clip", math.nan, r"a finite number in \[0, inf\)"),
    ("optim.grad_accum", 0, r"an int >= 1"),
    ("batch_size", 0, r"an int >= 1"),
    ("eval_batch_size", 0, r"an int >= 1"),
    ("num_epochs", 0, r"an int >= 1"),
    ("num_train_steps", 0, r"an int >= 1 or -1"),
    ("eval_every_steps", -1, r"an int >= 0"),
    ("log_every_steps", 0, r"an int >= 1"),                          # was: ZeroDivisionError
    ("checkpoint_every_steps", -3, r"an int >= 0"),
    ("keep_checkpoints", 0, r"an int >= 1"),
    ("generation.max_new_tokens", 0, r"an int >= 1"),
    ("generation.batch_size", 0, r"an int >= 1"),
    ("mesh.data", 0, r"an int >= 1 or -1"),
    ("mesh.fsdp", -2, r"an int >= 1 or -1"),
    ("mesh.tensor", 2.5, r"an int >= 1 or -1"),
    ("runtime.host_devices", -2, r"an int >= 0"),
    ("runtime.xla_flags", "fast_math=true", r"space-separated --xla_\.\.\. flags"),
    ("runtime.compile_cache", 0, r"a folder path"),
]


@pytest.fixture(scope="module")
def good(load_config):
    c = load_config("configs/minilm_sst2.py:rank=4")
    validate.validate(c)
    return c


def test_the_table_covers_every_field_of_base():
    assert {f for f, _, _ in BAD} == set(validate.flat_fields(defaults.base()))


@pytest.mark.parametrize("field,value,expects", BAD, ids=[b[0] for b in BAD])
def test_every_field_refuses_a_bad_value_by_name(good, with_values, field, value, expects):
    with pytest.raises(ConfigError) as e:
        validate.validate(with_values(good, **{field: value}))
    culprit = "config.loraxs: " if field.startswith("loraxs.") else f"config.{field}={value!r}"
    assert str(e.value).startswith(culprit), str(e.value)
    assert e.match(expects)


@pytest.mark.parametrize("change,expects", [
    ({"optim.learning_rate": 1e-3}, r"config.optim.learning_rate: unknown field: "
                                    r"'optim.learning_rate' is no field; the fields of optim are lr,"),
    ({"optim.weight_decy": 0.1}, r"config.optim.weight_decy: unknown field: 'optim.weight_decy' is "
                                 r"no field \(did you mean 'optim.weight_decay'\?\)"),
    ({"loraxs.rnak": 4}, r"config.loraxs.rnak: unknown field: 'loraxs.rnak' is no field \(did you "
                         r"mean 'loraxs.rank'\?\)"),
    ({"optim.grad_accum": 3}, r"config.batch_size=32 is not divisible by "
                              r"config.optim.grad_accum=3"),
    ({"task.name": "math"}, r"config.task.name='math' needs config.model.kind='decoder'"),
    ({"model.remat": "dots_saveable"}, r"config.model.remat='dots_saveable': the encoder"),
    ({"mesh.data": -1, "mesh.fsdp": -1}, r"config.mesh: only one axis may be -1"),
    ({"model.path": "asset:nope"}, r"config.model.path='asset:nope': expected asset:NAME with "
                                   r"NAME one of minilm"),
    ({"model.path": "/no/such/model.gguf"}, r"an existing folder or .gguf file \(no such path\)"),
    ({"resume": "loraxs.rank"}, r"loraxs.rank cannot change in a workdir"),
    ({"resume": "log_every_steps"}, r"log_every_steps may change on any resume without it"),
    ({"optim.lr": math.inf}, r"config.optim.lr=inf: expected a finite number"),
    ({"loraxs.rank": {"attention/": 4, "output/dense/kernel$": 4.5}},
     r"LoraXSConfig.rank\['output/dense/kernel\$'\]=4.5"),
])
def test_fields_that_disagree_or_do_not_exist_are_refused(good, with_values, change, expects):
    with pytest.raises(ConfigError, match=expects):
        validate.validate(with_values(good, **change))


def test_a_missing_field_is_refused(good):
    d = good.to_dict()
    del d["optim"]["eps"]
    with pytest.raises(ConfigError, match=r"config lacks the fields \['optim.eps'\]"):
        validate.validate(ml_collections.ConfigDict(d))


def test_a_partial_config_checks_the_fields_it_has():
    """loraxs-plan reads a handful of fields: those are checked, none is required."""
    part = {"model": {"kind": "decoder", "remat": "full"}, "batch_size": 16}
    assert validate.validate(ml_collections.ConfigDict(part), partial=True) is None
    for extra, expects in [({"optim": {"grad_accum": 3}}, r"not divisible by .*grad_accum=3"),
                           ({"mesh": {"fsdp": 0}}, r"config.mesh.fsdp=0: expected an int >= 1"),
                           ({"loraxs": {"targets": ["q"], "rank": 0}}, r"LoraXSConfig.rank=0")]:
        with pytest.raises(ConfigError, match=expects):
            validate.validate(ml_collections.ConfigDict({**part, **extra}), partial=True)


def test_every_shipped_config_is_valid(load_config, repo):
    for path in sorted((repo / "configs").glob("*.py")):
        if path.name != "__init__.py":
            validate.validate(load_config(f"configs/{path.name}"))


# ----------------------------------------------------------------------------- workdirs
def _workdir(tmp_path, config):
    (tmp_path / "config.json").write_text(config.to_json_best_effort(indent=2))
    return tmp_path


def test_a_new_or_unchanged_workdir_has_no_changes(good, with_values, tmp_path):
    assert validate.resume_changes(tmp_path / "new", good) == {}
    wd = _workdir(tmp_path, good)
    assert validate.resume_changes(wd, good) == {}
    free = with_values(good, **{"log_every_steps": 7, "mesh.data": 1})
    assert validate.resume_changes(wd, free) == {}       # watching and placing may change


def test_a_changed_shape_is_refused_with_a_diff_and_config_json_untouched(good, with_values,
                                                                          tmp_path):
    """Row 5 of the reliability issue: rank 16 -> 4 in an existing workdir overwrote
    config.json and died in orbax's restore, 427 lines later."""
    wd = _workdir(tmp_path, with_values(good, **{"loraxs.rank": 16}))
    before = (wd / "config.json").read_bytes()
    with pytest.raises(ConfigError, match=r"holds a run of another config: loraxs.rank: 16 -> 4\. "
                                          r"A workdir cannot change these .* new --workdir"):
        validate.resume_changes(wd, good)
    assert (wd / "config.json").read_bytes() == before


def test_an_intended_change_must_be_named_in_resume(good, with_values, tmp_path):
    wd = _workdir(tmp_path, with_values(good, **{"optim.lr": 1e30}))
    lower = with_values(good, **{"optim.lr": 1e-3})
    with pytest.raises(ConfigError, match=r"differs: optim.lr: 1e\+30 -> 0.001\. To continue it "
                                          r"with these changes on purpose, add "
                                          r"--config.resume=optim.lr"):
        validate.resume_changes(wd, lower)
    named = with_values(lower, resume="optim.lr")
    validate.validate(named)
    assert validate.resume_changes(wd, named) == {"optim.lr": (1e30, 1e-3)}


def test_a_config_json_we_did_not_write_is_refused(good, tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"config.json is not a config this program wrote"):
        validate.resume_changes(tmp_path, good)
    (tmp_path / "config.json").write_text(json.dumps([1, 2]))
    with pytest.raises(ConfigError, match=r"config.json is not a config this program wrote"):
        validate.resume_changes(tmp_path, good)
