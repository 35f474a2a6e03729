"""`python -m tests.rank_override ARGS`: dist_kp.train with $RANK1_OVERRIDES appended on rank 1 only.

torchrun starts every rank with the same command line; this gives rank 1 its own overrides,
as a node started with another config (or its own copy of the data) would have.
"""

from __future__ import annotations

import os
import shlex
import sys

from dist_kp.train import main

if __name__ == "__main__":
    extra = shlex.split(os.environ.get("RANK1_OVERRIDES", "")) if os.environ.get("RANK") == "1" else []
    sys.exit(main(sys.argv[1:] + extra))
