"""The integration marker follows what a test calls: a test whose helper (or the helper's helper, or a
class it builds in a comprehension) starts a process is in the integration tier, not the fast one."""

from __future__ import annotations

from tests import tier_probe
from tests.conftest import starts_processes


def test_a_process_started_by_a_helper_of_a_helper_or_a_class_in_a_comprehension_counts() -> None:
    assert starts_processes([tier_probe.starts_a_process])
    assert starts_processes([tier_probe.through_a_helper])
    assert starts_processes([tier_probe.through_a_comprehension])
    assert not starts_processes([tier_probe.in_process])
    assert starts_processes([tier_probe.in_process, tier_probe.through_a_helper])  # a fixture's helper counts too


def test_the_torchrun_tests_that_call_their_file_helpers_are_in_the_integration_tier() -> None:
    from tests import test_agreement, test_index, test_predict

    for test in (test_agreement.test_a_learning_rate_that_differs_on_one_rank_is_refused_on_every_rank,
                 test_index.test_ranks_started_independently_build_the_cache_once,
                 test_predict.test_a_file_without_model_config_and_skeleton_is_refused_with_exit_2):
        assert starts_processes([test]), test.__name__
