"""``python -m vfio_hookd ARGS...``: the same as the ``vfio-hookd`` command."""

import sys

from .cli import main

sys.exit(main())
