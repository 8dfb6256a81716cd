"""What a site does for each instruction, without Flower: pure calls into ``common``.

The ClientApp (``client.app``) only unpacks a Message, parses the site folder once
(``common.dataset.load_site``), calls one of these with the ``SiteDataset``, and packs the
reply. Everything here can be run and tested on a parsed site folder directly.

Nothing here makes data: in simulation the demo hospitals must exist already
(``sarcofed study demo`` makes them), so a site's app bundle carries no demo generator.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from client.policy import SitePolicy
from common.dataset import MANIFEST_CSV, SiteDataset, iter_slices
from common.errors import SarcofedError, SliceError
from common.evaluation import Scope
from common.paths import demo_sites_dir, simulated_site_dir
from common.splits import PatientSplit, split_site
from protocols import keys
from protocols.findings import ErrorProfile
from protocols.payloads import Role
from protocols.protocol import LabelProtocol
from protocols.study import StudyConfig, TrainSection

if TYPE_CHECKING:  # torch and the model zoo cost seconds to import: only tasks that use a model do
    import torch

    from common.device import Compute, Purpose
    from common.model import ModelSpec
    from common.site_evaluation import Scored
    from common.training import TrainSample

#: The command that makes the simulated hospitals (named in the error when one is missing).
MAKE_DEMO_SITES = "sarcofed study demo --make-only"


def resolve_site_dir(node_config: dict[str, object], study: StudyConfig) -> Path:
    """The site folder: ``site-dir`` from the SuperNode's node config.

    In simulation (no ``site-dir`` but a ``partition-id``), the demo hospital of that
    partition, ``<demo.dir>/site-<partition>``, which must exist already: the simulated
    site only reads it (``sarcofed study demo`` makes the demo hospitals before the run).
    """
    if "site-dir" in node_config:
        return Path(str(node_config["site-dir"])).expanduser()
    if "partition-id" not in node_config:
        raise SarcofedError(
            "this SuperNode has no site folder: start it with --node-config 'site-dir=\"/path/to/site\"'"
        )
    partition = int(str(node_config["partition-id"]))
    site_dir = simulated_site_dir(demo_sites_dir(study.demo.dir), partition)
    if not (site_dir / MANIFEST_CSV).exists():
        raise SarcofedError(
            f"simulation: no demo hospital for partition {partition} at {site_dir}; make the demo "
            f"hospitals first with `{MAKE_DEMO_SITES}` (or run the whole demo with `sarcofed study demo`), "
            "or set demo.dir to a folder of site-N folders (`sarcofed demo make DIR`)"
        )
    return site_dir


#: Node-config keys with which a site overrides the study's ``compute.device`` / ``compute.precision``
#: (``--node-config 'device="cpu"'``): the site knows its hardware, so its choice wins.
NODE_DEVICE = "device"
NODE_PRECISION = "precision"


def site_compute(
    node_config: Mapping[str, object],
    study: StudyConfig,
    purpose: Purpose,
    policy: SitePolicy | None = None,
) -> Compute:
    """Where this site runs the model: its node config's ``device`` / ``precision`` when set, else
    the study's ``compute`` section (``auto`` by default), resolved on this machine
    (``common.device.resolve_compute``; a device it does not have is a SarcofedError naming the
    setting). Training under the ``policy``'s DP-SGD runs in fp32 whatever is asked
    (``common.training.training_compute``), and this says so."""
    from common.device import resolve_compute

    def pick(key: str, study_value: str) -> tuple[str, str]:
        if key in node_config:
            return str(node_config[key]), f"the node config's {key!r}"
        return study_value, f"compute.{key}"

    device, device_setting = pick(NODE_DEVICE, study.compute.device)
    precision, precision_setting = pick(NODE_PRECISION, study.compute.precision)
    compute = resolve_compute(
        device,
        precision,
        purpose=purpose,
        device_setting=device_setting,
        precision_setting=precision_setting,
    )
    if purpose == "training" and policy is not None and policy.dp_sgd.enabled:
        from common.training import training_compute

        return training_compute(compute, private=True)
    return compute


@dataclass(frozen=True)
class SiteInfo:
    site: str
    n_listed: int


def identify(site: SiteDataset) -> SiteInfo:
    """The site's pseudonym (site.toml ``name``) and its count of valid manifest rows."""
    return SiteInfo(site=site.name, n_listed=len(site))


def load_state(spec: ModelSpec, packed: object, layout: str) -> torch.nn.Module:
    """Rebuild the study model from the packed weights the server sent."""
    from common.model import model_from_state, unpack_state

    return model_from_state(spec, unpack_state(packed, layout))  # type: ignore[arg-type]


