"""The site's Flower ClientApp: thin glue between Messages and ``client.site_tasks``.

Each message: read the study config, find the site folder, open the site guard
(``client.guard``: the site's own release policy, app allow-list and audit log), parse the
site folder once (``common.dataset.load_site``) and hand that ``SiteDataset`` to the task
and to the guard, which screens every reply for its file names. Only weights and
aggregates leave; anything else is refused with an error reply the coordinator sees.
"""

from __future__ import annotations

import json
import logging
import traceback
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client import site_tasks
from client.guard import AUDIT_UNAVAILABLE, SiteGuard, SiteRefusal, open_guard
from client.redact import machine_paths
from common.cpu_threads import use_assigned_cpus
from common.dataset import SiteDataset, load_site
from common.errors import SarcofedError
from protocols import keys
from protocols.study import StudyConfig

if TYPE_CHECKING:
    from common.model import ModelSpec

log = logging.getLogger(__name__)

app = ClientApp()

REFUSED = keys.ERROR_REFUSED
FAILED = keys.ERROR_FAILED


def _study(context: Context, config: ConfigRecord) -> StudyConfig:
    """Study-wide settings: the run config, overridden by what the server sent."""
    valid = set(StudyConfig.valid_keys())
    flat: dict[str, Any] = {k: v for k, v in context.run_config.items() if k in valid}
    flat.update({k: v for k, v in config.items() if k in valid})
    try:
        return StudyConfig.from_run_config(flat)
    except ValueError as err:  # the coordinator's own settings: safe to send back as they are
        raise SarcofedError(f"this site cannot read the study's config: {err}") from err


def _error(msg: Message, code: int, reason: str) -> Message:
    return Message(Error(code=code, reason=reason), reply_to=msg)


def _handle(msg: Message, context: Context, task_default: str) -> Message:
    config = msg.content.config_records.get(keys.CONFIG, ConfigRecord())
    task = str(config.get(keys.TASK, task_default))
    guard: SiteGuard | None = None
    use_assigned_cpus()
    try:
        study = _study(context, config)
        site_dir = site_tasks.resolve_site_dir(dict(context.node_config), study)
        guard = open_guard(site_dir, run_id=context.run_id, task=task, config=dict(config), study=study)
        # The one parse of the site folder for this message: every task and the guard use it.
        site = guard.attach(load_site(site_dir))
        return _run(msg, task, config, study, site, guard, dict(context.node_config))
    except SiteRefusal as refusal:
        return _error(msg, REFUSED, f"refused by site policy: {refusal.reason}")
    except SarcofedError as err:
        return _error(msg, FAILED, _failure(guard, str(err), err))
    except Exception as err:  # a site crash must reach the coordinator as a reason, not a hang
        log.error("task %s failed:\n%s", task, traceback.format_exc())
        return _error(msg, FAILED, _failure(guard, f"{type(err).__name__}: {err}", err))


def _failure(guard: SiteGuard | None, reason: str, err: Exception) -> str:
    """A failure reason as it may leave: through the guard (redacted and audited) once it exists.

    Before the guard exists only sarcofed's own messages leave (the study's config, no site
    folder, an audit log it cannot write), with this machine's home folders named, not
    spelled out; any other error leaves as its kind only. When the guard cannot even audit
    the failure, the reason says only that.
    """
    if guard is None:
        if isinstance(err, SarcofedError):
            log.warning("task failed before the site guard was set up: %s", reason)
            return machine_paths(reason)
        return f"{type(err).__name__} before the site guard was set up (details are in the site's log)"
    try:
        return guard.error_reason(reason)
    except Exception:
        log.error("the failure could not be audited:\n%s", traceback.format_exc())
        return AUDIT_UNAVAILABLE


def _spec(config: ConfigRecord) -> ModelSpec:
    # torch and the model zoo load here, not at import: identify and compare never need them
    from common.model import ModelSpec

    return ModelSpec.model_validate_json(str(config[keys.MODEL_SPEC]))


