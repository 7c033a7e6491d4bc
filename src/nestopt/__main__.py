"""``python -m nestopt``: the command line (:mod:`nestopt.cli`), e.g. under
``torchrun --nproc_per_node N -m nestopt meta-train ...``."""

from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
