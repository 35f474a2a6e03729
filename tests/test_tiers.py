"""The integration marker follows what a test calls: a test whose helper (or the helper's helper, or a
class it builds in a comprehension) starts a process is in the integration tier, not the fast one."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from tests import tier_probe
from tests.conftest import REPO, child_env, longest_first, starts_processes, xdist_scope


def test_a_process_started_by_a_helper_of_a_helper_or_a_class_in_a_comprehension_counts() -> None:
    assert starts_processes([tier_probe.starts_a_process])
    assert starts_processes([tier_probe.through_a_helper])
    assert starts_processes([tier_probe.through_a_comprehension])
    assert not starts_processes([tier_probe.in_process])
    assert starts_processes([tier_probe.in_process, tier_probe.through_a_helper])  # a fixture's helper counts too


def test_the_torchrun_tests_that_call_their_file_helpers_are_in_the_integration_tier() -> None:
    from tests import test_agreement, test_eval_results_file, test_index, test_predict

    for test in (test_agreement.test_a_learning_rate_that_differs_on_one_rank_is_refused_on_every_rank,
                 test_index.test_ranks_started_independently_build_the_cache_once,
                 test_eval_results_file.test_a_bad_record_is_named_with_its_file_and_rule):
        assert starts_processes([test]), test.__name__
    # A command run in the test's process (conftest.main_here, through the file's helper) starts none.
    assert not starts_processes([test_predict.test_a_file_without_model_config_and_skeleton_is_refused_with_exit_2])


# Collect the whole suite in a child pytest and write each test's id and fixture closure.
COLLECT = """
import json, sys, pytest
class Dump:
    def pytest_collection_finish(self, session):
        with open(sys.argv[1], "w") as out:
            json.dump([[item.nodeid, sorted(item.fixturenames)] for item in session.items], out)
sys.exit(pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", "tests"], plugins=[Dump()]))
"""


def test_under_xdist_every_test_of_a_slurm_cluster_runs_in_one_worker_and_files_stay_whole(tmp_path: Path) -> None:
    """launch/test.sh runs the suite in two pytest-xdist workers: two SLURM clusters at once would give two
    jobs the same id, MASTER_PORT (from the job id) and SLURM_PROCID that the tests look for (seen: a
    job's rank 0 found its MASTER_PORT taken by the other cluster's job of the same id)."""
    listing = tmp_path / "tests.json"
    result = subprocess.run([sys.executable, "-c", COLLECT, str(listing)], cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    tests = json.loads(listing.read_text())
    clusters = [nodeid for nodeid, fixtures in tests if {"slurm", "hosts"} & set(fixtures)]
    assert len(clusters) >= 10, clusters
    for nodeid in clusters:
        assert xdist_scope(nodeid) == "slurm", nodeid
    scopes_of_file: dict[str, set[str]] = {}
    for nodeid, _ in tests:
        scopes_of_file.setdefault(nodeid.split("::")[0], set()).add(xdist_scope(nodeid))
    assert all(len(scopes) == 1 for scopes in scopes_of_file.values()), scopes_of_file
    assert len({scope for scopes in scopes_of_file.values() for scope in scopes}) > 20  # not all in one worker


def test_two_workers_shuffle_the_same_order_and_run_every_test(tmp_path: Path) -> None:
    """Each xdist worker collects the suite: with `--shuffle random` they must shuffle with one seed (the
    controller's), or xdist stops on "different tests collected"."""
    files = ["tests/test_docs.py", "tests/test_flip_pairs.py"]  # two files: one for each worker; fast ones
    listed = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                             *files], cwd=REPO, capture_output=True, text=True, timeout=300, env=child_env())
    collected = len(re.findall(r"^tests/\S+::", listed.stdout, re.M))
    assert collected > 10, listed.stdout[-3000:]
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "2", "--shuffle", "random", "-p",
                             "no:cacheprovider", *files], cwd=REPO, capture_output=True, text=True, timeout=300,
                            env=child_env())
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert re.search(rf"\b{collected} passed", result.stdout), result.stdout[-3000:]
    assert "test order shuffled with seed" in result.stdout


def test_the_workers_take_the_slurm_files_first_then_the_files_that_start_the_most_processes() -> None:
    scopes = ["tests/test_flip_pairs.py", "tests/test_readme.py", "tests/test_eval_records.py", "slurm",
              "tests/test_checkpoint.py"]
    # test_readme starts its commands in one helper; test_checkpoint has dozens of runs; the last two none.
    assert longest_first(scopes) == ["slurm", "tests/test_checkpoint.py", "tests/test_readme.py",
                                     "tests/test_flip_pairs.py", "tests/test_eval_records.py"]
