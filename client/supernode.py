"""``sarcofed-supernode``: Flower's ``flower-supernode`` (same flags) with one repair.

Flower 1.42's SuperNode handles one message at a time: it pulls an instruction, then
``_push_messages`` waits until *any* reply is in its local state, sends what is there and
goes back to pulling. A reply can be in that state that belongs to no message the loop is
waiting for: when the SuperLink restarts (or a run is stopped) while the SuperNode is still
receiving an instruction, the pull ends with "run is not RUNNING" after the instruction was
stored and its ClientApp started, and that ClientApp's reply lands later. The next live
message's push then sends the stale reply (the SuperLink ignores it) and returns, and the
live reply stays behind, sent only when another instruction arrives. A resumed study then
waits for that site until its round timeout: seen as "no reply within 180 s" in CI on a
study resumed after a SuperLink restart.

The repair: after pulling an instruction of run R, push replies until one of run R has gone
out (sent, refused or failed: the attempt counts), sending any stale replies on the way.
Within one run a site is never sent a second instruction while the first is unanswered
(the SuperNode pulls the next only after pushing), so "a reply of run R" is the reply to
the instruction just pulled. Everything else is Flower's own code, unchanged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

Push = Callable[..., None]
Send = Callable[[Any, Any, float], Any]


def push_until_run_answered(run_id: int, push: Push, *, send: Send, **push_kwargs: Any) -> None:
    """Call Flower's ``push`` (``_push_messages``) until it has handed ``send`` a reply of
    ``run_id``; each call waits for and sends the replies present at that moment."""
    answered = False

    def send_and_note(message: Any, tree: Any, runtime: float) -> Any:
        nonlocal answered
        if message.metadata.run_id == run_id:
            answered = True  # noted before sending: a failed send is still this run's answer
        return send(message, tree, runtime)

    while not answered:
        push(send=send_and_note, **push_kwargs)


def install() -> bool:
    """Patch the SuperNode loop of the installed Flower; ``False`` (and a warning) where its
    internals are not the ones this repair was written for, in which case Flower runs as is."""
    import flwr.supernode.start_client_internal as loop

    pull = getattr(loop, "_pull_and_store_message", None)
    push = getattr(loop, "_push_messages", None)
    if pull is None or push is None:
        log.warning(
            "sarcofed-supernode: the installed Flower (%s) lacks the SuperNode internals this repair "
            "was written for (Flower 1.42); running Flower's SuperNode as it is. After a coordinator "
            "restart this site may then look silent to a study: restart the SuperNode if it does.",
            _flower_version(),
        )
        return False
    if getattr(push, "_sarcofed", False):  # installed already
        return False
    last_run: dict[str, int | None] = {"run_id": None}

    def pull_noting_run(**kwargs: Any) -> int | None:
        run_id = pull(**kwargs)
        last_run["run_id"] = run_id
        return run_id

    def push_for_last_run(**kwargs: Any) -> None:
        run_id = last_run["run_id"]
        if run_id is None:  # Flower only pushes after a pull that returned a run
            push(**kwargs)
            return
        push_until_run_answered(run_id, push, **kwargs)

    push_for_last_run._sarcofed = True  # type: ignore[attr-defined]
    setattr(loop, "_pull_and_store_message", pull_noting_run)  # noqa: B010 (Flower's private names)
    setattr(loop, "_push_messages", push_for_last_run)  # noqa: B010
    return True


def _flower_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"flwr {version('flwr')}"
    except PackageNotFoundError:
        return "flwr, version unknown"


def main() -> None:
    """Run Flower's SuperNode with the repair installed (flags: ``flower-supernode --help``)."""
    install()
    from flwr.supernode.cli import flower_supernode

    flower_supernode()


if __name__ == "__main__":
    main()
