"""The job vocabulary: the transition tables say what pyRFT and the CS3 notes say a job may do."""

from __future__ import annotations

import pytest

from datastore.jobs.states import (
    CLEARABLE_JOB_STATES,
    FILE_JOB_TRANSITIONS,
    FINAL_JOB_STATES,
    REPRIORITIZABLE_JOB_STATES,
    FailureKind,
    FailureReason,
    FileJobState,
    JobState,
    JobStep,
    file_sources,
    file_target,
    job_sources,
    job_target,
    settled_state,
)


def test_every_job_state_is_reachable_and_every_file_step_has_one_target() -> None:
    reached = {JobState.SUBMITTED} | {job_target(state, step) for step in JobStep for state in job_sources(step)}
    reached |= {JobState.FINISHED_DIRTY, JobState.FAILED}  # SETTLE's other outcomes
    assert reached == set(JobState)
    for step in {s for _, s in FILE_JOB_TRANSITIONS}:
        assert file_target(step) in FileJobState


def test_a_step_the_table_lacks_is_refused() -> None:
    with pytest.raises(ValueError, match="no job transition"):
        job_target(JobState.FINISHED, JobStep.PAUSE)
    assert JobState.ACTIVE not in job_sources(JobStep.COMMIT)
    assert FileJobState.FINISHED not in file_sources(JobStep.RETRY)


def test_pyrft_rules_priority_only_before_activity_clear_only_when_inactive() -> None:
    assert JobState.ACTIVE not in REPRIORITIZABLE_JOB_STATES and JobState.FINISHED not in REPRIORITIZABLE_JOB_STATES
    assert JobState.QUEUED in REPRIORITIZABLE_JOB_STATES
    assert JobState.ACTIVE not in CLEARABLE_JOB_STATES and JobState.QUEUED not in CLEARABLE_JOB_STATES
    assert FINAL_JOB_STATES <= CLEARABLE_JOB_STATES


def test_settling_names_the_mixed_outcome() -> None:
    assert settled_state(3, 0) is JobState.FINISHED
    assert settled_state(2, 1) is JobState.FINISHED_DIRTY
    assert settled_state(0, 2) is JobState.FAILED


def test_failures_are_classified_as_fts3_does() -> None:
    transient = {r for r in FailureReason if r.kind is FailureKind.TRANSIENT}
    assert {
        FailureReason.TIMEOUT,
        FailureReason.CONNECTION,
        FailureReason.SERVER_ERROR,
        FailureReason.STALLED,
    } <= transient
    for never in (FailureReason.NOT_FOUND, FailureReason.FORBIDDEN, FailureReason.EXISTS, FailureReason.NO_SPACE):
        assert never.kind is FailureKind.PERMANENT
