"""``python -m hf_lowrank_plugins``: the ``hf-lowrank`` command."""

import sys

from .app.cli import main

sys.exit(main())
