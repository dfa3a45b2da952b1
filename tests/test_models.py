"""Domain model: ids sortable and unique, the run state machine in one place, dict round-trips."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from backends.errors import StateError
from backends.ids import id_time_ms, is_id, new_id
from backends.models import FINAL_STATES, TRANSITIONS, Instance, Run, RunState, check_transition


def test_ids_sort_by_creation_and_are_unique() -> None:
    ids = [new_id() for _ in range(5000)]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    assert all(is_id(i) and len(i) == 26 for i in ids)


def test_ids_from_other_processes_do_not_collide() -> None:
    code = "from backends.ids import new_id\nprint('\\n'.join(new_id() for _ in range(2000)))"
    outs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
            for _ in range(3)]
    all_ids = [i for o in outs for i in o]
    assert len(set(all_ids)) == 6000


@given(st.integers(min_value=0, max_value=2**48 - 1))
def test_id_time_round_trip(ms: int) -> None:
    assert id_time_ms(new_id(now_ms=ms)) >= ms


def test_state_machine() -> None:
    assert check_transition("queued", "syncing") is RunState.SYNCING
    assert check_transition(RunState.RUNNING, "succeeded") is RunState.SUCCEEDED
    assert check_transition("lost", "running") is RunState.RUNNING  # an instance that came back
    for final in FINAL_STATES:
        assert TRANSITIONS[final] == frozenset()
        with pytest.raises(StateError, match="final"):
            check_transition(final, "running")
    with pytest.raises(StateError, match="from succeeded to running"):
        check_transition("succeeded", "running")
    with pytest.raises(ValueError):
        check_transition("running", "exploded")
    # every state is reachable from queued
    seen, todo = {RunState.QUEUED}, [RunState.QUEUED]
    while todo:
        for nxt in TRANSITIONS[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    assert seen == set(RunState)


def test_records_round_trip_and_ignore_unknown_keys() -> None:
    r = Run(command="python train.py", instance="local", params={"lr": 0.1})
    d = r.to_dict()
    d["future_field"] = 1
    assert Run.from_dict(d) == r
    i = Instance(name="n", provider="p", provider_type="local", vcpus=8, memory_mib=32768,
                 gpus=[{"index": 0, "name": "H100", "memory_total_mib": 81559}] * 2)
    assert i.gpu_summary == "2× H100"
    assert i.size_summary == "8 vCPU · 32 GiB"
    assert Instance.from_dict(i.to_dict()) == i
