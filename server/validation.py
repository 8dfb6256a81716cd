"""The external validation round: the study model to every site, one result per site.

Flower's ``aggregate_evaluate`` would average sites away; here each reply is kept with
its site, validated against the payload schema (:func:`parse_reply`), and failures keep
their reason. Each reply is parsed as it arrives and only the parsed payload (aggregates, a
few kB) is kept, never the Flower Message: memory per site is one small payload.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Collection, Iterable
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from pydantic import ValidationError

from common.errors import SarcofedError
from protocols import keys
from protocols.payloads import EvaluationPayload, Role
from protocols.report import SiteResult, SiteStatus
from protocols.study import StudyConfig
from server.messaging import Replies, broadcast, instruction, iter_replies

if TYPE_CHECKING:  # torch and the model zoo load only when a model is sent (not for identify)
    import torch

    from common.model import ModelSpec

log = logging.getLogger(__name__)


def identify_sites(grid: Grid, node_ids: Iterable[int], timeout: float) -> dict[int, str]:
    """Ask every node for its site name (a pseudonym); silent nodes are named by node id."""
    nodes = list(node_ids)
    replies = broadcast(grid, nodes, instruction("identify", {}), MessageType.QUERY, timeout)
    names: dict[int, str] = {}
    for node in nodes:
        reply = replies.ok.get(node)
        if reply is not None:
            try:
                names[node] = str(json.loads(str(reply.content[keys.PAYLOAD][keys.PAYLOAD_JSON]))["site"])
                continue
            except (KeyError, ValueError, TypeError):
                pass
        names[node] = f"node-{node}"
    _deduplicate(names)
    return names


def _deduplicate(names: dict[int, str]) -> None:
    seen: dict[str, int] = {}
    for node, name in sorted(names.items()):
        if name in seen:
            names[node] = f"{name}#{node}"
        seen.setdefault(name, node)


#: The payload schema this coordinator reads (``EvaluationPayload.schema_version``).
PAYLOAD_SCHEMA_VERSION: str = EvaluationPayload.model_fields["schema_version"].default


def parse_reply(reply: Message, site: str) -> EvaluationPayload:
    """The site's payload from its reply; a :class:`SarcofedError` that says what is wrong and
    what to do: no payload in the reply, a payload of another sarcofed version, a payload that
    fails the schema."""
    try:
        text = str(reply.content[keys.PAYLOAD][keys.PAYLOAD_JSON])
    except KeyError:
        raise SarcofedError(
            f"site {site}: the reply carried no payload (no '{keys.PAYLOAD_JSON}' in its "
            f"'{keys.PAYLOAD}' record)"
        ) from None
    try:
        return EvaluationPayload.model_validate_json(text)
    except ValidationError as err:
        sent = _schema_version(text)
        if sent is not None and sent != PAYLOAD_SCHEMA_VERSION:
            raise SarcofedError(
                f"site {site} sent payload schema {sent}, this coordinator reads {PAYLOAD_SCHEMA_VERSION}: "
                "run the same sarcofed version at the site and the coordinator"
            ) from None
        problems = "; ".join(
            f"{'.'.join(str(part) for part in e['loc']) or '(top level)'}: {e['msg']}" for e in err.errors()
        )
        raise SarcofedError(f"site {site}: its reply failed the payload schema: {problems}") from None


def _schema_version(text: str) -> str | None:
    """The ``schema_version`` a payload's JSON declares, if it is a JSON object that has one."""
    try:
        data = json.loads(text)
    except ValueError:
        return None
    version = data.get("schema_version") if isinstance(data, dict) else None
    return None if version is None else str(version)


