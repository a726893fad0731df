"""LoRA-XS on a real third-party codebase: google-deepmind's unmodified ``gemma`` library
(gemma==3.3.0, linen Gemma 3; a reduced config with random weights), adapted on the paper's
seven projections. gemma_check.py runs in the side venv ``.venv-gemma`` that ``make test``
builds (gemma patches flax's Module.param at import, so it gets its own process)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def gemma(repo, tmp_path_factory):
    python = repo / ".venv-gemma" / "bin" / "python"
    if not python.exists():
        pytest.fail(f"{python} is missing: `make test` builds it before running the tests")
    out = tmp_path_factory.mktemp("gemma")
    done = subprocess.run([str(python), str(HERE / "gemma_check.py"), str(out)],
                          capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_geometries_read_from_gemmas_own_einsums(gemma):
    # q (N, D, H) contracts D; k and v stacked (2, K, D, H); o (N, H, D) contracts N and H;
    # gate and up stacked and stored out x in (2, F, D); down (F, D)
    assert gemma["roles"] == {"attn/q_einsum/w": "oio", "attn/kv_einsum/w": "soio",
                              "attn/attn_vec_einsum/w": "iio", "mlp/gating_einsum": "soi",
                              "mlp/linear": "io"}
    # 2 layers x 7 matrices (q, k, v, o, gate, up, down) x r^2
    assert gemma["count"]["adapted_matrices"] == 14 and gemma["count"]["R"] == 14 * 16


def test_adapted_equals_merged_and_zero_r_is_the_base(gemma):
    assert gemma["zero_r_max_diff"] < 1e-5                     # float32, both jitted
    assert gemma["adapted_vs_base"] > 1e-3                     # the adaptation is real
    assert gemma["adapted_vs_merged"] < 1e-5 and gemma["adapted_vs_merged_rel"] < 1e-6
    assert gemma["plain_after_adapted_diff"] < 1e-5            # nn.jit's cache leaks nothing
    assert gemma["eager_vs_jit_adapted_rel"] < 1e-6


def test_optax_steps_on_r_lower_the_loss_and_the_adapter_round_trips(gemma):
    losses = gemma["losses"]
    assert losses[-1] < losses[0] - 0.05, losses
    assert all(p.endswith("_loraxs_R") for p in gemma["grad_leaves"])
    assert len(gemma["grad_leaves"]) == 10                     # 5 weights x 2 layers
    assert gemma["reload_max_diff"] == 0.0 and gemma["r_equal"]
    assert gemma["adapter_bytes"] < 14 * 16 * 4 + 2048


def test_side_venv_is_not_the_test_venv(repo):
    assert Path(sys.executable).resolve().parent != (repo / ".venv-gemma" / "bin").resolve()
