"""The federated training study: rounds of local training aggregated by a Flower strategy.

Flower's own strategies configure each round (FedAvg / FedProx, optionally wrapped in Flower's
central DP with server-side fixed clipping). sarcofed adds what a study needs around
them: per-site round records (who replied, who failed and why), early stopping on the
pooled validation loss, best-model checkpointing and resume. When no site releases a
validation loss, there is nothing to stop on or choose by: the model is the last round's.

Aggregation streams: each site's weights are added to a float64 weighted running sum
(:class:`common.weighted_sum.WeightedSum`) as its reply arrives and dropped at once, so the
coordinator holds one accumulator, not one model per site. The result is FedAvg's weighted
mean (what FedAvg and FedProx's ``aggregate_train`` compute) up to float32 rounding.
Central DP (``dp.enabled``) streams too (:class:`server.central_dp.ClippedMean`, Flower's
clipping and noise primitives): each reply's update is clipped as it arrives, every site
weighs the same, and the noise is sized by the replies averaged (see that module for why
this differs from Flower's wrapper).
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message
from flwr.common.logger import log as flwr_log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, FedProx, Strategy

from common.errors import SarcofedError
from common.model import MODEL_FILE_NAME, build_model, pack_state, save_model, unpack_state, weights_hash
from common.weighted_sum import WeightedSum
from protocols import keys
from protocols.classes import METRIC_CLASSES
from protocols.report import RoundRecord
from protocols.study import StudyConfig
from server.central_dp import ClippedMean
from server.checkpoint import EarlyStopping, TrainingState, load_checkpoint, save_checkpoint
from server.messaging import Replies, iter_replies

log = logging.getLogger(__name__)

#: Training replies pulled per Grid request while streaming: at most this many sites' weights
#: are in the coordinator's memory at once (besides the running sum).
TRAIN_PULL_CHUNK = 1


class _NodeSubset:
    """A view of the Grid that only shows the sites allowed to train this round."""

    def __init__(self, grid: Grid, node_ids: list[int]) -> None:
        self._grid, self._ids = grid, node_ids

    def get_node_ids(self) -> list[int]:
        return list(self._ids)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


def make_strategy(study: StudyConfig, n_sites: int) -> Strategy:
    """Flower's FedAvg or FedProx: it configures each round (and aggregates in the tests that
    compare against it); central DP is applied to the streamed sum (``server.central_dp``)."""
    common_args: dict[str, Any] = {
        "fraction_train": 1.0,
        "fraction_evaluate": 0.0,
        "min_train_nodes": n_sites,
        "min_available_nodes": n_sites,
        "weighted_by_key": keys.NUM_EXAMPLES,
        "arrayrecord_key": keys.ARRAYS,
        "configrecord_key": keys.CONFIG,
    }
    if study.strategy.name == "fedprox":
        return FedProx(proximal_mu=study.strategy.proximal_mu, **common_args)
    return FedAvg(**common_args)


def pooled_validation(replies: Replies) -> tuple[float | None, dict[str, float | None]]:
    """Pooled val loss (sum over sites / validation slices) and pooled-over-pixels IoU."""
    loss_sum = n_val = 0.0
    inter: dict[str, float] = {}
    union: dict[str, float] = {}
    for reply in replies.ok.values():
        m = reply.content.metric_records[keys.METRICS]
        if float(m.get(keys.N_VAL, 0.0)) > 0 and keys.VAL_LOSS_SUM in m:  # type: ignore[arg-type]
            loss_sum += float(m[keys.VAL_LOSS_SUM])  # type: ignore[arg-type]
            n_val += float(m[keys.N_VAL])  # type: ignore[arg-type]
        for cls in METRIC_CLASSES:
            inter_key, union_key = keys.val_overlap_keys(cls)
            inter[cls] = inter.get(cls, 0.0) + float(m.get(inter_key, 0.0))  # type: ignore[arg-type]
            union[cls] = union.get(cls, 0.0) + float(m.get(union_key, 0.0))  # type: ignore[arg-type]
    loss = loss_sum / n_val if n_val > 0 else None
    iou = {c: (inter[c] / union[c] if union.get(c) else None) for c in inter}
    return loss, iou


@dataclass
class TrainingOutcome:
    state_dict: dict[str, torch.Tensor]
    model_path: Path
    history: list[RoundRecord]
    stopped_early: bool


def run_training(
    grid: Grid,
    study: StudyConfig,
    run_dir: Path,
    sites: dict[int, str],
    *,
    on_round: Callable[[RoundRecord], None] | None = None,
) -> TrainingOutcome:
    """Train the study's model (``study.model``) for ``study.num_rounds`` rounds (or until early
    stopping) on the allowed sites; each round is recorded as a :class:`RoundRecord`."""
    spec = study.model
    train_nodes = [n for n, name in sites.items() if name not in study.study.exclude_from_training]
    if len(train_nodes) < study.study.min_sites:
        raise SarcofedError(
            f"only {len(train_nodes)} site(s) may train ({sorted(sites[n] for n in train_nodes)}) but "
            f"study.min-sites = {study.study.min_sites}; lower it or exclude fewer sites"
        )
    model_path = run_dir / MODEL_FILE_NAME
    if study.study.resume and (run_dir / "checkpoint.pt").exists():
        state = load_checkpoint(run_dir)
        # Flower's logger: the line reaches `flwr log RUN_ID`, so the coordinator sees what resumed
        flwr_log(
            logging.INFO,
            "resuming %s after round %d from weights %s",
            run_dir,
            state.completed_round,
            weights_hash(state.state_dict),
        )
        _record_missing_rounds(run_dir / "rounds.jsonl", state.history)
    else:
        torch.manual_seed(study.train.seed)
        state = TrainingState(
            completed_round=0,
            state_dict=build_model(spec).state_dict(),
            stopping=EarlyStopping(patience=study.train.patience),
        )
    strategy = make_strategy(study, len(train_nodes))
    _, layout = pack_state(state.state_dict)
    arrays = _to_arrays(state.state_dict)
    start_hash = weights_hash(state.state_dict)  # the weights each round sends (traceable)
    rounds_file = run_dir / "rounds.jsonl"

    for server_round in range(state.completed_round + 1, study.study.num_rounds + 1):
        if state.stopped_early:
            break
        started = time.monotonic()
        config: dict[str, Any] = {
            keys.TASK: "train",
            keys.MODEL_SPEC: spec.model_dump_json(),
            keys.MODEL_LAYOUT: layout,
            **study.to_flat("train"),
        }
        from flwr.app import ConfigRecord

        messages = list(
            strategy.configure_train(
                server_round,
                arrays,
                ConfigRecord(config),
                _NodeSubset(grid, train_nodes),  # type: ignore[arg-type]
            )
        )
        sent = [m.metadata.dst_node_id for m in messages]
        total: WeightedSum | ClippedMean = (
            ClippedMean(_numpy(arrays), study.dp.clipping_norm)
            if study.dp.enabled
            else WeightedSum.like(_numpy(arrays))
        )
        replies, _ = receive_and_sum(grid, messages, study.study.round_timeout, arrays, total=total)
        del messages  # the round's instructions share the global weights: nothing per site
        # who was asked, who answered and what they sent: the part every round record has
        exchange: dict[str, Any] = {
            "round": server_round,
            "start_weights_hash": start_hash,
            "sites_sent": sorted(sites[n] for n in sent),
            "sites_replied": sorted(sites[n] for n in replies.ok),
            "sites_failed": {
                sites[n]: reason for n, reason in replies.problems(study.study.round_timeout).items()
            },
            "per_site": {
                sites[n]: {k: float(v) for k, v in r.content.metric_records[keys.METRICS].items()}  # type: ignore[arg-type]
                for n, r in replies.ok.items()
            },
            "compute": {
                sites[n]: label for n, r in replies.ok.items() if (label := compute_label(r)) is not None
            },
        }
        if len(replies.ok) < study.study.min_sites:
            record = RoundRecord(**exchange, status="failed", seconds=time.monotonic() - started)
            state.history.append(record)
            save_checkpoint(run_dir, state)  # first: a round in rounds.jsonl is always in the checkpoint
            _append(rounds_file, record)
            raise SarcofedError(
                f"round {server_round}: only {len(replies.ok)} site(s) replied, study.min-sites = "
                f"{study.study.min_sites}; failures: {record.sites_failed}"
            )
        loss, iou = pooled_validation(replies)
        new_arrays = _mean_arrays(total, study.dp.noise_multiplier)
        if new_arrays is None:
            raise SarcofedError(
                f"round {server_round}: no site's weights could be averaged (every reply was refused, "
                f"or all weighed 0); rounds.jsonl lists each site's reason under sites_failed"
            )
        arrays = new_arrays
        state.state_dict = unpack_state(arrays[keys.PACKED].numpy(), layout)
        if study.dp.enabled and non_negative_variances(state.state_dict):
            arrays = _to_arrays(state.state_dict)  # what the next round sends is what is kept
        improved = state.stopping.update(server_round, loss)
        start_hash = weights_hash(state.state_dict)  # what this round made is what the next one sends
        record = RoundRecord(
            **exchange,
            status="ok",
            pooled_val_loss=loss,
            pooled_val_iou=iou,
            weights_hash=start_hash,
            improved=improved,
            seconds=time.monotonic() - started,
        )
        # the best round by pooled loss; while no round had one, the last round (nothing to judge by)
        if improved or not model_path.exists() or state.stopping.best_round == 0:
            save_model(
                model_path,
                state.state_dict,
                spec,
                meta={
                    "round": server_round,
                    "study": study.study.name,
                    "pooled_val_loss": -1.0 if loss is None else loss,
                },
            )
        state.completed_round = server_round
        state.stopped_early = state.stopping.should_stop
        state.history.append(record)
        save_checkpoint(run_dir, state)  # first: a round in rounds.jsonl is always in the checkpoint
        _append(rounds_file, record)
        if on_round is not None:
            on_round(record)
        if state.stopped_early:
            log.info("early stopping after round %d (best round %d)", server_round, state.stopping.best_round)
    return TrainingOutcome(state.state_dict, model_path, state.history, state.stopped_early)


def training_notes(outcome: TrainingOutcome) -> list[str]:
    """The report's notes on how the model was chosen: early stopping, rounds without a loss."""
    done = [r for r in outcome.history if r.status == "ok"]
    unjudged = [r.round for r in done if r.pooled_val_loss is None]
    notes = []
    if done and len(unjudged) == len(done):
        notes.append("no site released a validation loss: model = last round, no early stopping")
    elif unjudged:
        rounds = ", ".join(str(n) for n in unjudged)
        notes.append(
            f"round{'s' if len(unjudged) > 1 else ''} {rounds}: no site released a validation loss, so "
            "these rounds neither counted towards early stopping nor could be the chosen model"
        )
    if outcome.stopped_early:
        notes.append("training stopped early on the pooled validation loss")
    return notes


