"""``python -m dss_jax.teacher``: the same as ``dss-teacher``."""

import sys

from dss_jax.teacher.cli import main

sys.exit(main())
