"""When the kernel team's caller gives up on its helpers for a while (shardmesh/kernels/team.c): a
job whose caller waited too long for a descheduled helper is slow; 3 slow jobs among the last 64
run with helpers send the next 64 jobs alone, one slow job does not (a quiet host's other processes
take a helper's core now and then), and the count starts afresh after going alone."""

import ctypes

import pytest

from shardmesh import kernels

SLOW_JOBS, WINDOW, ALONE_JOBS = 3, 64, 64


@pytest.fixture()
def note():
    loaded = kernels.kernel()
    assert loaded is not None, "the CPU kernels did not build here (see the log): CI has gcc"
    function = loaded.library.shardmesh_team_note_job
    function.argtypes, function.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_long
    function(0, 3)
    yield lambda slow, reset=0: function(int(slow), reset)
    function(0, 3)  # nothing left for the jobs of later tests


def test_one_or_two_slow_jobs_among_64_keep_the_helpers(note):
    for _ in range(3):
        assert note(True) == 0 and all(note(False) == 0 for _ in range(WINDOW - 2))
        assert note(True) == 0  # two slow ones, 63 jobs apart
    assert all(note(False) == 0 for _ in range(WINDOW))


def test_three_slow_jobs_among_64_send_the_next_64_alone_then_count_afresh(note):
    assert note(True) == 0 and all(note(False) == 0 for _ in range(WINDOW - 3))
    assert note(True) == 0
    assert note(True) == ALONE_JOBS  # the third within the last 64
    # (those jobs run alone: here the count is cleared instead) and the three no longer count
    assert note(True, reset=2) == 0 and note(True) == 0
    assert note(True) == ALONE_JOBS


def test_slow_jobs_further_apart_than_64_never_add_up(note):
    for _ in range(5):
        assert note(True) == 0
        assert all(note(False) == 0 for _ in range(WINDOW // 2 - 1))
    # every window of 64 holds two of them at most
