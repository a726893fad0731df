"""``python -m loraxs_jax.interop {export,import-official} ...`` (see ``cli``)."""

from loraxs_jax.interop.cli import main

raise SystemExit(main())