def training_samples(
    site: SiteDataset, rows: Collection[int] | None = None
) -> tuple[list[TrainSample], dict[str, int]]:
    """The usable slices of the site (or of ``rows``) as training samples, and exclusions by reason."""
    from common.training import TrainSample

    samples: list[TrainSample] = []
    excluded: dict[str, int] = {}
    for item in iter_slices(site, rows=rows):
        if isinstance(item, SliceError):
            excluded[item.reason.value] = excluded.get(item.reason.value, 0) + 1
            continue
        samples.append(
            TrainSample(hu=item.ct.hu, label=item.label, group=item.group, spacing_mm=item.ct.spacing_mm)
        )
    if not samples:
        why = (
            ", ".join(f"{n} {reason}" for reason, n in sorted(excluded.items()))
            or "manifest.csv lists no row"
        )
        raise SarcofedError(
            f"{site.root}: no usable slice to train on ({why}); "
            f"run `sarcofed site check {site.root}` for the file-by-file reasons"
        )
    return samples, excluded


@dataclass(frozen=True)
class SplitSamples:
    """A site's patient split and the samples of its train and validation parts (test: never loaded)."""

    split: PatientSplit
    train: list[TrainSample]
    val: list[TrainSample]
    #: the train part's rows that could not be used, by reason
    excluded: dict[str, int]


def split_samples(site: SiteDataset, train: TrainSection) -> SplitSamples:
    """The split ``train`` asks for, with its train and validation samples loaded."""
    split = split_site(site, train)
    samples, excluded = training_samples(site, split.train)
    val = training_samples(site, split.val)[0] if split.val else []
    return SplitSamples(split=split, train=samples, val=val, excluded=excluded)


def n_train_rows(site: SiteDataset, train: TrainSection) -> int:
    """How many manifest rows the split puts in the train part (nothing is loaded)."""
    return len(split_site(site, train).train)


def train_and_val_samples(
    site: SiteDataset, train: TrainSection
) -> tuple[list[TrainSample], list[TrainSample]]:
    """The samples of the split's train and validation parts; the test patients are never loaded."""
    loaded = split_samples(site, train)
    return loaded.train, loaded.val


