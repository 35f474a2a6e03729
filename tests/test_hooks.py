"""A hook registered from outside dist_kp sees every step and epoch end, on every rank, across a kill."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import TINY_CONFIG, check, child_env, kill_when_held, run_module, start_module, tiny_overrides

STEPS_PER_EPOCH = 6  # 48 training images, 2 processes x 4 images
MAX_STEPS = 14


def calls(probe: Path, rank: int) -> list[list[tuple[str, int, int, int]]]:
    """The hook's calls on one rank, one list per process start."""
    starts: dict[str, list[tuple[str, int, int, int]]] = {}
    for line in (probe / f"rank{rank}.log").read_text().splitlines():
        pid, event, epoch, batch, step = line.split()
        starts.setdefault(pid, []).append((event, int(epoch), int(batch), int(step)))
    return list(starts.values())


def expected(resumed: int, killed: bool) -> list[tuple[str, int, int, int]]:
    """What one start must see: before_train at the resumed step, each later step once, the epoch ends."""
    events = [("before_train", resumed // STEPS_PER_EPOCH, resumed % STEPS_PER_EPOCH, resumed)]
    for step in range(resumed + 1, MAX_STEPS + 1):
        epoch, batch = divmod(step, STEPS_PER_EPOCH)
        if batch == 0:
            events.append(("after_step", epoch - 1, STEPS_PER_EPOCH, step))
            events.append(("after_epoch", epoch, 0, step))
        else:
            events.append(("after_step", epoch, batch, step))
    return events + ([] if killed else [("after_train", MAX_STEPS // STEPS_PER_EPOCH, MAX_STEPS % STEPS_PER_EPOCH,
                                         MAX_STEPS)])


def test_a_hook_from_outside_sees_every_step_and_epoch_end_on_every_rank_across_a_kill(
    synthetic_root: Path, tmp_path: Path
) -> None:
    probe = tmp_path / "probe"
    probe.mkdir()
    env = child_env(PROBE_DIR=str(probe))
    args = ["--config", str(TINY_CONFIG), *tiny_overrides(
        synthetic_root, tmp_path / "run", f"train.max_steps={MAX_STEPS}", "checkpoint.every_steps=4",
        "train.workers=0", "eval.every_epochs=0", "eval.at_end=false",
        "train.hooks=[tests.hook_probe:ProbeHook,tests.hook_probe:HoldHook]")]
    # Killed while every rank holds after step 9, once step 8 is stored: no later checkpoint can exist.
    kill_when_held(start_module("dist_kp.train", args, nproc=2, env={**env, "HOLD_AT_STEP": "9"}), probe, 2,
                   r"checkpoint step 8 saved")
    result = check(run_module("dist_kp.train", args, nproc=2, env=env))
    assert "resumed from" in result.stderr and "at step 8" in result.stderr
    per_rank = [calls(probe, rank) for rank in (0, 1)]
    assert per_rank[0] == per_rank[1]
    first, second = per_rank[0]
    # The first start was killed after step 8 was stored: it saw steps 1.. in order, each once.
    assert first == expected(0, killed=True)[:len(first)] and len(first) >= 1 + 8 + 1
    assert second == expected(8, killed=False)
