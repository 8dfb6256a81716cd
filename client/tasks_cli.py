"""``sarcofed site evaluate | compare | train``: a site's tasks, run locally.

``evaluate`` and ``compare`` print exactly the payload the site would send (after its own
release policy), so a hospital can preview and approve what leaves the building. Each
command parses the site folder once (``common.dataset.load_site``) and passes it down.
"""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape

from client.guard import policy_release
from client.ledger import ReleaseLedger
from client.policy import load_policy
from client.render import render_payload
from client.site_tasks import evaluation_scope, run_local_training, site_role
from common.dataset import load_site
from common.errors import SarcofedError
from protocols.cutoffs import CutoffSet
from protocols.payloads import EvaluationPayload, Role

if TYPE_CHECKING:  # torch loads only when a command runs a model
    from common.device import Compute, Purpose
    from common.site_evaluation import Scored

#: ``--cutoff-set``: one of the named sets, in any case (``Korean``); an unknown one is a usage
#: error (exit 2) that lists the choices.
CutoffOption = Annotated[
    CutoffSet,
    typer.Option(
        case_sensitive=False,
        metavar="SET",
        help=f"SMI cut-off set for sarcopenia calls: {CutoffSet.choices()} (any case).",
    ),
]


class DeviceOption(StrEnum):
    """``--device``: where the model runs (``common.device``)."""

    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"
    mps = "mps"


class PrecisionOption(StrEnum):
    """``--precision``: the forward pass's arithmetic (autocast; the weights stay fp32)."""

    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


DeviceFlag = Annotated[
    DeviceOption,
    typer.Option(
        "--device",
        case_sensitive=False,
        metavar="DEVICE",
        help="Where the model runs: auto (a CUDA GPU, then Apple MPS, else the CPU), cpu, cuda or mps.",
    ),
]
PrecisionFlag = Annotated[
    PrecisionOption,
    typer.Option(
        "--precision",
        case_sensitive=False,
        metavar="PRECISION",
        help="The forward pass's arithmetic: auto, fp32, bf16 or fp16 (fp16: CUDA only). auto: fp32 "
        "for evaluate; for train bf16 where the GPU or CPU has it (fp16 on other GPUs), else fp32.",
    ),
]


def _compute(device: DeviceOption, precision: PrecisionOption, purpose: Purpose) -> Compute:
    """The ``--device`` / ``--precision`` request resolved on this machine (a SarcofedError naming
    the option when the machine cannot run it)."""
    from common.device import resolve_compute

    return resolve_compute(
        device.value,
        precision.value,
        purpose=purpose,
        device_setting="--device",
        precision_setting="--precision",
    )


class RoleOption(StrEnum):
    """``site evaluate --role``: a role, or ``auto`` to decide it as the site does in a study."""

    auto = "auto"
    internal = "internal"
    external = "external"


def preview_release(site_dir: Path, scored: Scored) -> EvaluationPayload:
    """The payload as this site's policy.toml would release it (``client.guard.policy_release``,
    the function the site's guard sends through): suppressed cells marked, and with
    ``[aggregate-dp]`` noised (one draw of the noise; the reply itself draws its own).

    Nothing is recorded. When the policy would refuse to send it at all (too few slices or
    patients, too close to an earlier release, or over the epsilon budget), the reason goes to
    stderr.
    """
    release = policy_release(
        scored.payload, scored.records, load_policy(site_dir), ReleaseLedger.for_site(site_dir)
    )
    if release.refusal:
        Console(stderr=True).print(
            f"[yellow]this site would refuse to send this reply:[/] {escape(release.refusal)}"
        )
    return release.payload


def _emit(payload: EvaluationPayload, as_json: bool) -> None:
    if as_json:
        typer.echo(payload.model_dump_json(indent=2))
    else:
        render_payload(payload, Console())


def _fail(err: Exception) -> None:
    Console(stderr=True).print(f"[red]error:[/] {escape(str(err))}")
    raise typer.Exit(1)


