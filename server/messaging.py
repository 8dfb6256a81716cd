"""Sending one instruction to many sites and sorting the replies (thin Flower glue).

:func:`iter_replies` hands replies over one at a time as they arrive, so a caller that folds
each one into an aggregate (training's weighted sum, validation's parsed payload) can drop it
at once: the coordinator's memory then does not grow with the number of sites.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from protocols import keys

log = logging.getLogger(__name__)


@dataclass
class Replies:
    """Replies of one round, by node: successes, error replies (with reason), silence."""

    ok: dict[int, Message] = field(default_factory=dict)
    failed: dict[int, str] = field(default_factory=dict)
    refused: dict[int, str] = field(default_factory=dict)
    timed_out: list[int] = field(default_factory=list)

    def add(self, reply: Message) -> None:
        """File one reply under ``ok``, ``refused`` or ``failed`` by its sender."""
        node = reply.metadata.src_node_id
        if reply.has_error():
            if reply.error.code == keys.ERROR_REFUSED:
                self.refused[node] = reply.error.reason or "refused, no reason given"
            else:
                self.failed[node] = reply.error.reason or "failed, no reason given"
        else:
            self.ok[node] = reply

    def close(self, sent: Iterable[int]) -> None:
        """Every node in ``sent`` that has not replied (in any way) timed out."""
        answered = self.ok.keys() | self.failed.keys() | self.refused.keys()
        self.timed_out = [n for n in sent if n not in answered]

    def problems(self, timeout: float) -> dict[int, str]:
        """Every node that did not deliver, with a plain reason."""
        out = dict(self.failed) | dict(self.refused)
        out |= {n: f"no reply within {timeout:.0f} s" for n in self.timed_out}
        return out


def instruction(task: str, config: dict[str, object], arrays: ArrayRecord | None = None) -> RecordDict:
    record = RecordDict({keys.CONFIG: ConfigRecord({keys.TASK: task, **config})})  # type: ignore[dict-item]
    if arrays is not None:
        record[keys.ARRAYS] = arrays
    return record


def sort_replies(sent: Iterable[int], replies: Iterable[Message]) -> Replies:
    out = Replies()
    for reply in replies:
        out.add(reply)
    out.close(sent)
    return out


#: Reply polling: first look after FIRST_POLL_S, then each wait x POLL_GROWTH up to MAX_POLL_S,
#: back to FIRST_POLL_S after every reply. Flower's own ``Grid.send_and_receive`` on the
#: deployment engine sleeps 3 s between pulls, which adds up to 3 s to every round.
FIRST_POLL_S = 0.1
POLL_GROWTH = 1.5
MAX_POLL_S = 1.0


def poll_intervals(
    first: float = FIRST_POLL_S, growth: float = POLL_GROWTH, cap: float = MAX_POLL_S
) -> Iterator[float]:
    """The waits between two pulls while nothing arrives: first, first x growth, ... capped."""
    wait = first
    while True:
        yield wait
        wait = min(wait * growth, cap)


def send_and_receive(
    grid: Grid,
    messages: Iterable[Message],
    timeout: float,
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> list[Message]:
    """``grid.send_and_receive`` with a short, growing poll instead of Flower's fixed 3 s.

    Pushes every message, then pulls replies until each message has one or ``timeout``
    seconds have passed; returns the replies received (late ones are simply absent).
    """
    return list(iter_replies(grid, messages, timeout, clock=clock, sleep=sleep))


def iter_replies(
    grid: Grid,
    messages: Iterable[Message],
    timeout: float,
    *,
    pull_chunk: int | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> Iterator[Message]:
    """Push every message, then yield each reply as it is pulled, until all have replied or
    ``timeout`` seconds have passed (the poll of :func:`send_and_receive`).

    ``pull_chunk``: ask the Grid for at most that many message ids per pull, so no more than
    that many replies are held here at once (``None``: all pending ids in one pull). The
    generator keeps no reference to a reply it has yielded. Nothing is pushed before the first
    ``next()``: iterate it at once.
    """
    if pull_chunk is not None and pull_chunk < 1:
        raise ValueError(f"pull_chunk must be >= 1 or None, got {pull_chunk}")
    pending = set(grid.push_messages(messages))
    deadline = clock() + timeout
    waits = poll_intervals()
    while pending:
        ids = sorted(pending)
        step = pull_chunk or len(ids)
        got_any = False
        for start in range(0, len(ids), step):
            got = deque(grid.pull_messages(ids[start : start + step]))
            got_any = got_any or bool(got)
            while got:
                reply = got.popleft()
                pending.discard(reply.metadata.reply_to_message_id)
                yield reply
                del reply  # the caller holds it, or nobody does
        remaining = deadline - clock()
        if not pending or remaining <= 0:
            break
        if got_any:
            waits = poll_intervals()
        sleep(min(next(waits), remaining))


def broadcast(
    grid: Grid, node_ids: Iterable[int], content: RecordDict, message_type: str, timeout: float
) -> Replies:
    """Send the same content to every node and wait up to ``timeout`` seconds."""
    return send_each(grid, dict.fromkeys(node_ids, content), message_type, timeout)


def send_each(grid: Grid, contents: Mapping[int, RecordDict], message_type: str, timeout: float) -> Replies:
    """Send each node its own content (e.g. its role in a validation round); wait up to ``timeout``."""
    messages = [Message(content=c, message_type=message_type, dst_node_id=n) for n, c in contents.items()]
    return sort_replies(list(contents), send_and_receive(grid, messages, timeout))