def exclusion_note(excluded: Iterable[str], answered: Iterable[str]) -> str | None:
    """The report's note on ``study.exclude-from-training``: the sites it kept from training, and
    the names in it that no site answered to (a misspelt name would otherwise let a site with
    another convention train unnoticed). ``None`` when nothing is excluded."""
    names, present = list(dict.fromkeys(excluded)), set(answered)
    if not names:
        return None
    kept = [n for n in names if n in present]
    absent = [n for n in names if n not in present]
    parts = [
        f"excluded from training (validated only): {', '.join(kept) or 'none of the sites that answered'}"
    ]
    if absent:
        parts.append(
            f"named in study.exclude-from-training but no site of that name answered: {', '.join(absent)} "
            "(a misspelt name excludes nobody: site names are site.toml's `name`)"
        )
    return "; ".join(parts)


def receive_and_sum(
    grid: Grid,
    messages: list[Message],
    timeout: float,
    global_arrays: ArrayRecord,
    *,
    total: WeightedSum | ClippedMean | None = None,
) -> tuple[Replies, WeightedSum | ClippedMean]:
    """Pull the round's training replies one at a time, adding each site's weights (weighted by
    its ``num-examples``) to a running sum and removing them from the reply at once.

    ``total``: the sum to add to (default FedAvg's :class:`WeightedSum` over ``global_arrays``;
    central DP passes a :class:`~server.central_dp.ClippedMean`). The returned :class:`Replies`
    hold every ok reply's metrics only (no weights). A reply whose weights do not fit the
    model sent (missing, other names or shapes) or without a valid weight is filed as
    failed, with the reason, and left out of the sum.
    """
    replies = Replies()
    into = WeightedSum.like(_numpy(global_arrays)) if total is None else total
    sent = [m.metadata.dst_node_id for m in messages]
    for reply in iter_replies(grid, messages, timeout, pull_chunk=TRAIN_PULL_CHUNK):
        if not reply.has_error():
            problem = _fold_weights(into, reply)
            if problem is not None:
                replies.failed[reply.metadata.src_node_id] = problem
                continue
        replies.add(reply)
    replies.close(sent)
    return replies, into


