"""Train LoRA-XS (or a baseline) from an experiment config: ``loraxs_jax.experiments.train``.

    python train.py --config=configs/minilm_sst2.py --workdir=runs/demo
    python train.py --config=configs/mistral_math.py --workdir=runs/mistral_r64
"""

from loraxs_jax.experiments.train import cli_main

if __name__ == "__main__":
    cli_main()
