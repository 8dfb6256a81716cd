"""server.messaging: replies are collected with a short poll, late replies are left out."""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import islice
from types import SimpleNamespace

from server.messaging import poll_intervals, send_and_receive, sort_replies


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@dataclass
class FakeGrid:
    """Each node replies ``delays[node]`` seconds after the push (None: never)."""

    clock: FakeClock
    delays: dict[int, float | None]
    pushed: dict[str, int] = field(default_factory=dict)
    delivered: set[str] = field(default_factory=set)
    pulls: int = 0

    def push_messages(self, messages):
        ids = []
        for node in messages:  # a "message" here is its destination node
            msg_id = f"m{node}"
            self.pushed[msg_id] = node
            ids.append(msg_id)
        return ids

    def pull_messages(self, message_ids):
        self.pulls += 1
        out = []
        for msg_id in message_ids:
            node = self.pushed[msg_id]
            delay = self.delays[node]
            if msg_id in self.delivered or delay is None or self.clock.now < delay:
                continue
            self.delivered.add(msg_id)
            metadata = SimpleNamespace(reply_to_message_id=msg_id, src_node_id=node)
            out.append(SimpleNamespace(metadata=metadata, has_error=lambda: False))
        return out


def test_poll_starts_short_and_is_capped() -> None:
    assert list(islice(poll_intervals(0.1, 2.0, 1.0), 6)) == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]


def test_replies_are_seen_within_a_second_not_three() -> None:
    clock = FakeClock()
    grid = FakeGrid(clock, {1: 0.05, 2: 2.5})
    replies = send_and_receive(grid, [1, 2], timeout=60.0, clock=clock, sleep=clock.sleep)
    assert sorted(r.metadata.src_node_id for r in replies) == [1, 2]
    # the last reply (ready at 2.5 s) is collected at most one poll (<= 1 s) later
    assert 0.0 <= clock.now - 2.5 <= 1.0, clock.now
    assert max(clock.sleeps) <= 1.0


def test_silent_node_is_left_out_at_the_timeout() -> None:
    clock = FakeClock()
    grid = FakeGrid(clock, {1: 0.0, 2: None})
    replies = send_and_receive(grid, [1, 2], timeout=5.0, clock=clock, sleep=clock.sleep)
    assert [r.metadata.src_node_id for r in replies] == [1]
    assert clock.now == 5.0  # waited exactly the timeout, pulled once more at the end
    assert sort_replies([1, 2], replies).timed_out == [2]
