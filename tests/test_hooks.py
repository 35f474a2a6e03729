"""Hooks registered from outside dist_kp see every step, epoch end, evaluation and checkpoint on every rank,
and their state (and keep_best's, early_stop's) survives a kill."""

from __future__ import annotations

import json
from pathlib import Path

import torch

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


def events(probe: Path, rank: int) -> list[list[tuple[str, ...]]]:
    """EventProbeHook's calls on one rank, one list per process start: (event, fields...), the pid left out."""
    starts: dict[str, list[tuple[str, ...]]] = {}
    for line in (probe / f"events{rank}.log").read_text().splitlines():
        pid, event, rest = line.split(" ", 2)
        starts.setdefault(pid, []).append((event, rest) if event == "before_train" else (event, *rest.split(" ")))
    return list(starts.values())


def test_a_hook_from_outside_sees_every_step_and_epoch_end_on_every_rank_across_a_kill(
    synthetic_root: Path, tmp_path: Path
) -> None:
    probe = tmp_path / "probe"
    probe.mkdir()
    env = child_env(PROBE_DIR=str(probe))
    out = tmp_path / "run"
    args = ["--config", str(TINY_CONFIG), *tiny_overrides(
        synthetic_root, out, f"train.max_steps={MAX_STEPS}", "checkpoint.every_steps=4",
        "train.workers=0", "eval.every_epochs=1", "eval.max_images=4", "eval.num_visualize=0", "eval.at_end=false",
        "train.hooks=[tests.hook_probe:ProbeHook,tests.hook_probe:EventProbeHook,tests.hook_probe:HoldHook,"
        "tests.hook_probe:ExitProbeHook]")]
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
    # The finished start left no gloo thread to live on into interpreter shutdown, where one aborts
    # the process now and then (CI: rank 1 exit -6, "terminate called without an active exception").
    for rank in (0, 1):
        exits = (probe / f"exit{rank}").read_text().splitlines()
        after_collect = probe / f"exit{rank}.after-collect"
        assert len(exits) == 1 and "gloo" not in exits[0], (exits, "after a gc.collect():",
                                                             after_collect.exists() and after_collect.read_text())

    # Evaluations (with the metrics, the same on every rank) and checkpoints reach the user's hook,
    # and its state comes back from the checkpoint resumed from (step 8) before before_train.
    per_rank_events = [events(probe, rank) for rank in (0, 1)]
    assert per_rank_events[0] == per_rank_events[1]
    first_events, second_events = per_rank_events[0]
    ap = {int(e[1]): float(e[2]) for e in first_events + second_events if e[0] == "after_evaluation"}
    for step in (6, 12):
        written = json.loads((out / "eval" / f"{step:08d}" / "metrics.json").read_text())
        assert ap[step] == written["kp/AP"]
    url = f"{out}/checkpoints/step_{{:08d}}".format
    # An epoch's end is checkpointed, then evaluated.
    assert first_events == [("before_train", json.dumps({"evaluations": [], "checkpoints": []})),
                            ("after_checkpoint", "4", url(4)), ("after_checkpoint", "6", url(6)),
                            ("after_evaluation", "6", repr(ap[6])), ("after_checkpoint", "8", url(8))]
    assert second_events == [("before_train", json.dumps({"evaluations": [[6, ap[6]]], "checkpoints": [4, 6]})),
                             ("after_checkpoint", "12", url(12)), ("after_evaluation", "12", repr(ap[12])),
                             ("after_checkpoint", "14", url(14))]


def watched(values: list[tuple[int, float]], patience: int) -> tuple[float, int, int | None]:
    """What keep_best and early_stop (mode max) must make of evaluations (step, value): best value, its
    step, and the step of the stop (None: no stop)."""
    best, best_step, without = None, None, 0
    for step, value in values:
        if best is None or value > best:
            best, best_step, without = value, step, 0
        else:
            without += 1
            if without >= patience:
                return best, best_step, step
    return best, best_step, None


