"""The site's release policy: ``policy.toml`` next to ``site.toml``, owned by the hospital.

It says which tasks the site accepts, how many slices a reply must summarise, the
smallest count that may leave in a reported cell, whether polar discrepancy maps may
leave, which sarcofed code the site reviewed (app allow-list), whether training
updates get local differential privacy, what a training reply may say about the
validation split and the BatchNorm statistics (``[training]``), the run-config values the
site accepts (``[bounds]``) and DP-SGD for local training (``[dp-sgd]``). ``client.guard``
enforces it on every reply; docs/PRIVACY.md ("Training replies") gives the reasons.

Example (every key optional; the values shown are the defaults)::

    accept-tasks = ["train", "evaluate", "compare", "discrepancy"]
    min-slices = 5            # refuse to reply about fewer usable slices than this
    min-patients = 5          # ... or fewer patients; and a reply's patients must differ from every
                              # earlier reply's by none or by at least this many (no subtraction)
    min-cell-count = 1        # counts 1..(n-1) in a reported cell are suppressed; 1 = none
    allow-polar-maps = true   # discordant-area maps (angle x radius) may leave
    allowed-apps = []         # sha256 of the sarcofed code reviewed; [] = not pinned

    [weights-dp]              # local DP on training updates (off by default)
    enabled = false
    clipping-norm = 10.0
    noise-multiplier = 0.1

    [training]                # what a training reply may say
    min-val-patients = 5      # validation metrics leave only over at least this many patients...
    # min-val-slices = 5      # ...and slices (absent: min-slices); otherwise they are withheld
    batchnorm-stats = "recompute"   # recompute | received | local

    [bounds]                  # run-config values this site accepts; others are refused (none by default)
    # "train.val-fraction" = [0.1, 0.5]

    [dp-sgd]                  # DP-SGD (Opacus) for local training; needs a model.norm = "group" study
    enabled = false
    noise-multiplier = 1.0
    max-grad-norm = 1.0
    target-delta = 1e-05
    max-epsilon = 10.0        # a round that would spend more is refused

    [aggregate-dp]            # DP on evaluation/comparison replies (off by default)
    enabled = false
    epsilon-per-reply = 1.0   # per patient, pure DP (Laplace, OpenDP)
    epsilon-per-study = 3.0   # one run id
    epsilon-total = 20.0      # everything this site ever releases with DP
    max-slices-per-patient = 2
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from common.errors import SiteFolderError
from common.running_stats import RunningStats
from protocols.study import StudyConfig

POLICY_FILE = "policy.toml"

#: What a site can accept. ``discrepancy`` is the label-convention analysis inside
#: ``evaluate`` / ``compare`` replies (findings, region shares, polar maps).
PolicyTask = Literal["train", "evaluate", "compare", "discrepancy"]
POLICY_TASKS: tuple[PolicyTask, ...] = ("train", "evaluate", "compare", "discrepancy")

#: Minimum number of usable slices a reply must summarise when policy.toml does not say.
DEFAULT_MIN_SLICES = 5
#: Minimum number of patients a reply summarises, and the least difference in patients between
#: two replies (below it, one patient's values follow by subtraction).
DEFAULT_MIN_PATIENTS = 5
#: Fewest patients whose validation slices a training reply's val-* metrics may sum over.
#: Five, like min-slices: the smallest group the site releases any aggregate over, counted in
#: patients because one patient's slices are one person's values (docs/PRIVACY.md).
DEFAULT_MIN_VAL_PATIENTS = 5


_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class WeightsDp(BaseModel):
    """Local DP on training updates: clip the update's L2 norm, add Gaussian noise."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    enabled: bool = False
    clipping_norm: float = Field(10.0, gt=0, alias="clipping-norm")
    noise_multiplier: float = Field(0.1, ge=0, alias="noise-multiplier")