def compute_label(reply: Message) -> str | None:
    """What a training reply says it ran on (``"cpu bf16"``); None when it says nothing readable."""
    from pydantic import ValidationError

    from protocols.compute import ComputeUsed

    record = reply.content.config_records.get(keys.COMPUTE)
    if record is None:
        return None
    try:
        return ComputeUsed(
            device=record.get(keys.COMPUTE_DEVICE),  # type: ignore[arg-type]
            precision=record.get(keys.COMPUTE_PRECISION),  # type: ignore[arg-type]
        ).label()
    except ValidationError:
        log.warning(
            "a training reply's %r record is not a device and precision: %s", keys.COMPUTE, dict(record)
        )
        return None


def training_weight(metrics: Mapping[str, float]) -> float:
    """A site's FedAvg weight: its ``num-examples``, and for a convention-aware site that times
    the share of its labelled pixels that still teach (1 minus the shares its ignore-type
    adjustments set aside, ``protocols.keys.CONVENTION_IGNORES``, at least 0).

    FedAvg weighs a site by how much its loss says; a slice whose psoas or contour band is
    ignored says less. Measured (bench/README.md, issue 17, three seeds): weighed by slices, the
    sites that set the psoas or the muscle edges aside pulled the mean away from them (psoas
    recall 0.80, HU-cut muscle IoU 0.81; the reference sites alone 0.86 and 0.84); weighed by
    what teaches, 0.86 and 0.84. A share the site withheld counts as 0 (its weight is then its
    slices). KeyError without ``num-examples``."""
    weight = float(metrics[keys.NUM_EXAMPLES])
    if not metrics.get(keys.CONVENTION_AWARE):
        return weight
    return weight * keys.convention_taught_share(metrics)


