"""The one owner of saving and resuming a run (torchtitan's CheckpointManager, in dist_kp's terms).

    checkpointer = Checkpointer(state, store, cfg.checkpoint.resume)
    resumed = checkpointer.load()              # every rank: rank 0 decides, every rank restores
    checkpointer.save(step, epoch_end=False)   # collective capture; rank 0 writes in the background

What a checkpoint holds is the RunState's registry; where checkpoints live, how they are
validated and pruned is the CheckpointStore's. Which checkpoint a start continues is decided
once, at `load` (`choose_checkpoint`, a pure function of the folder's manifests), and everyone
reads the result here: `resumed`, `starts_over`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from dist_kp import distributed
from dist_kp.engine.checkpoint import CheckpointStore, SaveListener
from dist_kp.engine.run_state import RunState

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Resumed:
    """The checkpoint a run continues from, and where it stood."""

    url: str
    step: int
    epoch: int
    batch: int
    world_size: int


class Checkpointer:
    """Saves the run state into the store and resumes it from there; the resume decision of this start."""

    def __init__(self, state: RunState, store: CheckpointStore, resume: str) -> None:
        self.state = state
        self.store = store
        self.resume = resume
        self.resumed: Resumed | None = None

    @property
    def starts_over(self) -> bool:
        """checkpoint.resume=none: this start begins a new run in output_dir (nothing earlier continues)."""
        return self.resume == "none"

    def load(self) -> Resumed | None:
        """Every rank loads the checkpoint rank 0 chose (checkpoint.resume); None: a fresh start.

        What resume=none with checkpoint.overwrite replaces is removed after the decision.
        """
        found, choice = self.store.resolve(self.resume) if distributed.is_main_process() else (None, None)
        chosen = distributed.broadcast_object(found[0] if found else None)
        if choice is not None:
            self.store.remove_earlier(choice)
        if chosen is None:
            return None
        state = found[1] if found else self.store.read(chosen)
        self.state.restore(state, chosen)
        progress = state["progress"]
        self.resumed = Resumed(chosen, progress["step"], progress["epoch"], progress["batch"], state["world_size"])
        return self.resumed

    def url(self, step: int) -> str:
        """Where the checkpoint of `step` is (or will be) stored."""
        return self.store.step_url(step)

    def save(self, step: int, epoch_end: bool = False, on_saved: SaveListener | None = None) -> None:
        """Checkpoint `step` (a collective: every rank hands over its RNG states); rank 0 writes in the background."""
        snapshot = self.state.capture(epoch_end)
        if distributed.is_main_process():
            self.store.save(step, snapshot, on_saved=on_saved)

    def raise_pending(self) -> None:
        """Rank 0: raise the error of a finished background save (a failed save stops training)."""
        if distributed.is_main_process():
            self.store.raise_pending()

    def wait(self) -> None:
        """Rank 0: block until the save in flight is stored."""
        if distributed.is_main_process():
            self.store.wait()

    def finish_save(self) -> None:
        """Rank 0, on the way out after a stop signal's grace: let the save in flight complete."""
        if distributed.is_main_process() and self.store.saving:
            log.warning("waiting for the checkpoint save in flight before exiting")
            self.store.wait()

    def close(self) -> None:
        """Rank 0: wait for the save in flight and stop the writer."""
        if distributed.is_main_process():
            self.store.close()