class AggregateDp(BaseModel):
    """Differential privacy on evaluation / comparison replies (``client.dp_release``).

    Each reply spends ``epsilon-per-reply`` (pure DP per patient); a reply that would take a
    study (one run) past ``epsilon-per-study`` or the site past ``epsilon-total`` is refused.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    enabled: bool = False
    epsilon_per_reply: float = Field(1.0, gt=0, alias="epsilon-per-reply")
    epsilon_per_study: float = Field(3.0, gt=0, alias="epsilon-per-study")
    epsilon_total: float = Field(20.0, gt=0, alias="epsilon-total")
    max_slices_per_patient: int = Field(2, ge=1, alias="max-slices-per-patient")

    @model_validator(mode="after")
    def _ordered(self) -> AggregateDp:
        """A reply's epsilon fits in a study's, a study's in the site's total (else nothing could leave)."""
        if not self.epsilon_per_reply <= self.epsilon_per_study <= self.epsilon_total:
            raise ValueError(
                "the epsilon budgets must satisfy epsilon-per-reply <= epsilon-per-study <= epsilon-total, "
                f"got {self.epsilon_per_reply:g}, {self.epsilon_per_study:g} and {self.epsilon_total:g}"
            )
        return self


class TrainingReplies(BaseModel):
    """``[training]``: what a training reply may say about the site's validation split and images."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    min_val_patients: int = Field(DEFAULT_MIN_VAL_PATIENTS, ge=1, alias="min-val-patients")
    #: ``None``: the site's ``min-slices``.
    min_val_slices: int | None = Field(None, ge=1, alias="min-val-slices")
    #: which BatchNorm running statistics the weights carry back (``common.running_stats``).
    batchnorm_stats: RunningStats = Field("recompute", alias="batchnorm-stats")


