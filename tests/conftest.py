"""Test session setup and the fixtures tests share.

Eight virtual CPU devices for the sharding tests (set before jax is imported); a tiny random BERT
with MiniLM's real tokenizer and a short SST-2 run config on it (train/eval tests and the
multi-process worker); a small sharded LoRA-XS training setup (parallel and checkpointing tests).
"""

import os
import shutil
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- repository
@pytest.fixture(scope="session")
def repo() -> Path:
    """The repository root (configs/, benchmarks/, README.md)."""
    return REPO


@pytest.fixture(scope="session")
def load_config():
    """``load_config("configs/minilm_sst2.py:rank=4")``, relative to the repository root."""
    from loraxs_jax.experiments.cli import load_config as load

    return lambda spec: load(str(REPO / spec))


# ----------------------------------------------------------------------------- small trees
def small_params(seed=0, shapes=None):
    """{"layer": {name: {"kernel", "bias"}}}: Gaussian float32 kernels of the given shapes
    (default q, v (24, 16) and o (16, 24)) and zero biases."""
    rng = np.random.default_rng(seed)
    shapes = shapes or {"q": (24, 16), "v": (24, 16), "o": (16, 24)}
    return {"layer": {k: {"kernel": jnp.asarray(rng.normal(size=s), jnp.float32),
                          "bias": jnp.zeros(s[-1])} for k, s in shapes.items()}}


@pytest.fixture(name="small_params", scope="session")
def small_params_fixture():
    """``small_params(seed=0, shapes=None)`` (see :func:`small_params`)."""
    return small_params


# ----------------------------------------------------------------------------- tiny BERT run
def make_tiny_bert(folder: Path) -> Path:
    """A random 2-layer, 32-wide BERT saved by transformers, with MiniLM's real tokenizer."""
    import torch
    from transformers import BertConfig, BertModel

    from loraxs_jax.experiments.assets import asset_path

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=128)
    BertModel(cfg).save_pretrained(folder, safe_serialization=True)
    src = asset_path("minilm")
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (src / name).exists():
            shutil.copy(src / name, folder / name)
    return folder


def tiny_config(folder, **over):
    """configs/minilm_sst2.py:rank=4 on ``folder``: 6 steps of 16 on 192 SST-2 rows, evaluated
    on 96; ``over`` sets dotted keys."""
    from loraxs_jax.experiments.cli import load_config as load

    c = load(str(REPO / "configs/minilm_sst2.py:rank=4"))
    c.model.path = str(folder)
    c.task.train_limit = 192
    c.task.eval_limit = 96
    c.batch_size = 16
    c.num_train_steps = 6
    c.eval_every_steps = 3
    c.checkpoint_every_steps = 2
    c.log_every_steps = 2
    c.eval_batch_size = 48
    for k, v in over.items():
        node = c
        *parents, leaf = k.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = v
    return c


def with_values(config, **fields):
    """A copy of ``config`` with dotted ``fields`` set to values of any type: what a config file
    can do (set a field to None, then to anything), for the validator to refuse."""
    import ml_collections

    d = config.to_dict()
    for field, value in fields.items():
        node = d
        *sections, leaf = field.split(".")
        for s in sections:
            node = node[s]
        node[leaf] = value
    return ml_collections.ConfigDict(d)


@pytest.fixture(name="with_values", scope="session")
def with_values_fixture():
    """``with_values(config, **dotted_fields)`` (see :func:`with_values`)."""
    return with_values


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(name="tiny_config", scope="session")
def tiny_config_fixture():
    """``tiny_config(folder, **dotted_overrides)`` (see :func:`tiny_config`)."""
    return tiny_config


