"""Node loss under torchrun on two namespace hosts: SIGKILL of one host -> training again (issue 13).

    .venv/bin/python bench/bench_node_loss.py [--repeats 1] [--kill-at 7] [--every-steps 2]
                                              [--rejoin-delay 0] [--rdzv-conf default|fast]

Makes two hosts (tests/netns_hosts.py: network namespaces of its own, a veth pair, 10.213.7.1/.2;
root), runs `torchrun --nnodes=2 --nproc_per_node=1 --rdzv-backend=c10d --max-restarts=3` on
each (the README's multi-node command, TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, GLOO_SOCKET_IFNAME)
with the tiny config, SIGKILLs host B's agent and worker once step --kill-at is logged, starts
host B's torchrun again after --rejoin-delay s, and times from the SIGKILL:

- failed:    the surviving worker's collective failed ("training failed on rank" logged);
- rejoined:  host B's torchrun was started again (the bench's clock);
- started:   the restarted workers joined the process group ("world size 2" logged again);
- resumed:   the newest checkpoint is loaded;
- training:  the first step after the resume is logged.

Steps lost = the last step logged before the kill minus the step the job resumed from.
--rdzv-conf fast is the tests' keep_alive_interval=1,keep_alive_max_attempt=3 (a dead node leaves
the rendezvous after ~3 s); default is torch's 5 s x 3.
"""

from __future__ import annotations

import argparse
import re
import signal
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dist_kp.data.synthetic import generate  # noqa: E402
from tests.conftest import kill_tree, tiny_overrides  # noqa: E402
from tests.netns_hosts import Hosts, create_hosts  # noqa: E402
from tests.test_multinode import RDZV_CONF, read, start_torchrun, torchrun_command, wait_all, wait_for  # noqa: E402

PHASES = ("failed", "rejoined", "started", "resumed", "training")
LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \[rank\d+\] \w+ (.*)$", re.MULTILINE)


def dist_kp_lines(text: str) -> list[tuple[float, str]]:
    return sorted((datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp(), message)
                  for stamp, message in LINE.findall(text))


def first(lines: list[tuple[float, str]], pattern: str, after: float) -> float | None:
    return next((t for t, message in lines if t >= after and re.search(pattern, message)), None)


def one_loss(hosts: Hosts, data: Path, work: Path, n: int, args: argparse.Namespace) -> dict[str, float]:
    out = work / "run"
    steps = max(args.kill_at + 6, 12)
    rdzv_conf = RDZV_CONF if args.rdzv_conf == "fast" else ""
    command = torchrun_command(hosts, f"bench{n}", 29600 + n, 3, *tiny_overrides(
        data, out, f"train.max_steps={steps}", f"checkpoint.every_steps={args.every_steps}", "eval.every_epochs=0",
        "eval.at_end=false", "train.workers=0"), rdzv_conf=rdzv_conf)
    logs = [work / "a.log", work / "b.log"]
    a, b = (start_torchrun(host, command, log) for host, log in zip(hosts.all, logs))
    wait_for(rf"\] step {args.kill_at} ", *logs, timeout=300, processes=(a, b))
    killed = time.time()
    kill_tree(b.pid, signal.SIGKILL)
    b.wait(timeout=30)
    time.sleep(args.rejoin_delay)
    rejoined = time.time()
    b = start_torchrun(hosts.b, command, work / "b2.log")
    logs.append(work / "b2.log")
    codes = wait_all([a, b], timeout=600)
    text = read(*logs)
    if codes != [0, 0]:
        raise SystemExit(f"run {n} failed {codes}:\n{text[-4000:]}")
    lines = dist_kp_lines(text)
    logged_before = [int(m.group(1)) for t, message in lines if t < killed
                     for m in [re.search(r"\] step (\d+) ", message)] if m]
    resumed_step = int(re.search(r"resumed from \S+ at step (\d+)", text).group(1))
    times = {
        "failed": first(lines, r"training failed on rank", killed),
        "rejoined": rejoined,
        "started": first(lines, r"world size 2", killed),
        "resumed": first(lines, r"resumed from", killed),
        "training": first(lines, r"\] step \d+ ", killed),
    }
    result = {phase: (t - killed if t is not None else float("nan")) for phase, t in times.items()}
    result["steps_lost"] = max(logged_before) - resumed_step
    result["resumed_step"] = resumed_step
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--kill-at", type=int, default=7, help="SIGKILL host B once this step is logged")
    parser.add_argument("--every-steps", type=int, default=2, help="checkpoint.every_steps")
    parser.add_argument("--rejoin-delay", type=float, default=0.0, help="seconds before host B's torchrun restarts")
    parser.add_argument("--rdzv-conf", choices=("fast", "default"), default="fast")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_node_loss-") as tmp:
        work = Path(tmp)
        data = generate(work / "data", train=48, val=16, seed=0)
        hosts = create_hosts("bn")
        try:
            results = []
            for n in range(args.repeats):
                run_dir = work / f"run{n}"
                run_dir.mkdir()
                results.append(one_loss(hosts, data, run_dir, n, args))
                print(f"run {n}: " + "  ".join(f"{k} {v:.1f} s" if k in PHASES else f"{k} {v}"
                                              for k, v in results[-1].items()), flush=True)
        finally:
            hosts.close()
    print(f"\nnode loss, torchrun c10d on two namespace hosts, rdzv-conf {args.rdzv_conf}, checkpoint every "
          f"{args.every_steps} steps, kill at step {args.kill_at}, host back after {args.rejoin_delay:.0f} s, "
          f"{args.repeats} run(s), seconds after SIGKILL (median):")
    for phase in PHASES:
        print(f"  {phase:9s} {statistics.median(r[phase] for r in results):6.1f}")
    print(f"  steps lost {statistics.median(r['steps_lost'] for r in results):.0f} "
          f"(resumed from step {[r['resumed_step'] for r in results]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
