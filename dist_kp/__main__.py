"""`python -m dist_kp COMMAND ...`: the same as the dist-kp command (see dist_kp.cli)."""

import sys

from dist_kp.cli import console

sys.exit(console())
