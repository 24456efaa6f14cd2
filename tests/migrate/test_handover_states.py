"""The handover's state machine (snapvisor/migrate/handover.py) is the one that
docs/migration.md shows, and it refuses every step the table does not list."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from snapvisor.migrate.handover import INITIAL, TRANSITIONS, Event, Handover, State

DOCS = Path(__file__).resolve().parents[2] / "docs" / "migration.md"


def documented_transitions() -> list[tuple[str, str, str, str]]:
    """(state, event, next state, what the guest does) of each row of the table in
    'The handover'."""
    section = DOCS.read_text().split("## The handover", 1)[1].split("\n## ", 1)[0]
    rows = [[cell.strip() for cell in line.strip("|").split("|")]
            for line in section.splitlines() if re.match(r"\| [AB] \|", line)]
    return [(state.strip("`"), event, following.strip("`"), guest) for _, state, event, following, guest in rows]


def test_the_documented_table_is_the_code() -> None:
    assert documented_transitions() == [(state.value, event.value, step.next.value, step.guest)
                                        for (state, event), step in TRANSITIONS.items()]


def reachable(role: str) -> set[State]:
    seen, todo = set(), [INITIAL[role]]
    while todo:
        state = todo.pop()
        if state not in seen:
            seen.add(state)
            todo.extend(step.next for (origin, _), step in TRANSITIONS.items() if origin is state)
    return seen


@pytest.mark.parametrize("role", sorted(INITIAL))
def test_every_step_outside_the_table_is_refused(role: str) -> None:
    for state in reachable(role):
        for event in Event:
            handover = Handover(role)
            handover.state = state
            if (state, event) in TRANSITIONS:
                assert handover.on(event) is TRANSITIONS[state, event].next
            else:
                with pytest.raises(AssertionError, match="is not allowed in state"):
                    handover.on(event)


def test_once_go_may_be_out_no_path_resumes_the_source() -> None:
    """From Committing, every path ends with the guest paused here or moved."""
    after_go = {State.COMMITTING}
    for _ in range(len(State)):
        after_go |= {step.next for (origin, _), step in TRANSITIONS.items() if origin in after_go}
    assert State.RESUMED_HERE not in after_go and after_go == {State.COMMITTING, State.MOVED, State.UNCONFIRMED}