def _fold_weights(total: WeightedSum | ClippedMean, reply: Message) -> str | None:
    """Add the reply's weights to ``total`` and drop them from the reply; why not, if it can't be."""
    content = reply.content
    if keys.ARRAYS not in content.array_records:
        return f"the training reply carried no weights (no '{keys.ARRAYS}' record)"
    try:
        weight = training_weight(content.metric_records[keys.METRICS])  # type: ignore[arg-type]
        total.add(_numpy(content.array_records[keys.ARRAYS]), weight)
    except KeyError:
        return f"the training reply carried no '{keys.NUM_EXAMPLES}' metric to weight its weights by"
    except (TypeError, ValueError) as err:
        return f"the training reply's weights could not be averaged: {err}"
    finally:
        del content[keys.ARRAYS]  # the sum has them: the reply keeps its metrics only
        # Flower's Array.__init__ leaves a reference cycle (a closure over its arguments, the
        # data bytes among them): the reply's buffer outlives it until the collector runs.
        # Collecting the young generations now keeps one reply's buffer alive, not many.
        gc.collect(1)
    return None


def _numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {name: array.numpy() for name, array in record.items()}


def _mean_arrays(total: WeightedSum | ClippedMean, noise_multiplier: float = 0.0) -> ArrayRecord | None:
    """The running sum's mean (central DP: noised) as the ArrayRecord the next round sends;
    None when nothing was summed."""
    try:
        if isinstance(total, ClippedMean):
            mean, stdv = total.noised_mean(noise_multiplier)
            flwr_log(
                logging.INFO,
                "central DP: %d update(s) clipped to L2 norm %g, mean noised with stdev %.6g",
                total.count,
                total.clipping_norm,
                stdv,
            )
        else:
            mean = total.mean()
    except ValueError as err:
        log.warning("no weighted mean this round: %s", err)
        return None
    return ArrayRecord({name: Array(np.ascontiguousarray(x)) for name, x in mean.items()})


def contributing_sites(history: Sequence[RoundRecord], up_to_round: int) -> set[str]:
    """The sites whose training replies went into the weights of round ``up_to_round``.

    They are the model's internal sites: the study validates them on their held-out test
    patients only. A site that trained only after that round did not shape those weights.
    """
    return {s for r in history if r.status == "ok" and r.round <= up_to_round for s in r.sites_replied}


def non_negative_variances(state_dict: dict[str, torch.Tensor]) -> int:
    """Set BatchNorm running variances below 0 to 0, in place; return how many entries were.

    Central DP noises every value a site sends, BatchNorm statistics included (they are
    computed from the site's slices, so the noise must cover them): a running variance near 0
    then often turns negative, and a negative variance makes every output of the layer NaN.
    Clamping after the noise is post-processing: the DP guarantee is unchanged."""
    clamped = 0
    for name, tensor in state_dict.items():
        if name.endswith("running_var") and tensor.is_floating_point():
            negative = tensor < 0
            clamped += int(negative.sum())
            tensor[negative] = 0.0
    return clamped


def _to_arrays(state_dict: dict[str, torch.Tensor]) -> ArrayRecord:
    packed, _ = pack_state(state_dict)
    return ArrayRecord({keys.PACKED: Array(np.ascontiguousarray(packed))})


def _record_missing_rounds(path: Path, history: list[RoundRecord]) -> None:
    """Append the checkpoint's rounds that rounds.jsonl lacks (a stop between the two writes):
    rounds.jsonl is always a prefix of the checkpoint's history, so nothing is written twice."""
    logged = len(path.read_text(encoding="utf-8").splitlines()) if path.exists() else 0
    for record in history[logged:]:
        _append(path, record)


def _append(path: Path, record: RoundRecord) -> None:
    """One line of rounds.jsonl: the record as ``RoundRecord.model_validate_json`` reads it."""
    with path.open("a", encoding="utf-8") as fh:
        fh.write(record.model_dump_json() + "\n")


__all__ = [
    "TrainingOutcome",
    "contributing_sites",
    "make_strategy",
    "pooled_validation",
    "run_training",
    "training_notes",
]
