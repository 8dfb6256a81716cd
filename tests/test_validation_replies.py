"""The validation round keeps one result per site; a reply it cannot read fails that site with a
reason that says what is wrong and what to do (not a pydantic dump)."""

from __future__ import annotations

import json

import pytest
from flwr.app import ConfigRecord, Message, RecordDict

from common.errors import SarcofedError
from protocols import keys
from protocols.study import StudyConfig
from server.validation import PAYLOAD_SCHEMA_VERSION, parse_reply, run_validation
from tests.report_builders import hospital_a

pytestmark = pytest.mark.usefixtures("flower_task_identity")


class ReplyingSites:
    """A Grid whose sites answer at once, each with its own reply content."""

    def __init__(self, contents: dict[int, RecordDict]) -> None:
        self.contents = contents
        self.replies: dict[str, Message] = {}

    def get_node_ids(self) -> list[int]:
        return sorted(self.contents)

    def push_messages(self, messages: list[Message]) -> list[str]:
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = msg.object_id  # what a real Grid does on push
            self.replies[msg.metadata.message_id] = Message(
                self.contents[msg.metadata.dst_node_id], reply_to=msg
            )
        return [m.metadata.message_id for m in messages]

    def pull_messages(self, ids: set[str]) -> list[Message]:
        return [self.replies.pop(i) for i in list(ids) if i in self.replies]


def _payload(text: str) -> RecordDict:
    return RecordDict({keys.PAYLOAD: ConfigRecord({keys.PAYLOAD_JSON: text})})


def _reply(content: RecordDict) -> Message:
    request = Message(RecordDict(), dst_node_id=1, message_type="query")
    request.metadata.__dict__["_message_id"] = request.object_id
    return Message(content, reply_to=request)


def _older_version() -> str:
    data = json.loads(hospital_a().model_dump_json(by_alias=True))
    data["schema_version"] = "1"
    return json.dumps(data)


def test_a_payload_of_another_schema_version_names_both_versions_and_the_fix() -> None:
    with pytest.raises(SarcofedError) as err:
        parse_reply(_reply(_payload(_older_version())), "hospital-a")
    assert str(err.value) == (
        f"site hospital-a sent payload schema 1, this coordinator reads {PAYLOAD_SCHEMA_VERSION}: "
        "run the same sarcofed version at the site and the coordinator"
    )


def test_a_reply_without_a_payload_says_so() -> None:
    with pytest.raises(SarcofedError, match=r"^site hospital-a: the reply carried no payload"):
        parse_reply(_reply(RecordDict()), "hospital-a")
    with pytest.raises(SarcofedError, match=r"^site hospital-a: the reply carried no payload"):
        parse_reply(_reply(RecordDict({keys.PAYLOAD: ConfigRecord({"other": "x"})})), "hospital-a")


def test_a_payload_of_this_version_that_fails_the_schema_names_the_field() -> None:
    data = json.loads(hospital_a().model_dump_json(by_alias=True)) | {"n_used": -1}
    with pytest.raises(SarcofedError) as err:
        parse_reply(_reply(_payload(json.dumps(data))), "hospital-a")
    assert str(err.value) == (
        "site hospital-a: its reply failed the payload schema: "
        "n_used: Input should be greater than or equal to 0"
    )


def test_the_round_fails_only_the_site_whose_reply_it_cannot_read() -> None:
    grid = ReplyingSites(
        {
            1: _payload(hospital_a().model_dump_json(by_alias=True)),
            2: _payload(_older_version()),
            3: RecordDict(),
        }
    )
    sites = {1: "hospital-a", 2: "hospital-b", 3: "hospital-c"}
    results = run_validation(grid, StudyConfig(), sites, task="compare")  # type: ignore[arg-type]
    by_site = {r.site: r for r in results}
    assert by_site["hospital-a"].status == "ok" and by_site["hospital-a"].payload == hospital_a()
    assert (by_site["hospital-b"].status, by_site["hospital-b"].reason) == (
        "failed",
        f"site hospital-b sent payload schema 1, this coordinator reads {PAYLOAD_SCHEMA_VERSION}: "
        "run the same sarcofed version at the site and the coordinator",
    )
    assert by_site["hospital-c"].status == "failed"
    assert by_site["hospital-c"].reason is not None
    assert by_site["hospital-c"].reason.startswith("site hospital-c: the reply carried no payload")
