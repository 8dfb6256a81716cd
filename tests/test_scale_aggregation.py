"""Coordinator memory flat in sites: training replies are summed as they arrive (FedAvg's mean up to
float rounding, each reply's weights dropped once added) and validation keeps parsed payloads only."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Error, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from common.model import pack_state, unpack_state
from common.weighted_sum import CHUNK_ELEMENTS, WeightedSum, weighted_mean
from protocols import keys
from protocols.study import StudyConfig
from server.central_dp import ClippedMean
from server.training import make_strategy, receive_and_sum, run_training

pytestmark = pytest.mark.usefixtures("flower_task_identity")


# --- the pure running sum -------------------------------------------------------------------


def test_running_sum_is_the_hand_checked_weighted_mean() -> None:
    mean = weighted_mean([({"w": np.zeros(3, np.float32)}, 1.0), ({"w": np.full(3, 4.0, np.float32)}, 3.0)])
    np.testing.assert_array_equal(mean["w"], [3.0, 3.0, 3.0])  # (0*1 + 4*3) / 4
    assert mean["w"].dtype == np.float32


def test_running_sum_equals_flowers_batch_fedavg_on_many_arrays() -> None:
    """Flower's aggregate_arrayrecords (float32, w/W factors) against the float64 running sum,
    30 sites, arrays longer than one chunk so the chunked add is exercised."""
    rng = np.random.default_rng(0)
    size = CHUNK_ELEMENTS + 17
    sites = [
        ({"a": rng.normal(size=size).astype(np.float32), "b": rng.normal(size=(3, 4)).astype(np.float32)}, w)
        for w in rng.integers(1, 500, size=30).astype(float)
    ]
    records = [
        RecordDict(
            {
                "arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                "metrics": MetricRecord({"n": w}),
            }
        )
        for arrays, w in sites
    ]
    batch = aggregate_arrayrecords(records, "n")
    streamed = weighted_mean(sites)
    for name in ("a", "b"):
        np.testing.assert_allclose(streamed[name], batch[name].numpy(), rtol=1e-5, atol=1e-6)
        exact = sum(w * x[name].astype(np.float64) for x, w in sites) / sum(w for _, w in sites)
        # float64 accumulation: the only error is the final cast to float32
        np.testing.assert_array_equal(streamed[name], exact.astype(np.float32))


def test_a_reply_that_does_not_fit_is_refused_and_leaves_the_sum_unchanged() -> None:
    total = WeightedSum.like({"a": np.zeros(2, np.float32), "b": np.zeros(3, np.float32)})
    total.add({"a": np.ones(2, np.float32), "b": np.ones(3, np.float32)}, 2.0)
    with pytest.raises(ValueError, match=r"array 'b' has shape \(4,\), expected \(3,\)"):
        total.add({"a": np.full(2, 9.0, np.float32), "b": np.zeros(4, np.float32)}, 1.0)
    with pytest.raises(ValueError, match="differ from the expected"):
        total.add({"a": np.zeros(2, np.float32)}, 1.0)
    with pytest.raises(ValueError, match="finite number >= 0"):
        total.add({"a": np.zeros(2, np.float32), "b": np.zeros(3, np.float32)}, float("nan"))
    assert (total.count, total.total_weight) == (1, 2.0)
    np.testing.assert_array_equal(total.mean()["a"], [1.0, 1.0])  # the 9s never counted


def test_no_reply_or_no_weight_has_no_mean() -> None:
    with pytest.raises(ValueError, match="no reply"):
        WeightedSum().mean()
    total = WeightedSum()
    total.add({"a": np.ones(1, np.float32)}, 0.0)
    with pytest.raises(ValueError, match="sum to 0"):
        total.mean()


# --- the Flower glue: real reply messages through a Grid -----------------------------------------


class TrainingSites:
    """A Grid whose site ``n`` answers a train message with the weights + n, weighted by
    ``weights[n]``; sites in ``broken`` send weights of the wrong length, ``failing`` an error.
    Every reply handed out is remembered, and each pull's size is logged."""

    def __init__(
        self,
        weights: dict[int, float],
        broken: tuple[int, ...] = (),
        failing: tuple[int, ...] = (),
        metrics: dict[int, dict[str, float]] | None = None,
    ) -> None:
        self.weights, self.broken, self.failing = weights, broken, failing
        self.metrics = metrics or {}
        self.waiting: dict[str, Message] = {}
        self.handed_out: list[Message] = []
        self.pull_sizes: list[int] = []

    def get_node_ids(self) -> list[int]:
        return sorted(self.weights)

    def push_messages(self, messages: list[Message]) -> list[str]:
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = msg.object_id  # what a real Grid does on push
            node = msg.metadata.dst_node_id
            if node in self.failing:
                self.waiting[msg.metadata.message_id] = Message(
                    Error(code=keys.ERROR_FAILED, reason="site crashed"), reply_to=msg
                )
                continue
            packed = msg.content.array_records[keys.ARRAYS][keys.PACKED].numpy() + float(node)
            if node in self.broken:
                packed = packed[:-1]
            content = RecordDict(
                {
                    keys.ARRAYS: ArrayRecord({keys.PACKED: Array(packed.astype(np.float32))}),
                    keys.METRICS: MetricRecord(
                        {
                            keys.NUM_EXAMPLES: self.weights[node],
                            keys.SECONDS: 1.0,
                            **self.metrics.get(node, {}),
                        }
                    ),
                }
            )
            self.waiting[msg.metadata.message_id] = Message(content, reply_to=msg)
        return [m.metadata.message_id for m in messages]

    def pull_messages(self, ids: list[str]) -> list[Message]:
        self.pull_sizes.append(len(ids))
        got = [self.waiting.pop(i) for i in list(ids) if i in self.waiting]
        self.handed_out.extend(got)
        return got