def _model(msg: Message, config: ConfigRecord, spec: ModelSpec) -> object:
    """The study model with the weights the coordinator sent."""
    packed = msg.content.array_records[keys.ARRAYS][keys.PACKED].numpy()
    return site_tasks.load_state(spec, packed, str(config[keys.MODEL_LAYOUT]))


def _run(
    msg: Message,
    task: str,
    config: ConfigRecord,
    study: StudyConfig,
    site: SiteDataset,
    guard: SiteGuard,
    node_config: dict[str, object],
) -> Message:
    if task == "identify":
        info = site_tasks.identify(site)
        text = json.dumps(guard.release_identity(info.site, info.n_listed))
        return Message(RecordDict({keys.PAYLOAD: ConfigRecord({keys.PAYLOAD_JSON: text})}), reply_to=msg)
    if task == "train":
        from common.model import pack_state, weights_hash

        spec = _spec(config)
        guard.check_training(spec, study.train, site_tasks.n_train_rows(site, study.train))
        compute = site_tasks.site_compute(node_config, study, "training", guard.policy)
        model = _model(msg, config, spec)
        global_packed = msg.content.array_records[keys.ARRAYS][keys.PACKED].numpy()
        mu = float(config.get(keys.PROXIMAL_MU, 0.0))  # type: ignore[arg-type]
        state, metrics = site_tasks.run_train(
            site,
            model,  # type: ignore[arg-type]
            spec,
            study,
            proximal_mu=mu,
            policy=guard.policy,
            compute=compute,
        )
        packed, _layout = pack_state(state)
        # Local DP when the site's policy demands it: clip and noise the update, not the weights.
        update, dp_applied = guard.protect_update(packed - global_packed)
        packed = (global_packed + update).astype(np.float32)
        used = compute.used
        released_metrics = guard.release_weights(
            int(metrics[keys.NUM_EXAMPLES]), weights_hash(state), metrics, dp_applied=dp_applied, compute=used
        )
        content = RecordDict(
            {
                keys.ARRAYS: ArrayRecord({keys.PACKED: Array(np.ascontiguousarray(packed))}),
                keys.METRICS: MetricRecord({k: v for k, v in released_metrics.items()}),
                keys.COMPUTE: ConfigRecord(
                    {keys.COMPUTE_DEVICE: used.device, keys.COMPUTE_PRECISION: used.precision}
                ),
            }
        )
        return Message(content, reply_to=msg)
    if task in ("evaluate", "compare"):
        if task == "evaluate":
            from common.model import weights_hash

            spec = _spec(config)
            compute = site_tasks.site_compute(node_config, study, "inference")
            model = _model(msg, config, spec)
            # the hash of the weights this site received, not the one the coordinator claims
            received = weights_hash(model.state_dict())  # type: ignore[attr-defined]
            role = site_tasks.site_role(site, str(config.get(keys.ROLE, "external")), received)
            scored = site_tasks.run_evaluate(
                site,
                model,  # type: ignore[arg-type]
                spec,
                study,
                role=role,
                model_hash=received,
                compute=compute,
            )
        else:
            scored = site_tasks.run_compare(site, study)
        released = guard.release_payload(scored.payload, records=scored.records)
        text = released.model_dump_json()
        return Message(RecordDict({keys.PAYLOAD: ConfigRecord({keys.PAYLOAD_JSON: text})}), reply_to=msg)
    raise SarcofedError(f"unknown task {task!r}; this site accepts {', '.join(keys.TASKS)}")


@app.query()
def query(msg: Message, context: Context) -> Message:
    """``identify``: the site's name (a pseudonym) and how many rows it lists."""
    return _handle(msg, context, "identify")


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Local training from the global weights; replies with weights + aggregate metrics."""
    return _handle(msg, context, "train")


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Validation (``evaluate``) or label-convention comparison (``compare``)."""
    return _handle(msg, context, "evaluate")