# ----------------------------------------------------------------------------- sharded training
class ShardedTraining:
    """A tiny scanned decoder trained with LoRA-XS on every projection, on one device
    (``reference``) or sharded over a (data, fsdp, tensor) mesh (``sharded_setup``)."""

    def __init__(self):
        import loraxs_jax as lx
        from loraxs_jax.models import decoder as dec

        # every adapted matrix is 32x32, so all bases come from one batched SVD (one compile)
        self.cfg = dec.DecoderConfig(vocab_size=64, hidden_size=32, intermediate_size=32,
                                     num_layers=2, num_heads=4, num_kv_heads=4, head_dim=8,
                                     scan_layers=True)
        self.lora = lx.LoraXSConfig(rank=4, alpha=8.0, r_std=0.05, stacked_axes=1,
                                    targets=(r"(q|k|v|o|gate|up|down)_proj/kernel$",))
        self.batch, self.seq = 16, 12
        # float32; the sharded programs reduce in a different order than the single-device one.
        self.loss_rtol, self.r_atol = 1e-5, 1e-6
        self._steps, self._references = {}, {}

    @staticmethod
    def mesh_of(shape):
        from loraxs_jax import parallel

        return parallel.make_mesh(dict(zip(parallel.MESH_AXES, shape)))

    @staticmethod
    def make_tx():
        return optax.adamw(3e-2, weight_decay=0.01)

    def loss_fn(self, trainable, frozen, batch):
        import loraxs_jax as lx
        from loraxs_jax.models import decoder as dec

        params = lx.combine(trainable, frozen)
        logits = lx.wrap(dec.DecoderForCausalLM(self.cfg).apply)({"params": params},
                                                                 batch["ids"][:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(
            logits.astype(jnp.float32), batch["ids"][:, 1:]).mean()

    def train_step(self, state, frozen, batch):
        loss, grads = jax.value_and_grad(self.loss_fn)(state["params"], frozen, batch)
        updates, opt = self.make_tx().update(grads, state["opt"], state["params"])
        return ({"params": optax.apply_updates(state["params"], updates), "opt": opt,
                 "step": state["step"] + 1}, {"loss": loss})

    def base_params(self):
        from loraxs_jax.models import decoder as dec

        return dec.init_params(self.cfg, jax.random.key(0))

    def batches(self, n):
        rng = np.random.default_rng(0)
        return [{"ids": rng.integers(0, self.cfg.vocab_size, (self.batch, self.seq),
                                     dtype=np.int32)} for _ in range(n)]

    def init_state(self, trainable):
        return {"params": trainable, "opt": self.make_tx().init(trainable), "step": jnp.int32(0)}

    def reference(self, n_steps):
        """Single device, no shardings: (final state, losses); computed once per n_steps."""
        import loraxs_jax as lx

        if n_steps in self._references:
            return self._references[n_steps]
        trainable, frozen = lx.split(lx.apply(self.base_params(), self.lora, 1), self.lora)
        state, step, losses = self.init_state(trainable), jax.jit(self.train_step), []
        for b in self.batches(n_steps):
            state, m = step(state, frozen, b)
            losses.append(float(m["loss"]))
        self._references[n_steps] = state, losses
        return state, losses

    def sharded_setup(self, mesh):
        """Base params placed by the rules, adapted on that placement, split, and the state's
        shardings (R's, AdamW's mu/nu like R, counts replicated):
        (adapted, all shardings, state, state shardings, frozen, frozen shardings)."""
        import loraxs_jax as lx
        from loraxs_jax import parallel as sh
        from loraxs_jax.models import decoder as dec

        base_sh = sh.param_shardings(dec.param_shapes(self.cfg), dec.param_logical_axes(self.cfg),
                                     mesh)
        adapted = lx.apply(sh.shard_params(self.base_params(), base_sh), self.lora, 1)
        all_sh = sh.adapted_shardings(adapted, base_sh)
        trainable, frozen = lx.split(adapted, self.lora)
        t_sh, f_sh = sh.subtree_shardings(all_sh, trainable), sh.subtree_shardings(all_sh, frozen)
        state = self.init_state(trainable)
        state_sh = {"params": t_sh, "opt": sh.opt_state_shardings(state["opt"], t_sh, mesh),
                    "step": sh.replicated(mesh)}
        return adapted, all_sh, sh.shard_params(state, state_sh), state_sh, frozen, f_sh

    def compiled_step(self, shape, state_sh, f_sh):
        """One jitted train step per mesh shape, shared by the tests of this session."""
        from loraxs_jax import parallel as sh

        if shape not in self._steps:
            self._steps[shape] = sh.jit_train_step(self.train_step, self.mesh_of(shape), state_sh,
                                                   f_sh)
        return self._steps[shape]

    @staticmethod
    def r_leaves(tree):
        from loraxs_jax.tree import flatten, leaf_role

        return {p: np.asarray(v) for p, v in flatten(tree).items() if leaf_role(p[-1])}


@pytest.fixture(scope="session")
def sharded() -> ShardedTraining:
    return ShardedTraining()


@pytest.fixture(scope="module")
def setup_222(sharded):
    """(mesh, adapted, all shardings, state, state shardings, frozen, frozen shardings) on a
    (2, 2, 2) mesh."""
    mesh = sharded.mesh_of((2, 2, 2))
    return (mesh, *sharded.sharded_setup(mesh))


@pytest.fixture(scope="module")
def ref(sharded):
    return sharded.reference(2)