def _train_messages(study: StudyConfig, grid: TrainingSites, start: np.ndarray) -> list[Message]:
    from flwr.app import ConfigRecord

    from server.training import _NodeSubset

    strategy = make_strategy(study, len(grid.weights))
    arrays = ArrayRecord({keys.PACKED: Array(start)})
    nodes = _NodeSubset(grid, sorted(grid.weights))  # type: ignore[arg-type]
    return list(strategy.configure_train(1, arrays, ConfigRecord({}), nodes))  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["fedavg", "fedprox"])
def test_streamed_round_equals_the_strategys_batch_fedavg_on_real_replies(name: str) -> None:
    study = StudyConfig.from_run_config({"strategy.name": name})
    start = np.random.default_rng(1).normal(size=1000).astype(np.float32)
    weights = {1: 6.0, 2: 2.0, 3: 5.0}

    batch_grid = TrainingSites(weights)
    batch_grid.push_messages(_train_messages(study, batch_grid, start))
    replies = batch_grid.pull_messages(list(batch_grid.waiting))
    for r in replies:  # the old path hands the strategy the weighting key only
        r.content.metric_records[keys.METRICS] = MetricRecord(
            {keys.NUM_EXAMPLES: weights[r.metadata.src_node_id]}
        )
    expected, _ = make_strategy(study, 3).aggregate_train(1, replies)
    assert expected is not None

    grid = TrainingSites(weights)
    got, total = receive_and_sum(
        grid, _train_messages(study, grid, start), 10.0, ArrayRecord({keys.PACKED: Array(start)})
    )  # type: ignore[arg-type]
    mean = total.mean()[keys.PACKED]
    # equal up to float rounding (Flower sums in float32; the replies are float32 start + n)
    np.testing.assert_allclose(mean, expected[keys.PACKED].numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(mean, start + (1 * 6 + 2 * 2 + 3 * 5) / 13, rtol=1e-5, atol=1e-6)
    assert sorted(got.ok) == [1, 2, 3] and total.count == 3
    # each reply's weights were dropped once added; its metrics stay for the round record
    assert all(keys.ARRAYS not in r.content.array_records for r in grid.handed_out)
    assert all(keys.NUM_EXAMPLES in got.ok[n].content.metric_records[keys.METRICS] for n in got.ok)
    # at most one site's weights were pulled at a time
    assert max(grid.pull_sizes) == 1


def test_failed_silent_and_misfitting_sites_are_accounted_and_left_out_of_the_mean() -> None:
    study = StudyConfig()
    start = np.zeros(10, np.float32)
    grid = TrainingSites({1: 1.0, 2: 1.0, 3: 1.0, 4: 1.0}, broken=(2,), failing=(3,))
    messages = _train_messages(study, grid, start)
    silent = next(m for m in messages if m.metadata.dst_node_id == 4)
    replies, total = receive_and_sum(
        _Silencing(grid, silent),
        messages,
        0.0,
        ArrayRecord({keys.PACKED: Array(start)}),  # type: ignore[arg-type]
    )
    assert sorted(replies.ok) == [1]
    assert replies.failed[3] == "site crashed"
    assert "shape (9,), expected (10,)" in replies.failed[2]
    assert replies.timed_out == [4]
    np.testing.assert_array_equal(total.mean()[keys.PACKED], np.full(10, 1.0))  # site 1 only


class _Silencing:
    """Wraps a Grid so that one message never gets its reply."""

    def __init__(self, grid: TrainingSites, silent: Message) -> None:
        self.grid, self.silent = grid, silent

    def push_messages(self, messages: list[Message]) -> list[str]:
        ids = self.grid.push_messages(messages)
        self.grid.waiting.pop(self.silent.metadata.message_id)
        return ids

    def pull_messages(self, ids: list[str]) -> list[Message]:
        return self.grid.pull_messages(ids)


def _tiny_study(**extra: object) -> StudyConfig:
    return StudyConfig.from_run_config(
        {
            "model.encoder": "resnet18",
            "model.image-size": 64,
            "study.min-sites": 2,
            "study.num-rounds": 1,
            **extra,
        }
    )


def test_a_training_round_streams_to_the_fedavg_of_the_sites_weights(tmp_path: Path) -> None:
    import torch

    from common.model import build_model

    study = _tiny_study()
    torch.manual_seed(study.train.seed)
    start, layout = pack_state(build_model(study.model).state_dict())
    grid = TrainingSites({1: 6.0, 2: 2.0})
    outcome = run_training(grid, study, tmp_path, {1: "a", 2: "b"})  # type: ignore[arg-type]
    got, _ = pack_state(outcome.state_dict)
    np.testing.assert_allclose(got, start + (1 * 6 + 2 * 2) / 8, rtol=1e-6, atol=1e-6)
    (record,) = outcome.history
    assert record.status == "ok" and record.sites_replied == ["a", "b"]
    assert record.per_site["a"][keys.NUM_EXAMPLES] == 6.0
    assert unpack_state(got, layout).keys() == outcome.state_dict.keys()


def test_central_dp_clips_each_update_in_a_training_round(tmp_path: Path) -> None:
    """dp.enabled: with no noise, each site's update (+1 or +2 on every weight, norm sqrt(n) or
    2 sqrt(n)) is clipped to 1 before the mean."""
    import torch

    from common.model import build_model

    study = _tiny_study(**{"dp.enabled": True, "dp.noise-multiplier": 0.0, "dp.clipping-norm": 1.0})
    torch.manual_seed(study.train.seed)
    start, _ = pack_state(build_model(study.model).state_dict())
    outcome = run_training(TrainingSites({1: 1.0, 2: 1.0}), study, tmp_path, {1: "a", 2: "b"})  # type: ignore[arg-type]
    got, _ = pack_state(outcome.state_dict)
    step = float(np.linalg.norm((got - start).astype(np.float64)))
    assert step == pytest.approx(1.0, rel=1e-4)  # both clipped to norm 1, same direction: mean norm 1


def _dp_round(
    weights: dict[int, float], start: np.ndarray, noise: float, clip: float, silent: int | None = None
) -> tuple[np.ndarray, ClippedMean, list[Message]]:
    study = StudyConfig.from_run_config({"dp.enabled": True})
    grid = TrainingSites(weights)
    messages = _train_messages(study, grid, start)
    source: Any = grid
    if silent is not None:
        source = _Silencing(grid, next(m for m in messages if m.metadata.dst_node_id == silent))
    total = ClippedMean({keys.PACKED: start}, clip)
    receive_and_sum(
        source, messages, 0.0 if silent else 10.0, ArrayRecord({keys.PACKED: Array(start)}), total=total
    )
    mean, _ = total.noised_mean(noise)
    return mean[keys.PACKED], total, grid.handed_out


def test_central_dp_is_flowers_wrapper_draw_for_draw_when_every_site_replies_with_equal_weights() -> None:
    from flwr.app import ConfigRecord
    from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg

    from server.training import _NodeSubset

    start = np.random.default_rng(3).normal(size=500).astype(np.float32)
    weights = {1: 4.0, 2: 4.0, 3: 4.0}
    grid = TrainingSites(weights)
    base = FedAvg(
        weighted_by_key=keys.NUM_EXAMPLES, arrayrecord_key=keys.ARRAYS, configrecord_key=keys.CONFIG
    )
    wrapper = DifferentialPrivacyServerSideFixedClipping(base, 0.8, 2.0, 3)
    nodes = _NodeSubset(grid, sorted(weights))  # type: ignore[arg-type]
    sent = list(wrapper.configure_train(1, ArrayRecord({keys.PACKED: Array(start)}), ConfigRecord({}), nodes))  # type: ignore[arg-type]
    grid.push_messages(sent)
    replies = grid.pull_messages(list(grid.waiting))
    for r in replies:
        r.content.metric_records[keys.METRICS] = MetricRecord({keys.NUM_EXAMPLES: 4.0})
    np.random.seed(11)
    theirs, _ = wrapper.aggregate_train(1, replies)
    assert theirs is not None
    np.random.seed(11)
    ours, total, handed_out = _dp_round(weights, start, noise=0.8, clip=2.0)
    np.testing.assert_allclose(ours, theirs[keys.PACKED].numpy(), rtol=1e-5, atol=1e-5)
    assert total.count == 3
    assert all(keys.ARRAYS not in r.content.array_records for r in handed_out)  # streamed: dropped once added


def test_central_dp_weighs_every_site_the_same_whatever_its_training_slices() -> None:
    """Under FedAvg's weights a site with 99 of 100 slices would move the mean by ~0.99 x the
    clipping norm, while the noise is sized for clipping norm / n: each site weighs 1/n."""
    start = np.zeros(4, np.float32)
    total = ClippedMean({keys.PACKED: start}, 1.0)
    total.add({keys.PACKED: np.array([3.0, 0, 0, 0], np.float32)}, 1.0)  # clipped to (1, 0, 0, 0)
    total.add({keys.PACKED: np.array([0, 0.5, 0, 0], np.float32)}, 99.0)  # within the norm: kept
    mean, stdv = total.noised_mean(0.0)
    np.testing.assert_allclose(mean[keys.PACKED], [0.5, 0.25, 0.0, 0.0], rtol=1e-6)  # not (0.01, 0.495, ..)
    assert stdv == 0.0 and total.count == 2
    with pytest.raises(ValueError, match=r"shape \(3,\), expected \(4,\)"):
        total.add({keys.PACKED: np.zeros(3, np.float32)}, 1.0)
    assert total.count == 2


def test_central_dp_noise_is_sized_by_the_replies_averaged() -> None:
    """Three sites asked, one silent: the mean of two moves by clip / 2 per site, so the noise's
    standard deviation is noise_multiplier x clip / 2 (Flower's wrapper divides by the 3 asked)."""
    start = np.zeros(200_000, np.float32)
    np.random.seed(5)
    got, total, _ = _dp_round({1: 1.0, 2: 1.0, 3: 1.0}, start, noise=1.0, clip=1.0, silent=3)
    assert total.count == 2
    clipped = (1.0 + 2.0) / np.linalg.norm(np.ones(200_000)) / 2  # the mean of the two clipped updates
    noise = got.astype(np.float64) - clipped
    assert float(np.std(noise)) == pytest.approx(1.0 / 2, rel=0.01)
    assert abs(float(np.mean(noise))) < 0.01


# --- validation keeps parsed payloads only ------------------------------------------------------


def test_validation_keeps_the_parsed_payloads_not_the_messages() -> None:
    from flwr.app import ConfigRecord

    from server.validation import run_validation
    from tests.report_builders import hospital_a

    text = hospital_a().model_dump_json(by_alias=True)
    handed_out: list[weakref.ref[Message]] = []

    class Sites:
        def __init__(self) -> None:
            self.waiting: dict[str, Message] = {}

        def push_messages(self, messages: list[Message]) -> list[str]:
            for msg in messages:
                msg.metadata.__dict__["_message_id"] = msg.object_id
                content = RecordDict({keys.PAYLOAD: ConfigRecord({keys.PAYLOAD_JSON: text})})
                self.waiting[msg.metadata.message_id] = Message(content, reply_to=msg)
            return [m.metadata.message_id for m in messages]

        def pull_messages(self, ids: list[str]) -> list[Message]:
            got = [self.waiting.pop(i) for i in list(ids) if i in self.waiting]
            handed_out.extend(weakref.ref(m) for m in got)
            return got

    sites = {n: f"site-{n:02d}" for n in range(1, 13)}
    results = run_validation(Sites(), StudyConfig(), sites, task="compare")  # type: ignore[arg-type]
    assert [r.status for r in results] == ["ok"] * 12
    assert all(r.payload == hospital_a() for r in results)
    gc.collect()
    assert len(handed_out) == 12 and all(ref() is None for ref in handed_out)  # no Message kept


# --- memory: flat in sites ----------------------------------------------------------------------


def test_the_streamed_rounds_peak_memory_does_not_grow_with_sites() -> None:
    """bench/bench_coordinator_memory.py's round at tiny size: the collect-then-average path holds
    every reply (its peak grows by about a reply per site), the streamed one about one reply."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from bench_coordinator_memory import run_round

    params = 100_000
    reply = params * 4  # bytes of one site's float32 weights
    stream = {n: run_round("stream", n, params)[0] for n in (3, 30)}
    collect = {n: run_round("collect", n, params)[0] for n in (3, 30)}
    assert stream[30] - stream[3] < reply, stream  # not even one more reply held at 30 sites
    assert collect[30] - collect[3] > 20 * reply, collect  # the old path: ~ one reply per site


def test_replies_are_handed_over_as_they_arrive_not_at_the_end_of_the_round() -> None:
    from test_messaging import FakeClock, FakeGrid

    from server.messaging import iter_replies

    clock = FakeClock()
    grid = FakeGrid(clock, {1: 0.0, 2: 5.0, 3: 5.0})
    seen = []
    for reply in iter_replies(grid, [1, 2, 3], timeout=60.0, pull_chunk=2, clock=clock, sleep=clock.sleep):
        seen.append((reply.metadata.src_node_id, clock.now))
    assert seen[0] == (1, 0.0)  # site 1's reply is handed over while sites 2 and 3 still work
    assert sorted(n for n, _ in seen) == [1, 2, 3] and all(t >= 5.0 for _, t in seen[1:])


def test_central_dp_refuses_non_finite_weights_and_takes_an_unchanged_model() -> None:
    """A NaN makes the update's norm NaN, and min(1, clip / NaN) is 1: unrefused, the update
    would pass unclipped (and make the model NaN). No update at all has norm 0, which Flower's
    clip divides by: it must count as a zero update, not crash the round."""
    start = np.zeros(4, np.float32)
    total = ClippedMean({keys.PACKED: start}, 1.0)
    with pytest.raises(ValueError, match="non-finite"):
        total.add({keys.PACKED: np.array([1000.0, 1000.0, 1000.0, np.nan], np.float32)}, 1.0)
    assert total.count == 0
    total.add({keys.PACKED: start.copy()}, 1.0)  # trained nothing: its weights are the global ones
    total.add({keys.PACKED: np.array([0.0, 0.0, 0.0, 4.0], np.float32)}, 1.0)  # clipped to (0, 0, 0, 1)
    mean, _ = total.noised_mean(0.0)
    np.testing.assert_allclose(mean[keys.PACKED], [0.0, 0.0, 0.0, 0.5])
    with pytest.raises(ValueError, match="non-finite"):  # FedAvg's sum refuses it too
        WeightedSum.like({"w": start}).add({"w": np.array([np.inf, 0, 0, 0], np.float32)}, 1.0)


def test_a_site_sending_back_the_global_weights_is_averaged_under_central_dp() -> None:
    start = np.zeros(10, np.float32)
    got, total, _ = _dp_round({0: 1.0, 1: 1.0}, start, noise=0.0, clip=1.0)  # node 0 sends start + 0
    assert total.count == 2
    np.testing.assert_allclose(got, np.full(10, 1.0 / np.sqrt(10) / 2), rtol=1e-6)


def test_the_report_says_when_central_dp_added_no_noise() -> None:
    from server.central_dp import central_dp_note

    assert "no differential-privacy guarantee" in central_dp_note(0.0, 1.0, 5)
    strong = central_dp_note(8.0, 1.0, 1)
    assert "guarantee" not in strong and "noise multiplier 8.0" in strong and "weak" not in strong


def test_central_dp_noise_never_leaves_a_negative_batchnorm_variance(tmp_path: Path) -> None:
    """Noise on running variances near 0 makes some negative, and a negative variance makes the
    layer's every output NaN: the kept weights clamp them at 0 (post-processing, DP unchanged)."""
    import torch

    from server.training import non_negative_variances

    study = _tiny_study(**{"dp.enabled": True, "dp.noise-multiplier": 4.0, "dp.clipping-norm": 1.0})
    outcome = run_training(TrainingSites({1: 1.0, 2: 1.0}), study, tmp_path, {1: "a", 2: "b"})  # type: ignore[arg-type]
    variances = [t for n, t in outcome.state_dict.items() if n.endswith("running_var")]
    assert variances and all(bool((t >= 0).all()) for t in variances)  # noise sd 2: many went below 0

    layer = torch.nn.BatchNorm2d(2).eval()
    layer.running_var.copy_(torch.tensor([-0.3, 0.5]))
    with torch.inference_mode():
        assert bool(torch.isnan(layer(torch.ones(1, 2, 2, 2))).any())
    assert non_negative_variances({"bn.running_var": layer.running_var, "bn.weight": layer.weight}) == 1
    with torch.inference_mode():
        assert bool(torch.isfinite(layer(torch.ones(1, 2, 2, 2))).all())


def test_a_convention_aware_site_weighs_by_the_share_of_its_labels_that_teach() -> None:
    """FedAvg weighs a site by how much its loss says: a site that ignores 40% of its labelled
    pixels (psoas region, contour band) weighs 60% of its slices; a relabelling adjustment
    (hu_range) takes nothing away, nor does a plain site's reply."""
    from server.training import training_weight

    psoas_share, _ = keys.convention_keys("psoas")
    band_share, _ = keys.convention_keys("boundary")
    relabel_share, _ = keys.convention_keys("hu_range")
    regrown_share, _ = keys.convention_keys("contour")
    aware = {keys.NUM_EXAMPLES: 10.0, keys.CONVENTION_AWARE: 1.0}
    assert training_weight(aware) == 10.0  # nothing adjusted
    assert training_weight({**aware, psoas_share: 0.25, band_share: 0.15}) == pytest.approx(6.0)
    assert training_weight({**aware, relabel_share: 0.3}) == 10.0
    # regrown muscle (a tight contour's) teaches: only the ignored ring counts
    assert training_weight({**aware, regrown_share: 0.3, band_share: 0.1}) == pytest.approx(9.0)
    assert training_weight({**aware, band_share: 1.4}) == 0.0  # never negative
    assert training_weight({keys.NUM_EXAMPLES: 10.0, psoas_share: 0.5}) == 10.0  # not convention-aware

    start = np.zeros(10, np.float32)
    study = StudyConfig()
    metrics = {1: {keys.CONVENTION_AWARE: 1.0}, 2: {keys.CONVENTION_AWARE: 1.0, psoas_share: 0.5}}
    grid = TrainingSites({1: 4.0, 2: 4.0}, metrics=metrics)
    _, total = receive_and_sum(
        grid, _train_messages(study, grid, start), 10.0, ArrayRecord({keys.PACKED: Array(start)})
    )  # type: ignore[arg-type]
    # site 1 sends +1 weighing 4, site 2 sends +2 weighing 4 x 0.5 = 2: (4 + 4) / 6
    np.testing.assert_allclose(total.mean()[keys.PACKED], np.full(10, 8.0 / 6.0), rtol=1e-6)