def run_train(
    site: SiteDataset,
    model: torch.nn.Module,
    spec: ModelSpec,
    study: StudyConfig,
    *,
    proximal_mu: float = 0.0,
    policy: SitePolicy | None = None,
    compute: Compute | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Local training on the site's train patients, validation on its validation patients.

    The test patients (``train.test-fraction``) are held out: the study's internal validation
    scores them and nothing else. What the site's ``policy`` (default: the default policy)
    asks of the training itself is done here: DP-SGD (``[dp-sgd]``) and the BatchNorm statistics
    rule (``[training] batchnorm-stats``); what it asks of the reply (the validation minimums,
    the epsilon cap) the guard enforces on the metrics (``SiteGuard.release_weights``).
    With ``train.convention-aware`` the site audits its training labels against the study
    protocol and trains on the adjusted targets (``common.label_conventions``); the reply says
    which adjustments it made, as shares of its labelled pixels (:func:`convention_metrics`).
    Returns new weights and aggregate metrics, among them the number of validation patients.
    ``compute``: where and in what precision to train (``None``: fp32 on the CPU).
    """
    from common.device import REFERENCE
    from common.dp_sgd import PrivateTraining
    from common.training import TrainConfig, train_local

    policy = policy or SitePolicy()
    train_samples, val_samples = train_and_val_samples(site, study.train)
    convention: dict[str, float] = {}
    if study.train.convention_aware:
        from common.label_conventions import plan_conventions

        plan = plan_conventions(
            train_samples,
            val_samples,
            study.protocol,
            min_slices=policy.min_slices,
            declared=site.config.label_conventions,
        )
        train_samples, val_samples = plan.train, plan.val
        convention = convention_metrics(plan.tally.shares(), plan.tally.slices, plan.declared)
    config = TrainConfig.from_study(study.train, proximal_mu=proximal_mu)
    global_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    dp = policy.dp_sgd
    private = PrivateTraining(dp.noise_multiplier, dp.max_grad_norm, dp.target_delta) if dp.enabled else None
    result = train_local(
        model,
        spec,
        train_samples,
        val_samples,
        config,
        global_state=global_state,
        private=private,
        running_stats=policy.training.batchnorm_stats,
        compute=compute or REFERENCE,
    )
    metrics: dict[str, float] = {
        keys.NUM_EXAMPLES: float(result.n_train),
        keys.N_VAL: float(result.n_val),
        keys.N_VAL_PATIENTS: float(len({sample.group for sample in val_samples})),
        keys.TRAIN_LOSS: float(result.train_loss_mean),
        keys.TRAIN_LOSS_SUM: float(result.train_loss_sum),
        keys.EPOCHS: float(result.epochs),
        keys.SECONDS: float(result.seconds),
    }
    if result.epsilon is not None and result.delta is not None:
        metrics[keys.DP_EPSILON], metrics[keys.DP_DELTA] = result.epsilon, result.delta
    if result.val_loss_mean is not None:
        metrics[keys.VAL_LOSS] = float(result.val_loss_mean)
        metrics[keys.VAL_LOSS_SUM] = float(result.val_loss_sum)
    for name, (inter, union) in result.val_counts.items():
        inter_key, union_key = keys.val_overlap_keys(name)
        metrics[inter_key], metrics[union_key] = float(inter), float(union)
    return result.state_dict, metrics | convention


def convention_metrics(
    shares: dict[str, float], slices: dict[str, int], declared: Iterable[str] = ()
) -> dict[str, float]:
    """The training reply's account of convention-aware training: ``convention-aware`` 1.0; per
    adjustment made its share of the labelled training pixels and its number of training slices
    (the guard withholds an adjustment applied on fewer slices than the site's min-slices); and
    1.0 for each convention the site declares in site.toml, applied or not."""
    out = {keys.CONVENTION_AWARE: 1.0}
    for name, share in shares.items():
        share_key, slices_key = keys.convention_keys(name)
        out[share_key], out[slices_key] = float(share), float(slices.get(name, 0))
    out |= {keys.convention_declared_key(name): 1.0 for name in declared}
    return out


def evaluation_scope(site: SiteDataset, role: Role, train: TrainSection) -> Scope:
    """What an evaluation scores: an internal site its test patients only, an external site all."""
    if role == "internal":
        return Scope(role="internal", rows=split_site(site, train).test)
    return Scope(role="external")


def site_role(site: SiteDataset, instructed: str | None, model_hash: str) -> Role:
    """Internal when the coordinator says the site trained the model, or the site declares it did
    (``contributed_models`` in site.toml: a model trained elsewhere with this site's data)."""
    if instructed == "internal" or site.config.contributed_to(model_hash):
        return "internal"
    return "external"


def run_evaluate(
    site: SiteDataset,
    model: torch.nn.Module,
    spec: ModelSpec,
    study: StudyConfig,
    *,
    role: Role = "external",
    profile: ErrorProfile | None = None,
    model_hash: str | None = None,
    compute: Compute | None = None,
) -> Scored:
    """Score the study model on this site (its test patients when internal); aggregates only.

    ``model_hash`` (the payload's) is the hash of the weights this site received: the ClientApp
    computes it once from the weights it unpacked (``None``: computed here from ``model``),
    never the hash the coordinator claims. The patients scored stay at the site (the guard's
    release ledger needs them). ``compute``: where and in what precision the model runs
    (``None``: fp32 where the model is); the payload says which.
    """
    from common.site_evaluation import evaluate_with_model

    return evaluate_with_model(
        site,
        model,
        spec,
        model_hash=model_hash,
        cutoff_set=study.study.cutoff_set,
        batch_size=study.eval.batch_size,
        discrepancy=study.study.discrepancy,
        harmonised=study.study.harmonised,
        protocol=study.protocol,
        scope=evaluation_scope(site, role, study.train),
        profile=profile,
        compute=compute,
    )


def run_compare(site: SiteDataset, study: StudyConfig) -> Scored:
    """Score the site's labels against its reference masks; no model involved."""
    from common.site_evaluation import compare_with_reference

    return compare_with_reference(
        site,
        cutoff_set=study.study.cutoff_set,
        discrepancy=study.study.discrepancy,
        harmonised=study.study.harmonised,
        protocol=study.protocol,
    )


def run_local_training(
    site: SiteDataset,
    out: Path,
    *,
    epochs: int,
    encoder: str,
    image_size: int,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    progress: bool = False,
    compute: Compute | None = None,
) -> dict[str, float | int | str | None]:
    """Single-site training with the seed's recipe; writes ``out`` (model.pt).

    The site's test patients are held out; the model's metadata names this site and the
    split, so `site evaluate` on this site scores it as internal, on those patients only.
    ``compute``: where and in what precision to train (``None``: fp32 on the CPU).
    """
    import torch

    from common.device import REFERENCE
    from common.model import ModelSpec, build_model, save_model, weights_hash
    from common.model_meta import context_meta
    from common.training import TrainConfig, train_local

    section = TrainSection(val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)
    loaded = split_samples(site, section)
    spec = ModelSpec(encoder=encoder, image_size=image_size)
    torch.manual_seed(seed)
    model = build_model(spec)
    result = train_local(
        model,
        spec,
        loaded.train,
        loaded.val,
        TrainConfig(local_epochs=epochs, seed=seed),
        progress=progress,
        compute=compute or REFERENCE,
    )
    inter, union = result.val_counts.get("muscle", (0, 0))
    meta: dict[str, str | int | float] = {"site": site.name, "epochs": epochs}
    meta |= context_meta([site.name], section, LabelProtocol())
    save_model(out, result.state_dict, spec, meta=meta)
    return {
        "model": str(out),
        "n_train": result.n_train,
        "n_val": result.n_val,
        "n_test_held_out": len(loaded.split.test),
        "excluded": sum(loaded.excluded.values()),
        "train_loss": result.train_loss_mean,
        "val_loss": result.val_loss_mean,
        "val_muscle_iou": (inter / union) if union else None,
        "weights_hash": weights_hash(result.state_dict),
        "compute": (compute or REFERENCE).label(),
    }


__all__ = [
    "SiteInfo",
    "SplitSamples",
    "convention_metrics",
    "evaluation_scope",
    "identify",
    "load_state",
    "n_train_rows",
    "resolve_site_dir",
    "run_compare",
    "run_evaluate",
    "run_local_training",
    "run_train",
    "site_compute",
    "site_role",
    "split_samples",
    "train_and_val_samples",
    "training_samples",
]