def run_validation(
    grid: Grid,
    study: StudyConfig,
    sites: dict[int, str],
    *,
    task: str,
    spec: ModelSpec | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
    model_hash: str | None = None,
    internal_sites: Collection[str] = (),
) -> list[SiteResult]:
    """Send ``evaluate`` (with the model) or ``compare`` to the chosen sites; keep each result.

    ``evaluate`` tells each site its role: ``internal`` for the ``internal_sites`` (they
    trained the model: only their held-out test patients are scored), ``external`` for the
    others (every usable slice). A site may still answer internal when its site.toml declares
    that it trained this model (``contributed_models``).
    """
    chosen = {n: s for n, s in sites.items() if not study.study.sites or s in study.study.sites}
    # the split settings (train) and the label protocol travel too: an internal site scores the
    # same test patients it held out in training, and every site applies the same protocol
    config: dict[str, object] = {**study.to_flat("study", "eval", "train", "protocol")}
    arrays = None
    if task == "evaluate":
        assert spec is not None and state_dict is not None  # programming error, not user input
        from common.model import pack_state

        packed, layout = pack_state(state_dict)
        arrays = ArrayRecord({keys.PACKED: Array(np.ascontiguousarray(packed))})
        config |= {keys.MODEL_SPEC: spec.model_dump_json(), keys.MODEL_LAYOUT: layout}
        config[keys.MODEL_HASH] = model_hash or ""
    roles: dict[int, Role | None] = {
        n: (("internal" if s in internal_sites else "external") if task == "evaluate" else None)
        for n, s in chosen.items()
    }
    contents = {
        n: instruction(task, config | ({keys.ROLE: role} if role else {}), arrays)
        for n, role in roles.items()
    }
    replies, parsed = receive_payloads(grid, contents, chosen, study.study.round_timeout)
    results: list[SiteResult] = []
    for node, site in sorted(sites.items(), key=lambda kv: kv[1]):
        if node not in chosen:
            results.append(
                SiteResult(site=site, node_id=node, status="not_selected", reason="not in study.sites")
            )
        elif node in parsed:
            payload = parsed[node]
            if isinstance(payload, SarcofedError):
                results.append(
                    SiteResult(
                        site=site, node_id=node, status="failed", reason=str(payload), role=roles[node]
                    )
                )
                continue
            status: SiteStatus = "ok" if payload.n_used > 0 else "no_usable_slices"
            reason = None if payload.n_used else _no_slice_reason(payload)
            results.append(
                SiteResult(
                    site=site, node_id=node, status=status, reason=reason, role=payload.role, payload=payload
                )
            )
        elif node in replies.refused:
            results.append(
                SiteResult(
                    site=site, node_id=node, status="refused", reason=replies.refused[node], role=roles[node]
                )
            )
        elif node in replies.failed:
            results.append(
                SiteResult(
                    site=site, node_id=node, status="failed", reason=replies.failed[node], role=roles[node]
                )
            )
        else:
            results.append(
                SiteResult(
                    site=site,
                    node_id=node,
                    role=roles[node],
                    status="timeout",
                    reason=f"no reply within study.round-timeout = {study.study.round_timeout:.0f} s",
                )
            )
    connected = set(sites.values())
    for missing in (s for s in study.study.sites if s not in connected):
        results.append(
            SiteResult(
                site=missing,
                status="not_connected",
                reason="named in study.sites but its SuperNode was not connected when the round started",
            )
        )
    return results


def receive_payloads(
    grid: Grid, contents: dict[int, RecordDict], sites: dict[int, str], timeout: float
) -> tuple[Replies, dict[int, EvaluationPayload | SarcofedError]]:
    """Send each node its content; parse every reply as it arrives and keep the payload (or why
    it could not be read), dropping the Message. The :class:`Replies` hold the error replies
    and the silent nodes; its ``ok`` stays empty (the payloads are the second value)."""
    messages = [
        Message(content=c, message_type=MessageType.EVALUATE, dst_node_id=n) for n, c in contents.items()
    ]
    replies = Replies()
    parsed: dict[int, EvaluationPayload | SarcofedError] = {}
    for reply in iter_replies(grid, messages, timeout):
        node = reply.metadata.src_node_id
        if reply.has_error():
            replies.add(reply)
            continue
        try:
            parsed[node] = parse_reply(reply, sites.get(node, f"node-{node}"))
        except SarcofedError as err:
            parsed[node] = err
    replies.close(n for n in contents if n not in parsed)
    return replies, parsed


def _no_slice_reason(payload: EvaluationPayload) -> str:
    if payload.split == "test":
        return (
            f"no usable slice among its held-out test patients ({payload.n_in_split} manifest rows in the "
            f"test part; train.test-fraction too small for this site?); excluded: {payload.excluded}"
        )
    return f"no usable slice; excluded: {payload.excluded}"
