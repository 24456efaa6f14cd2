"""The handover of a live migration as an explicit state machine, one per side.

The one rule it enforces: the guest never runs on both hosts. The source (A)
resumes its copy only while GO cannot have reached the target (B); from the moment
the first byte of GO may be on the wire, A's copy stays paused until B confirms
(RESUMED) or the operator decides (`snapvisor resume --force`). B starts the guest
only on a complete, checksum-valid GO, and from then on owns it, confirmed or not.

docs/migration.md shows TRANSITIONS as a table; a test keeps the two equal.
"""

from __future__ import annotations

import enum
import logging
from typing import NamedTuple

log = logging.getLogger("snapvisor.migrate")


class State(enum.Enum):
    # Source (A)
    COPYING = "Copying"  # the guest runs on A while its pages go out
    PAUSED = "Paused"  # A paused the guest for the last pages and its state; B runs nothing
    COMMITTING = "Committing"  # GO may be on the wire: A stays paused, B may run the guest
    MOVED = "Moved"  # B confirmed: A ends its copy
    RESUMED_HERE = "ResumedHere"  # failed before GO: A resumed, B discards
    UNCONFIRMED = "HandoverUnconfirmed"  # failed after GO may have gone out: A stays paused, the operator decides
    # Target (B)
    RECEIVING = "Receiving"  # B builds the VM's parts and takes pages; nothing runs on B
    BUILT = "Built"  # B restored the state and said READY; it waits for GO, nothing runs yet
    RUNNING = "Running"  # B got a whole, valid GO and started the guest: it owns the VM now
    DISCARDED = "Discarded"  # failed before a valid GO: B dropped everything


class Event(enum.Enum):
    PAUSE = "pause"  # A: pre-copy converged, the guest is paused
    WRITE_GO = "write GO"  # A: about to write the first byte of GO
    GOT_RESUMED = "RESUMED received"  # A: a whole, valid RESUMED
    SENT_READY = "READY sent"  # B: the state is restored
    GOT_GO = "GO received"  # B: a whole, valid GO
    RESUMED_LOST = "RESUMED not sent"  # B: the link failed after the guest started
    FAILED = "failure"  # either side: reset, stall past the deadline, ERROR, corrupt or early message


class Step(NamedTuple):
    next: State
    guest: str  # what the guest does on entering `next`, for the docs


INITIAL = {"source": State.COPYING, "target": State.RECEIVING}

TRANSITIONS: dict[tuple[State, Event], Step] = {
    (State.COPYING, Event.PAUSE): Step(State.PAUSED, "paused on A; nothing on B"),
    (State.COPYING, Event.FAILED): Step(State.RESUMED_HERE, "runs on A"),
    (State.PAUSED, Event.WRITE_GO): Step(State.COMMITTING, "paused on A; B starts it once GO is whole"),
    (State.PAUSED, Event.FAILED): Step(State.RESUMED_HERE, "resumed on A"),
    (State.COMMITTING, Event.GOT_RESUMED): Step(State.MOVED, "runs on B; A ends its copy"),
    (State.COMMITTING, Event.FAILED): Step(State.UNCONFIRMED, "paused on A until `resume --force`; "
                                                              "runs on B if GO arrived"),
    (State.RECEIVING, Event.SENT_READY): Step(State.BUILT, "nothing on B yet"),
    (State.RECEIVING, Event.FAILED): Step(State.DISCARDED, "nothing on B; its parts are dropped"),
    (State.BUILT, Event.GOT_GO): Step(State.RUNNING, "starts on B"),
    (State.BUILT, Event.FAILED): Step(State.DISCARDED, "nothing on B; its parts are dropped"),
    (State.RUNNING, Event.RESUMED_LOST): Step(State.RUNNING, "runs on B"),
}


class Handover:
    """One side's handover state; `on` takes an event and returns the new state.
    An event the table does not allow in the current state is a bug in the caller."""

    def __init__(self, role: str) -> None:
        self.role = role
        self.state = INITIAL[role]

    def on(self, event: Event) -> State:
        step = TRANSITIONS.get((self.state, event))
        if step is None:
            raise AssertionError(f"migration {self.role}: {event.value} is not allowed in state {self.state.value}")
        log.debug("migration %s: %s, %s -> %s", self.role, event.value, self.state.value, step.next.value)
        self.state = step.next
        return self.state
