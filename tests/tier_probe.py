"""Functions for tests/test_tiers.py: a helper that starts a process, reached only through other helpers."""

import subprocess
import sys


def starts_a_process() -> None:
    subprocess.run([sys.executable, "-c", "pass"], check=True)


class StartsOnInit:
    def __init__(self) -> None:
        self.process = subprocess.Popen([sys.executable, "-c", "pass"])


def through_a_helper() -> None:
    starts_a_process()


def through_a_comprehension() -> list:
    return [StartsOnInit() for _ in range(0)]


def in_process() -> int:
    return sum(range(3))