def evaluate_cmd(
    site_dir: Annotated[Path, typer.Argument(help="The site folder (site.toml + manifest.csv).")],
    model: Annotated[
        Path,
        typer.Option(
            "--model", "-m", help="The study model: a model.pt, or the study's run folder holding it."
        ),
    ],
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the payload as JSON, exactly as sent.")
    ] = False,
    cutoff_set: CutoffOption = CutoffSet.prado2008,
    batch_size: Annotated[int, typer.Option(min=1, help="Slices per inference batch.")] = 4,
    no_discrepancy: Annotated[
        bool, typer.Option("--no-discrepancy", help="Leave out the label-definition findings.")
    ] = False,
    role: Annotated[
        RoleOption,
        typer.Option(
            metavar="ROLE",
            help="internal: this site trained the model, so only its held-out test patients are scored; "
            "external: every usable slice; auto: internal when the model file names this site or "
            "site.toml's contributed_models lists its hash.",
        ),
    ] = RoleOption.auto,
    device: DeviceFlag = DeviceOption.auto,
    precision: PrecisionFlag = PrecisionOption.auto,
) -> None:
    """Score the study model on this site's labelled slices and show what would be sent.

    Nothing is sent: this is the preview of a validation reply. Per-slice values stay in
    memory here; the output holds only aggregates (the seed's IoU-bin table, area and SMI
    agreement, sarcopenia calls, the model-free label audit, label-definition findings with
    whose difference each is), after this site's policy.toml. The prediction is cut to the
    label protocol's HU ranges (the protocol the model was trained under, if its file says).
    The payload says which device and precision ran the model (--device, --precision).
    """
    from common.model import load_model
    from common.model_meta import model_context
    from common.site_evaluation import evaluate_with_model

    try:
        compute = _compute(device, precision, "inference")
        site = load_site(site_dir)
        loaded = load_model(model)
        context = model_context(loaded.meta)
        chosen: Role
        if role is RoleOption.auto:  # as the site decides in a study: internal when told so (here:
            # the model file names this site) or when site.toml declares it contributed to the weights
            told = "internal" if site.name in context.internal_sites else None
            chosen = site_role(site, told, loaded.weights_hash)
        else:
            chosen = "internal" if role is RoleOption.internal else "external"
        scored = evaluate_with_model(
            site,
            loaded,
            cutoff_set=cutoff_set,
            batch_size=batch_size,
            discrepancy=not no_discrepancy,
            progress=not as_json,
            protocol=context.protocol,
            scope=evaluation_scope(site, chosen, context.split),
            profile=context.profile,
            compute=compute,
        )
        payload = preview_release(site_dir, scored)
    except SarcofedError as err:
        _fail(err)
    _emit(payload, as_json)


def compare_cmd(
    site_dir: Annotated[Path, typer.Argument(help="The site folder (site.toml + manifest.csv).")],
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the payload as JSON, exactly as sent.")
    ] = False,
    cutoff_set: CutoffOption = CutoffSet.prado2008,
) -> None:
    """Compare this site's `label` masks with its `reference` masks, without any model.

    Useful when two raters or two protocols labelled the same slices: the output says how far
    the conventions differ (IoU bins, areas, SMI, sarcopenia calls) and names the differences
    (e.g. "psoas left out"). Rows without a reference are counted as excluded.
    """
    from common.site_evaluation import compare_with_reference

    try:
        site = load_site(site_dir)
        payload = preview_release(
            site_dir, compare_with_reference(site, cutoff_set=cutoff_set, progress=not as_json)
        )
    except SarcofedError as err:
        _fail(err)
    _emit(payload, as_json)


def train_cmd(
    site_dir: Annotated[Path, typer.Argument(help="The site folder (site.toml + manifest.csv).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write model.pt.")],
    epochs: Annotated[int, typer.Option(min=1, help="Training epochs (the seed: 50).")] = 10,
    encoder: Annotated[
        str, typer.Option(help="smp encoder name (the seed-size setting: resnet34).")
    ] = "resnet34",
    image_size: Annotated[int, typer.Option(help="Model input size in pixels (the seed: 512).")] = 512,
    val_fraction: Annotated[float, typer.Option(help="Share of patients held out for validation.")] = 0.2,
    test_fraction: Annotated[
        float, typer.Option(help="Share of patients held out for testing (scored by `site evaluate`).")
    ] = 0.2,
    seed: Annotated[int, typer.Option(help="Seed for the split and the initial weights.")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    device: DeviceFlag = DeviceOption.auto,
    precision: PrecisionFlag = PrecisionOption.auto,
) -> None:
    """Train a single-site model on this site's data with the seed's recipe.

    0.5 Dice + 0.5 cross-entropy, RMSprop, lr 2e-4, batch 4; the split is by patient (`group`).
    This is a hospital's own model, and the centralised baseline for federated benchmarks.
    It trains where --device says (auto: a GPU when there is one), in bf16 where the machine has it.
    """
    try:
        compute = _compute(device, precision, "training")
        summary = run_local_training(
            load_site(site_dir),
            out,
            epochs=epochs,
            encoder=encoder,
            image_size=image_size,
            val_fraction=val_fraction,
            test_fraction=test_fraction,
            seed=seed,
            progress=not as_json,
            compute=compute,
        )
    except SarcofedError as err:
        _fail(err)
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
    else:

        def fmt(value: object, digits: int) -> str:
            return f"{value:.{digits}f}" if isinstance(value, float) else "n/a (no validation slices)"

        Console().print(
            f"trained on {summary['n_train']} slices ({summary['n_val']} for validation, "
            f"{summary['n_test_held_out']} test rows held out) for {epochs} epochs: "
            f"train loss {fmt(summary['train_loss'], 4)}, val loss {fmt(summary['val_loss'], 4)}, "
            f"val muscle IoU {fmt(summary['val_muscle_iou'], 3)} ({summary['compute']}); "
            f"model written to {escape(str(out))}"
        )


def register(site_app: typer.Typer) -> None:
    site_app.command("evaluate")(evaluate_cmd)
    site_app.command("compare")(compare_cmd)
    site_app.command("train")(train_cmd)
