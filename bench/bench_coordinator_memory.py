"""Coordinator peak memory of one training round's aggregation at 3, 10 and 30 sites.

Two paths, each on the same synthetic replies (one packed float32 array of ``--params``
weights per site, the demo model's size by default, each weighted by its training slices):

- ``collect``: the path before streaming: ``send_and_receive`` collects every site's reply,
  then Flower's FedAvg ``aggregate_train`` averages them (what ``dp.enabled`` still does);
- ``stream``: ``server.training.receive_and_sum``: each reply is pulled alone, added to the
  float64 running sum and its weights dropped, then the mean.

The sites' replies are made when the coordinator pulls them (as a reply is deserialised off
the network), all ready at the first pull (the round waited for its slowest site). Peak is
Python's tracemalloc peak (numpy's buffers included) above what was allocated before the
round (the global weights); the ratio 30-site / 3-site is the number to read (goal: flat,
<= 1.2x for ``stream``).

    python bench/bench_coordinator_memory.py                   # the demo model's size
    python bench/bench_coordinator_memory.py --params 100000   # a quick smoke run
"""

from __future__ import annotations

import argparse
import gc
import logging
import sys
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import print_table

SITE_COUNTS = (3, 10, 30)
MIB = 1 << 20


def demo_model_params() -> int:
    """Weights the demo study's model sends (pyproject's model section: resnet18 U-Net, 192 px)."""
    from common.model import build_model, pack_state
    from protocols.study import StudyConfig
    from server.demo_study import app_dir, simulation_study

    study: StudyConfig = simulation_study(app_dir(), {})
    packed, _ = pack_state(build_model(study.model).state_dict())
    return int(packed.size)


class LazySites:
    """A Grid whose site ``n`` answers with the global weights + n (float32) and ``n`` training
    slices; a reply is built only when it is pulled, and the Grid keeps no reference to it."""

    def __init__(self, n_sites: int) -> None:
        self.n_sites = n_sites
        self.pushed: dict[str, object] = {}

    def get_node_ids(self) -> list[int]:
        return list(range(1, self.n_sites + 1))

    def push_messages(self, messages):  # type: ignore[no-untyped-def]
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = msg.object_id  # what a real Grid does on push
            self.pushed[msg.metadata.message_id] = msg
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, ids):  # type: ignore[no-untyped-def]
        from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

        from protocols import keys

        out = []
        for msg_id in list(ids):
            msg = self.pushed.pop(msg_id, None)
            if msg is None:
                continue
            node = msg.metadata.dst_node_id  # type: ignore[attr-defined]
            sent = msg.content.array_records[keys.ARRAYS][keys.PACKED].numpy()  # type: ignore[attr-defined]
            content = RecordDict(
                {
                    keys.ARRAYS: ArrayRecord({keys.PACKED: Array(sent + np.float32(node))}),
                    keys.METRICS: MetricRecord({keys.NUM_EXAMPLES: float(node)}),
                }
            )
            del sent
            out.append(Message(content, reply_to=msg))  # type: ignore[arg-type]
        return out


def run_round(path: str, n_sites: int, params: int) -> tuple[float, np.ndarray]:
    """Peak bytes above the start of the round, and the aggregated weights."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord

    from protocols import keys
    from protocols.study import StudyConfig
    from server.messaging import send_and_receive, sort_replies
    from server.training import _mean_arrays, make_strategy, receive_and_sum

    study = StudyConfig()
    strategy = make_strategy(study, n_sites)
    start = ArrayRecord({keys.PACKED: Array(np.linspace(-1, 1, params, dtype=np.float32))})
    grid = LazySites(n_sites)
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    messages = list(strategy.configure_train(1, start, ConfigRecord({}), grid))  # type: ignore[arg-type]
    sent = [m.metadata.dst_node_id for m in messages]
    if path == "collect":
        replies = sort_replies(sent, send_and_receive(grid, messages, 60.0))  # type: ignore[arg-type]
        del messages
        for reply in replies.ok.values():  # the strategy needs the weighting key only
            weight = reply.content.metric_records[keys.METRICS][keys.NUM_EXAMPLES]
            reply.content.metric_records[keys.METRICS] = MetricRecord({keys.NUM_EXAMPLES: weight})
        arrays, _ = strategy.aggregate_train(1, list(replies.ok.values()))
    else:
        replies, total = receive_and_sum(grid, messages, 60.0, start)  # type: ignore[arg-type]
        del messages
        arrays = _mean_arrays(total)
        del total
    assert arrays is not None and sorted(replies.ok) == sorted(sent)
    mean = arrays[keys.PACKED].numpy()
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    return peak, mean


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=int, default=0, help="weights per reply (0: the demo model's)")
    args = parser.parse_args()
    from flwr.supercore.task_identity import TaskIdentity

    logging.getLogger("flwr").setLevel(logging.WARNING)

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1  # Messages outside Flower
    params = args.params or demo_model_params()
    print(f"{params} weights per reply ({params * 4 / MIB:.1f} MiB float32)")
    peaks: dict[str, dict[int, float]] = {"collect": {}, "stream": {}}
    rows = []
    for n in SITE_COUNTS:
        means = {}
        for path in peaks:
            peaks[path][n], means[path] = run_round(path, n, params)
        gap = float(np.max(np.abs(means["collect"] - means["stream"])))
        rows.append(
            [str(n), f"{peaks['collect'][n] / MIB:.1f}", f"{peaks['stream'][n] / MIB:.1f}", f"{gap:.2e}"]
        )
    print_table(["sites", "collect MiB", "stream MiB", "max |collect - stream|"], rows)
    lo, hi = SITE_COUNTS[0], SITE_COUNTS[-1]
    for path, by_n in peaks.items():
        print(f"{path}: peak {hi} sites / {lo} sites = {by_n[hi] / by_n[lo]:.2f}x")
    print(f"stream / collect at {hi} sites = {peaks['stream'][hi] / peaks['collect'][hi]:.2f}x")


if __name__ == "__main__":
    main()
