"""``sarcofed-supernode``'s repair of Flower's push loop, on Flower's own ``_push_messages``,
NodeState and ObjectStore: a stale reply of a stopped run is in the SuperNode's state when a
live instruction's reply arrives; the live reply must go out in the same push.

Without the repair, Flower's push sends the stale reply and returns, and the live one stays
behind (a resumed study waited for that site until its round timeout in CI).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.run import RunNotRunningException
from flwr.supercore.task_identity import TaskIdentity
from flwr.supernode import start_client_internal as loop
from flwr.supernode.nodestate import NodeStateFactory

from client.supernode import install, push_until_run_answered

STALE_RUN, LIVE_RUN = 111, 222


@pytest.fixture(autouse=True)
def _task_identity() -> Iterator[None]:
    """Flower stamps a new Message with the process's task identity; restore it after."""
    saved = TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def _instruction(run_id: int) -> Message:
    TaskIdentity.run_id = run_id  # as in the ServerApp process of that run
    TaskIdentity.node_id = 1
    TaskIdentity.task_id = 5
    content = RecordDict({"config": ConfigRecord({"task": "train"})})
    msg = Message(content, dst_node_id=7, message_type="train")
    msg.metadata.__dict__["_message_id"] = msg.object_id
    return msg


def _reply(instruction: Message) -> Message:
    return Message(RecordDict({"config": ConfigRecord({"done": 1})}), reply_to=instruction)


def _no_objects(*args: object) -> None:
    """The object upload after a send (the replies here carry nothing to upload)."""


class FakeLink:
    """The SuperLink side of ``send``: a stopped run's reply is refused as Flower refuses it."""

    def __init__(self) -> None:
        self.sent: list[int] = []

    def send(self, message: Message, tree: Any, runtime: float) -> tuple[set[str], str]:
        self.sent.append(message.metadata.run_id)
        if message.metadata.run_id == STALE_RUN:
            raise RunNotRunningException
        return set(), "session"


def _state_with_stale_reply() -> tuple[Any, Any, Message]:
    store = ObjectStoreFactory().store()
    state = NodeStateFactory(objectstore_factory=ObjectStoreFactory()).state()
    stale = _instruction(STALE_RUN)
    loop._insert_message(stale, state, store)
    loop._insert_message(_reply(stale), state, store)  # its ClientApp answered after the pull gave up
    live = _instruction(LIVE_RUN)
    loop._insert_message(live, state, store)
    return state, store, live


def _answer_later(state: Any, store: Any, live: Message, delay: float) -> threading.Thread:
    def answer() -> None:
        time.sleep(delay)  # the live ClientApp is still training when the push starts
        loop._insert_message(_reply(live), state, store)

    thread = threading.Thread(target=answer)
    thread.start()
    return thread


def test_flowers_own_push_leaves_the_live_reply_behind() -> None:
    """The defect itself, so this file notices when a Flower release fixes (or moves) it."""
    state, store, live = _state_with_stale_reply()
    link = FakeLink()
    answering = _answer_later(state, store, live, delay=1.0)
    loop._push_messages(state=state, object_store=store, send=link.send, push_object=_no_objects)
    answering.join()
    assert link.sent == [STALE_RUN]  # returned without the live reply


def test_the_repaired_push_sends_the_live_reply_after_the_stale_one() -> None:
    state, store, live = _state_with_stale_reply()
    link = FakeLink()
    answering = _answer_later(state, store, live, delay=1.0)
    push_until_run_answered(
        LIVE_RUN,
        loop._push_messages,
        state=state,
        object_store=store,
        send=link.send,
        push_object=_no_objects,
    )
    answering.join()
    assert link.sent == [STALE_RUN, LIVE_RUN]
    assert not state.get_messages_legacy(is_reply=True)  # nothing left behind


def test_a_failed_send_of_the_live_reply_still_ends_the_push() -> None:
    """A reply of the live run that cannot be sent is that run's answer: the loop must not wait
    for a second one (there is none, and the SuperNode would stop pulling)."""
    state, store, live = _state_with_stale_reply()
    loop._insert_message(_reply(live), state, store)
    attempts: list[int] = []

    def broken_send(message: Message, tree: Any, runtime: float) -> tuple[set[str], str]:
        attempts.append(message.metadata.run_id)
        raise ConnectionError("SuperLink unreachable")

    push_until_run_answered(
        LIVE_RUN,
        loop._push_messages,
        state=state,
        object_store=store,
        send=broken_send,
        push_object=_no_objects,
    )
    assert sorted(attempts) == [STALE_RUN, LIVE_RUN]


def test_install_patches_the_supernode_loop_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loop, "_push_messages", loop._push_messages)
    monkeypatch.setattr(loop, "_pull_and_store_message", loop._pull_and_store_message)
    original_push = loop._push_messages
    assert install() is True
    assert loop._push_messages is not original_push
    patched = loop._push_messages
    assert install() is False  # a second install does not wrap the wrapper
    assert loop._push_messages is patched


def test_the_site_command_runs_the_repaired_supernode() -> None:
    from pathlib import Path

    from client.deploy import JoinSpec, supernode_command

    spec = JoinSpec(Path("/tmp/site"), "127.0.0.1:9092", Path("/tmp/ca.crt"), Path("/tmp/k"))
    cmd = supernode_command(spec)
    assert cmd[0] == "sarcofed-supernode"
