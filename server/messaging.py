"""Sending one instruction to many sites and sorting the replies (thin Flower glue)."""

from __future__ import annotations

import logging
from collections.abc import Iterable
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
        node = reply.metadata.src_node_id
        if reply.has_error():
            if reply.error.code == keys.ERROR_REFUSED:
                out.refused[node] = reply.error.reason
            else:
                out.failed[node] = reply.error.reason
        else:
            out.ok[node] = reply
    out.timed_out = [n for n in sent if n not in out.ok and n not in out.failed and n not in out.refused]
    return out


def broadcast(
    grid: Grid, node_ids: Iterable[int], content: RecordDict, message_type: str, timeout: float
) -> Replies:
    """Send the same content to every node and wait up to ``timeout`` seconds."""
    nodes = list(node_ids)
    messages = [Message(content=content, message_type=message_type, dst_node_id=n) for n in nodes]
    replies = grid.send_and_receive(messages, timeout=timeout)
    return sort_replies(nodes, replies)
