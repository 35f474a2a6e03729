"""Moved to `dist-kp submit` (dist_kp/submit.py); kept so that `python -m launch.submit ...` in a checkout still works."""

import sys

from dist_kp.submit import main

if __name__ == "__main__":
    sys.exit(main())
