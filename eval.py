"""Evaluate a base model, an adapter or the merged model: ``loraxs_jax.experiments.evaluate``.

    python eval.py --config=configs/minilm_sst2.py --adapter=runs/demo/adapter.safetensors --mode=both
"""

from loraxs_jax.experiments.evaluate import cli_main

if __name__ == "__main__":
    cli_main()