def test_an_error_from_a_users_hook_ends_the_process_with_no_gloo_thread_left(synthetic_root: Path,
                                                                               tmp_path: Path) -> None:
    """The error leaves main with its traceback (printed, then kept by Python until the end), whose frames held
    the trainer, DDP and the process group: cleanup clears them first, or gloo's threads live on into
    interpreter shutdown, where one can abort the process (exit -6 in place of the error's exit status)."""
    probe = tmp_path / "probe"
    probe.mkdir()
    args = ["--config", str(TINY_CONFIG), *tiny_overrides(
        synthetic_root, tmp_path / "run", "train.max_steps=4", "train.workers=0", "eval.every_epochs=0",
        "eval.at_end=false", "train.hooks=[tests.hook_probe:FailHook,tests.hook_probe:ExitProbeHook]")]
    result = run_module("dist_kp.train", args, nproc=2, env=child_env(PROBE_DIR=str(probe), FAIL_AT_STEP="2"))
    assert result.returncode != 0 and "ValueError: a bug in a user's hook at step 2" in result.stderr
    # torchrun stops the other rank once one has failed: the first to fail ended by itself, atexit included.
    exits = [path.read_text().splitlines() for path in probe.glob("exit[01]")]
    assert exits, result.stderr[-3000:]
    for lines in exits:
        assert len(lines) == 1 and "gloo" not in lines[0], (lines, result.stderr[-3000:])


def test_keep_best_and_early_stop_carry_their_state_across_a_kill_on_two_ranks(synthetic_root: Path,
                                                                              tmp_path: Path) -> None:
    probe, out = tmp_path / "probe", tmp_path / "run"
    probe.mkdir()
    env = child_env(PROBE_DIR=str(probe))
    args = ["--config", str(TINY_CONFIG), *tiny_overrides(
        synthetic_root, out, "train.epochs=6", "checkpoint.every_steps=100", "train.workers=0", "eval.every_epochs=1",
        "eval.max_images=4", "eval.num_visualize=0", "checkpoint.keep_best=kp/AP", "train.early_stop.metric=kp/AP",
        "train.early_stop.patience=2", "train.hooks=[tests.hook_probe:HoldHook]")]
    # Two evaluations (steps 6 and 12) before the kill; the step-12 checkpoint was taken before the
    # second: the resumed run runs it again first, and its state then holds both.
    kill_when_held(start_module("dist_kp.train", args, nproc=2, env={**env, "HOLD_AT_STEP": "13"}), probe, 2,
                   r"checkpoint step 12 saved", r"evaluation at step 12 ")
    result = check(run_module("dist_kp.train", args, nproc=2, env=env))
    assert "at step 12" in result.stderr and "holds no state" not in result.stderr, result.stderr[-3000:]
    assert "the evaluation of step 12 did not run before the checkpoint resumed from" in result.stderr
    evaluated = sorted(int(p.name) for p in (out / "eval").iterdir())
    values = [(step, json.loads((out / "eval" / f"{step:08d}" / "metrics.json").read_text())["kp/AP"])
              for step in evaluated]
    best, best_step, stop = watched(values, patience=2)
    assert torch.load(out / "model_best.pt", weights_only=True)["best"] == {"metric": "kp/AP", "value": best,
                                                                              "step": best_step}
    final = torch.load(out / "model_final.pt", weights_only=True)
    assert "best" not in final
    if stop is None:  # kp/AP rose at every other evaluation: the run went to its end
        assert evaluated[-1] == 36 and "training finished at step 36" in result.stderr
    else:  # every rank stopped after the same evaluation, with a checkpoint and the final weights
        assert evaluated[-1] == stop and f"training stopped early at step {stop}" in result.stderr
        assert (out / "checkpoints" / f"step_{stop:08d}" / "manifest.json").exists()


def test_an_epoch_end_evaluation_cut_by_the_end_of_the_process_runs_first_when_the_run_resumes(
        synthetic_root: Path, tmp_path: Path) -> None:
    """Killed after the epoch end's checkpoint is stored and before its evaluation ran: the resumed
    run evaluates that step before it trains on, and says so."""
    probe, out = tmp_path / "probe", tmp_path / "run"
    probe.mkdir()
    env = child_env(PROBE_DIR=str(probe))
    args = ["--config", str(TINY_CONFIG), *tiny_overrides(
        synthetic_root, out, "train.max_steps=7", "train.workers=0", "eval.every_epochs=1", "eval.max_images=4",
        "eval.num_visualize=0", "eval.at_end=false", "train.hooks=[tests.hook_probe:HoldHook]")]
    kill_when_held(start_module("dist_kp.train", args, nproc=2, env={**env, "HOLD_AFTER_CHECKPOINT": "6"}), probe, 2,
                   r"checkpoint step 6 saved")
    assert not (out / "eval" / f"{6:08d}").exists()
    result = check(run_module("dist_kp.train", args, nproc=2, env=env))
    assert "the evaluation of step 6 did not run before the checkpoint resumed from: running it now" in result.stderr
    assert (out / "eval" / f"{6:08d}" / "metrics.json").is_file()
    resumed, evaluated = result.stderr.index("resumed from"), result.stderr.index("running it now")
    assert resumed < evaluated < result.stderr.index(" step 7 ")  # before training on
