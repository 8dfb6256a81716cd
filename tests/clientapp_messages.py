"""Instructions through the real ClientApp handler, as Flower delivers them, and the replies read back.

One place for the tests that drive ``client.app`` in-process (they need the
``flower_task_identity`` fixture): :func:`handle` sends one task, :func:`payload_of` and
:func:`metrics_of` read what the site released.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from client import app
from protocols import keys

#: The message type and ClientApp handler each task arrives with (every other task: evaluate).
HANDLERS: dict[str, tuple[str, str]] = {
    "identify": (MessageType.QUERY, "identify"),
    "train": (MessageType.TRAIN, "train"),
}


def handle(
    task: str,
    node_config: Mapping[str, object],
    *,
    run_config: Mapping[str, object] | None = None,
    content: RecordDict | None = None,
    run_id: int = 7,
) -> Message:
    """``task`` through the ClientApp's handler for it, on a node with ``node_config``.

    ``content`` is the message's RecordDict (default: a config record naming the task only).
    """
    kind, handler = HANDLERS.get(task, (MessageType.EVALUATE, "evaluate"))
    if content is None:
        content = RecordDict({keys.CONFIG: ConfigRecord({keys.TASK: task})})
    msg = Message(content, dst_node_id=1, message_type=kind)
    context = Context(
        run_id=run_id,
        node_id=1,
        node_config=dict(node_config),  # type: ignore[arg-type]
        state=RecordDict(),
        run_config=dict(run_config or {}),  # type: ignore[arg-type]
    )
    return app._handle(msg, context, handler)


def payload_json(reply: Message) -> str:
    """The released payload as the site sent it (JSON text); fails with the site's reason on an error."""
    assert not reply.has_error(), reply.error.reason
    return str(reply.content[keys.PAYLOAD][keys.PAYLOAD_JSON])


def payload_of(reply: Message) -> dict[str, object]:
    """The released payload (identify, evaluate, compare) as a dict."""
    data: dict[str, object] = json.loads(payload_json(reply))
    return data


def metrics_of(reply: Message) -> dict[str, float]:
    """A training reply's released metrics; fails with the site's reason on an error."""
    assert not reply.has_error(), reply.error.reason
    return {k: float(v) for k, v in reply.content.metric_records[keys.METRICS].items()}  # type: ignore[arg-type]
