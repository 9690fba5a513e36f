"""``python -m pixiu_kv.sim``: the same as ``pixiu-kv sim``."""

import sys

from .cli import main

sys.exit(main())