class DpSgd(BaseModel):
    """``[dp-sgd]``: DP-SGD (Opacus) for local training: per-slice gradients clipped to
    ``max-grad-norm``, Gaussian noise of ``noise-multiplier * max-grad-norm``, Poisson sampling;
    the epsilon spent at ``target-delta`` (Opacus's RDP accountant) is sent with the weights."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    enabled: bool = False
    noise_multiplier: float = Field(1.0, gt=0, alias="noise-multiplier")
    max_grad_norm: float = Field(1.0, gt=0, alias="max-grad-norm")
    target_delta: float = Field(1e-5, gt=0, lt=1, alias="target-delta")
    #: a round planned to spend more than this is refused before training, and one whose
    #: training spent more is refused after it (nothing is sent). One round's: rounds compose.
    max_epsilon: float = Field(10.0, gt=0, alias="max-epsilon")


def _numeric_run_config_keys() -> frozenset[str]:
    flat = StudyConfig().to_flat()
    return frozenset(k for k, v in flat.items() if isinstance(v, int | float) and not isinstance(v, bool))


class SitePolicy(BaseModel):
    """``policy.toml``: what this site releases. Keys are kebab-case in the file."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    accept_tasks: tuple[PolicyTask, ...] = Field(POLICY_TASKS, alias="accept-tasks")
    min_slices: int = Field(DEFAULT_MIN_SLICES, ge=1, alias="min-slices")
    min_patients: int = Field(DEFAULT_MIN_PATIENTS, ge=1, alias="min-patients")
    min_cell_count: int = Field(1, ge=1, alias="min-cell-count")
    allow_polar_maps: bool = Field(True, alias="allow-polar-maps")
    allowed_apps: tuple[str, ...] = Field((), alias="allowed-apps")
    weights_dp: WeightsDp = Field(WeightsDp(), alias="weights-dp")
    training: TrainingReplies = TrainingReplies()
    #: numeric run-config key -> (lowest, highest) value this site accepts, bounds included.
    bounds: dict[str, tuple[float, float]] = {}
    dp_sgd: DpSgd = Field(DpSgd(), alias="dp-sgd")
    aggregate_dp: AggregateDp = Field(AggregateDp(), alias="aggregate-dp")

    @field_validator("bounds")
    @classmethod
    def _bounded_keys(cls, values: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
        numeric = _numeric_run_config_keys()
        unknown = sorted(k for k in values if k not in numeric)
        if unknown:
            raise ValueError(
                f"bounds name {unknown}, which are not numeric run-config keys; "
                f"bounds can hold: {', '.join(sorted(numeric))}"
            )
        reversed_ = sorted(k for k, (low, high) in values.items() if low > high)
        if reversed_:
            raise ValueError(f"bounds of {reversed_} must be [lowest, highest], lowest first")
        return values

    @property
    def min_val_slices(self) -> int:
        """Fewest validation slices a reply's val-* metrics may sum over (``min-slices`` by default)."""
        return self.training.min_val_slices or self.min_slices

    @field_validator("allowed_apps")
    @classmethod
    def _hashes(cls, values: tuple[str, ...]) -> tuple[str, ...]:
        cleaned = tuple(v.strip().lower().removeprefix("sha256:") for v in values)
        bad = [v for v in cleaned if not _SHA256.match(v)]
        if bad:
            raise ValueError(
                "allowed-apps must be sha256 hex digests (64 characters, from `sarcofed site policy hash`), "
                f"got {bad}"
            )
        return cleaned

    def accepts(self, task: str) -> bool:
        return task in self.accept_tasks

    def to_toml(self) -> str:
        """The policy as policy.toml text (every key written out, so the site sees it all)."""
        tasks = ", ".join(f'"{t}"' for t in self.accept_tasks)
        apps = "".join(f'\n    "{a}",' for a in self.allowed_apps)
        return (
            "# sarcofed site release policy: what this hospital lets leave (see docs/DEPLOYMENT.md).\n"
            f"accept-tasks = [{tasks}]\n"
            f"min-slices = {self.min_slices}\n"
            f"min-patients = {self.min_patients}\n"
            f"min-cell-count = {self.min_cell_count}\n"
            f"allow-polar-maps = {str(self.allow_polar_maps).lower()}\n"
            f"allowed-apps = [{apps}{chr(10) if apps else ''}]\n"
            "\n[weights-dp]\n"
            f"enabled = {str(self.weights_dp.enabled).lower()}\n"
            f"clipping-norm = {self.weights_dp.clipping_norm}\n"
            f"noise-multiplier = {self.weights_dp.noise_multiplier}\n"
            + self._training_toml()
            + self._aggregate_dp_toml()
        )

    def _training_toml(self) -> str:
        """The ``[training]``, ``[bounds]`` and ``[dp-sgd]`` tables: what a training reply may say."""
        train, dp = self.training, self.dp_sgd
        val_slices = (
            f"min-val-slices = {train.min_val_slices}\n"
            if train.min_val_slices is not None
            else f"# min-val-slices = {self.min_slices}   # absent: min-slices\n"
        )
        bounds = "".join(f'"{key}" = [{low!r}, {high!r}]\n' for key, (low, high) in self.bounds.items())
        return (
            "\n[training]\n"
            f"min-val-patients = {train.min_val_patients}\n"
            + val_slices
            + f'batchnorm-stats = "{train.batchnorm_stats}"\n'
            + "\n[bounds]\n"
            + (bounds or '# "train.val-fraction" = [0.1, 0.5]\n')
            + "\n[dp-sgd]\n"
            f"enabled = {str(dp.enabled).lower()}\n"
            f"noise-multiplier = {dp.noise_multiplier!r}\n"
            f"max-grad-norm = {dp.max_grad_norm!r}\n"
            f"target-delta = {dp.target_delta!r}\n"
            f"max-epsilon = {dp.max_epsilon!r}\n"
        )

    def _aggregate_dp_toml(self) -> str:
        """The ``[aggregate-dp]`` table: differential privacy on evaluation / comparison replies."""
        dp = self.aggregate_dp
        return (
            "\n[aggregate-dp]\n"
            f"enabled = {str(dp.enabled).lower()}\n"
            f"epsilon-per-reply = {dp.epsilon_per_reply}\n"
            f"epsilon-per-study = {dp.epsilon_per_study}\n"
            f"epsilon-total = {dp.epsilon_total}\n"
            f"max-slices-per-patient = {dp.max_slices_per_patient}\n"
        )


def policy_path(site_dir: Path) -> Path:
    return Path(site_dir) / POLICY_FILE


def load_policy(site_dir: Path) -> SitePolicy:
    """Read ``<site_dir>/policy.toml``; the documented defaults when the file is absent.

    Raises ``SiteFolderError`` naming the file and the offending key when it is invalid:
    a policy the site wrote but sarcofed cannot read must never fall back to defaults.
    """
    path = policy_path(site_dir)
    if not path.exists():
        return SitePolicy()
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise SiteFolderError(path, f"cannot read the release policy: {err}") from err
    try:
        return SitePolicy.model_validate(raw)
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors(include_url=False)
        )
        valid = ", ".join(f.alias or n for n, f in SitePolicy.model_fields.items())
        raise SiteFolderError(path, f"invalid release policy: {problems} (valid keys: {valid})") from err


def write_policy(site_dir: Path, policy: SitePolicy) -> Path:
    path = policy_path(site_dir)
    path.write_text(policy.to_toml(), encoding="utf-8")
    return path
