"""Training hooks that live outside dist_kp, as a user's would: each writes what it sees under PROBE_DIR."""

from __future__ import annotations

import gc
import json
import os
from pathlib import Path

from dist_kp import Hook, distributed
from dist_kp.config import Config


class ProbeHook(Hook):
    def __init__(self, cfg: Config) -> None:
        self.path = Path(os.environ["PROBE_DIR"]) / f"rank{distributed.get_rank()}.log"

    def _note(self, event: str, trainer) -> None:
        p = trainer.progress
        with self.path.open("a") as f:
            f.write(f"{os.getpid()} {event} {p.epoch} {p.batch} {p.step}\n")

    def before_train(self, trainer) -> None:
        self._note("before_train", trainer)

    def after_step(self, trainer) -> None:
        self._note("after_step", trainer)

    def after_epoch(self, trainer) -> None:
        self._note("after_epoch", trainer)

    def after_train(self, trainer) -> None:
        self._note("after_train", trainer)


class StuckStepHook(Hook):
    """A step that never ends (a hung collective, as far as the loop can tell), from step 2 on.

    Writes PROBE_DIR/stuck when it starts hanging, so that a test knows when to send its signal.
    """

    def __init__(self, cfg: Config) -> None:
        self.marker = Path(os.environ["PROBE_DIR"]) / "stuck"

    def after_step(self, trainer) -> None:
        import time

        if trainer.progress.step == 2:
            self.marker.write_text(str(os.getpid()))
            while True:
                time.sleep(1)


class SampleProbeHook(Hook):
    """Writes the image ids of every step's batch to PROBE_DIR/samples<R>.log: `pid epoch step id,id,...`."""

    def __init__(self, cfg: Config) -> None:
        self.path = Path(os.environ["PROBE_DIR"]) / f"samples{distributed.get_rank()}.log"

    def after_step(self, trainer) -> None:
        ids = ",".join(str(int(target["image_id"])) for target in trainer.batch_targets)
        with self.path.open("a") as f:
            f.write(f"{os.getpid()} {trainer.progress.epoch} {trainer.progress.step} {ids}\n")


class HoldHook(Hook):
    """Holds every rank after step HOLD_AT_STEP, forever: the run stands still where a test kills it.

    Writes PROBE_DIR/held<R> when rank R starts holding. Without HOLD_AT_STEP in the environment it
    does nothing, so the same command started again (the resume) runs to its end.
    """

    def __init__(self, cfg: Config) -> None:
        self.step = int(os.environ.get("HOLD_AT_STEP", "0"))
        # Holds in after_checkpoint of this step instead: after the save, before what follows it
        # (the epoch end's evaluation).
        self.checkpoint_step = int(os.environ.get("HOLD_AFTER_CHECKPOINT", "0"))
        self.marker = Path(os.environ.get("PROBE_DIR", ".")) / f"held{distributed.get_rank()}"

    def _hold(self) -> None:
        import time

        self.marker.write_text(str(os.getpid()))
        while True:
            time.sleep(1)

    def after_step(self, trainer) -> None:
        if self.step and trainer.progress.step == self.step:
            self._hold()

    def after_checkpoint(self, trainer, url: str) -> None:
        if self.checkpoint_step and trainer.progress.step == self.checkpoint_step:
            self._hold()


class FailHook(Hook):
    """Raises an error dist_kp does not know (a user's bug) after step FAIL_AT_STEP, on every rank."""

    def __init__(self, cfg: Config) -> None:
        self.step = int(os.environ["FAIL_AT_STEP"])

    def after_step(self, trainer) -> None:
        if trainer.progress.step == self.step:
            raise ValueError(f"a bug in a user's hook at step {self.step}")


class EventProbeHook(Hook):
    """Records the evaluations and checkpoints it is told of, as its own saved state.

    Writes PROBE_DIR/events<R>.log: `pid before_train <state as JSON>` at every start (the state
    restored from the checkpoint), `pid after_evaluation <step> <kp/AP>`, `pid after_checkpoint
    <step> <url>`.
    """

    def __init__(self, cfg: Config) -> None:
        self.path = Path(os.environ["PROBE_DIR"]) / f"events{distributed.get_rank()}.log"
        self.evaluations: list[list[float]] = []  # [step, kp/AP]
        self.checkpoints: list[int] = []

    def _note(self, *fields: object) -> None:
        with self.path.open("a") as f:
            f.write(" ".join(str(x) for x in (os.getpid(), *fields)) + "\n")

    def before_train(self, trainer) -> None:
        self._note("before_train", json.dumps(self.state_dict()))

    def after_evaluation(self, trainer, metrics: dict[str, float]) -> None:
        self.evaluations.append([trainer.progress.step, metrics["kp/AP"]])
        self._note("after_evaluation", trainer.progress.step, metrics["kp/AP"])

    def after_checkpoint(self, trainer, url: str) -> None:
        self.checkpoints.append(trainer.progress.step)
        self._note("after_checkpoint", trainer.progress.step, url)

    def state_dict(self) -> dict:
        return {"evaluations": self.evaluations, "checkpoints": self.checkpoints}

    def load_state_dict(self, state: dict) -> None:
        self.evaluations, self.checkpoints = state["evaluations"], state["checkpoints"]


class ExitProbeHook(Hook):
    """At interpreter exit (atexit: after dist_kp's cleanup, before finalization) appends
    `pid thread-name,...` to PROBE_DIR/exit<R>: the threads that would live on into finalization."""

    def __init__(self, cfg: Config) -> None:
        import atexit

        path = Path(os.environ["PROBE_DIR"]) / f"exit{distributed.get_rank()}"
        atexit.register(self._write, path)

    @staticmethod
    def _write(path: Path) -> None:
        names = distributed.thread_names()
        with path.open("a") as f:
            f.write(f"{os.getpid()} {','.join(names)}\n")
        if distributed.gloo_threads(names):  # the threads just recorded, not a second read of /proc
            # For the failure's message: does a collection end it (garbage held it) or not (something live)?
            gc.collect()
            with path.with_name(f"{path.name}.after-collect").open("a") as f:
                f.write(f"{os.getpid()} {','.join(distributed.thread_names())}\n")
