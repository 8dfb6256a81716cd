"""Site-local training of the study model: the split, one round of local epochs, validation loss.

Everything here is pure (no Flower): ``client`` splits patients with ``common.splits``, calls
:func:`train_local` and sends back the weights and the aggregate numbers of
:class:`LocalTrainResult`, all of which are sums or counts that pool across sites.

Recipe (seed paper, Table 1): 0.5 Dice + 0.5 cross-entropy (:class:`~common.loss.SeedLoss`),
RMSprop, lr 2e-4, batch 4, at ``spec.image_size``. Optional FedProx proximal term
``mu / 2 * ||w - w_global||^2`` over the trainable parameters. Optional DP-SGD
(``common.dp_sgd``, a site's choice); the BatchNorm running statistics the weights carry back
follow the site's rule (``common.running_stats``) and are set before validation, so the
validation numbers describe the weights that leave.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from pydantic import Field

from common.device import REFERENCE, Compute, inference
from common.dp_sgd import PrivateTraining, train_private
from common.loss import IGNORE_INDEX, SeedLoss
from common.metrics import overlap_from_confusion
from common.model import ModelSpec
from common.preprocess import mask_to_size, to_model_input
from common.running_stats import RunningStats, apply_running_stats
from protocols.classes import METRIC_CLASSES
from protocols.study import TrainSection

log = logging.getLogger(__name__)

_N_CANONICAL = 4


@dataclass
class TrainSample:
    """One labelled slice held in site memory (never leaves the site)."""

    hu: np.ndarray  #: float32 HU, H x W
    label: np.ndarray  #: uint8 canonical 0-3, H x W
    group: str  #: patient key: slices of one group stay on one side of the split
    #: pixel spacing (row, col) in mm; convention-aware training needs it (common.label_conventions)
    spacing_mm: tuple[float, float] | None = None
    #: bool, H x W: pixels the loss ignores (target IGNORE_INDEX); None: none
    ignore: np.ndarray | None = None


class TrainConfig(TrainSection):
    """One round of local training at one site: the study's ``train`` section (the seed's
    recipe, see :class:`~protocols.study.TrainSection`) plus what only the site's trainer
    uses. Build it from a study with :meth:`from_study`."""

    #: FedProx: adds ``mu / 2 * ||w - w_global||^2`` when > 0 (needs ``global_state``).
    proximal_mu: float = Field(0.0, ge=0)
    max_grad_norm: float | None = Field(None, gt=0)

    @classmethod
    def from_study(cls, train: TrainSection, **local: object) -> TrainConfig:
        """The study's ``train`` section with ``local`` settings added or changed (validated)."""
        return cls.model_validate(train.model_dump() | local)


@dataclass
class LocalTrainResult:
    """What one local round produced. Losses are sums over slices so sites pool exactly.

    ``train_loss_sum`` is over the slices of the *last* epoch, each slice contributing its
    batch's mean loss (the loss the optimiser saw, without the proximal term);
    ``val_loss_sum`` is the sum of per-slice losses with the trained model in eval mode.
    ``val_counts`` holds pooled pixel (intersection, union) at model resolution per
    metric class (``muscle``, ``subcutaneous_fat``, ``visceral_fat``, ``msv``); all zeros
    when there is no validation slice.

    Under DP-SGD (``epsilon`` set) the training losses are those of the private steps: exact
    functions of the training slices that the epsilon does not cover, for the site's own log
    only (the site's guard never sends them).
    """

    state_dict: dict[str, torch.Tensor]
    n_train: int
    n_val: int
    train_loss_sum: float
    train_loss_mean: float
    val_loss_sum: float
    val_loss_mean: float | None
    val_counts: dict[str, tuple[int, int]]
    epochs: int
    seconds: float
    epoch_losses: list[float] = field(default_factory=list)  #: mean training loss per epoch
    #: DP-SGD only: the epsilon this round spent at ``delta`` (Opacus's RDP accountant).
    epsilon: float | None = None
    delta: float | None = None
    #: where and in what precision the round ran (DP-SGD: fp32 whatever was asked)
    compute: Compute = REFERENCE


def proximal_term(
    model: torch.nn.Module, global_state: Mapping[str, torch.Tensor], mu: float
) -> torch.Tensor:
    """FedProx ``mu / 2 * sum ||w - w_global||^2`` over the model's trainable parameters."""
    total = torch.zeros((), dtype=torch.float32)
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name not in global_state:
            raise ValueError(f"global_state has no parameter {name!r}; it must come from the same spec")
        reference = global_state[name].to(device=param.device, dtype=param.dtype)
        total = total + (param - reference).pow(2).sum()
    return 0.5 * mu * total


def _batches(indices: list[int], batch_size: int) -> list[list[int]]:
    """Consecutive batches; a trailing batch of one joins the previous one (BatchNorm needs > 1)."""
    out = [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]
    if len(out) > 1 and len(out[-1]) == 1:
        last = out.pop()
        out[-1] = out[-1] + last
    return out


def _check_samples(samples: Sequence[TrainSample], spec: ModelSpec, what: str) -> None:
    """Shapes agree and labels are canonical, or a ValueError naming the sample and value."""
    for i, sample in enumerate(samples):
        if np.shape(sample.hu) != np.shape(sample.label) or np.ndim(sample.hu) != 2:
            raise ValueError(
                f"{what} sample {i} (group {sample.group!r}): image shape {np.shape(sample.hu)} and "
                f"label shape {np.shape(sample.label)} must be the same 2-D shape"
            )
        if sample.ignore is not None and np.shape(sample.ignore) != np.shape(sample.label):
            raise ValueError(
                f"{what} sample {i} (group {sample.group!r}): ignore mask shape {np.shape(sample.ignore)} "
                f"differs from label shape {np.shape(sample.label)}"
            )
        top = int(np.max(sample.label)) if np.size(sample.label) else 0
        if top >= spec.classes or int(np.min(sample.label)) < 0:
            raise ValueError(
                f"{what} sample {i} (group {sample.group!r}): label holds value {top}; canonical labels "
                f"are 0..{spec.classes - 1} (map site values with common.dataset.map_labels)"
            )


@dataclass(frozen=True)
class ModelInputs:
    """Every sample's model-size input and target, made once per call (not once per batch).

    ``images``: N x 1 x S x S float32 (windowed, resized); ``labels``: N x S x S uint8 (canonical
    classes, IGNORE_INDEX where ignored), widened to int64 per batch. Kept on the CPU.
    """

    images: torch.Tensor
    labels: torch.Tensor

    @classmethod
    def of(cls, samples: Sequence[TrainSample], spec: ModelSpec) -> ModelInputs:
        size = spec.image_size
        images = torch.empty((len(samples), 1, size, size), dtype=torch.float32)
        labels = torch.empty((len(samples), size, size), dtype=torch.uint8)
        for i, sample in enumerate(samples):
            images[i] = to_model_input(sample.hu, size, spec.hu_window)
            labels[i] = _target(sample, size)
        return cls(images, labels)

    def __len__(self) -> int:
        return len(self.images)

    def batch(self, idx: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, int64 labels) of the samples ``idx``, on the CPU."""
        index = torch.as_tensor(list(idx), dtype=torch.long)
        return self.images[index], self.labels[index].long()


#: Makes the (images, int64 labels) of some sample indices, on the host.
HostBatch = Callable[[Sequence[int]], tuple[torch.Tensor, torch.Tensor]]
#: Turns one epoch's batches of indices into (images, labels) on the device, in order.
EpochBatches = Callable[[list[list[int]]], Iterable[tuple[torch.Tensor, torch.Tensor]]]


def _on_device(
    batch: tuple[torch.Tensor, torch.Tensor], compute: Compute
) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = batch
    return compute.batch(images), labels.to(compute.torch_device, non_blocking=compute.device == "cuda")


def _target(sample: TrainSample, size: int) -> torch.Tensor:
    """The label at model size, IGNORE_INDEX where the sample's ignore mask says so."""
    label = mask_to_size(sample.label, size)
    if sample.ignore is None:
        return label
    ignored = mask_to_size(sample.ignore.astype(np.uint8), size).bool()
    return label.masked_fill(ignored, IGNORE_INDEX)


def _augment(
    images: torch.Tensor, labels: torch.Tensor, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample left-right flip (p = 0.5) and integer shift; exposed border is air (0)."""
    size = images.shape[-1]
    limit = max(1, size // 16)
    out_img, out_lab = torch.zeros_like(images), torch.zeros_like(labels)
    for k in range(images.shape[0]):
        img, lab = images[k], labels[k]
        if bool(torch.rand((), generator=gen) < 0.5):
            img, lab = img.flip(-1), lab.flip(-1)
        dy, dx = (int(v) for v in torch.randint(-limit, limit + 1, (2,), generator=gen))
        src_y = slice(max(0, -dy), size - max(0, dy))
        dst_y = slice(max(0, dy), size - max(0, -dy))
        src_x = slice(max(0, -dx), size - max(0, dx))
        dst_x = slice(max(0, dx), size - max(0, -dx))
        out_img[k, :, dst_y, dst_x] = img[:, src_y, src_x]
        out_lab[k, dst_y, dst_x] = lab[src_y, src_x]
    return out_img, out_lab


def _optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=config.lr)
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr)
    return torch.optim.SGD(params, lr=config.lr, momentum=0.9)


def _loss_fn(config: TrainConfig) -> SeedLoss:
    return SeedLoss(dice_weight=config.dice_weight, ce_weight=1.0 - config.dice_weight)


def evaluate_loss(
    model: torch.nn.Module,
    spec: ModelSpec,
    samples: Sequence[TrainSample],
    config: TrainConfig,
    *,
    compute: Compute = REFERENCE,
) -> tuple[float, int, dict[str, tuple[int, int]]]:
    """(sum of per-slice losses, number of slices, pooled (intersection, union) per metric class).

    The model runs in eval mode at ``spec.image_size`` on ``compute`` (moved there in place;
    the loss in float32); its mode is restored afterwards. Counts are at model resolution
    against the nearest-resized labels, over the pixels the samples do not ignore.
    """
    _check_samples(samples, spec, "evaluation")
    loss_fn = _loss_fn(config)
    confusion = np.zeros((_N_CANONICAL, _N_CANONICAL), dtype=np.int64)
    loss_sum = 0.0
    inputs = ModelInputs.of(samples, spec)
    compute.prepare(model)
    was_training = model.training
    model.eval()
    try:
        with inference(compute):
            for idx in _batches(list(range(len(samples))), config.batch_size):
                images, labels = _on_device(inputs.batch(idx), compute)
                logits = model(images).float()
                for k in range(len(idx)):
                    loss_sum += float(loss_fn(logits[k : k + 1], labels[k : k + 1]))
                pred = logits.argmax(dim=1).clamp_(max=_N_CANONICAL - 1)
                kept = labels != IGNORE_INDEX
                code = (pred * _N_CANONICAL + labels.clamp(max=_N_CANONICAL - 1))[kept]
                confusion += np.bincount(code.cpu().numpy(), minlength=_N_CANONICAL**2).reshape(
                    _N_CANONICAL, _N_CANONICAL
                )
    finally:
        model.train(was_training)
    overlap = overlap_from_confusion(confusion)
    counts = {name: (overlap[name].intersection, overlap[name].union) for name in METRIC_CLASSES}
    return loss_sum, len(samples), counts


def _train_epochs(
    model: torch.nn.Module,
    n_train: int,
    batches: EpochBatches,
    optimiser: torch.optim.Optimizer,
    loss_fn: SeedLoss,
    config: TrainConfig,
    gen: torch.Generator,
    anchor: Mapping[str, torch.Tensor] | None,
    on_batch: Callable[[int], object] | None,
    compute: Compute,
) -> tuple[list[float], float]:
    """The recipe's epochs (shuffled by ``gen``): mean loss per epoch and the last epoch's sum.

    The forward pass runs under ``compute``'s autocast, the loss in float32; fp16 (CUDA) scales
    the loss against gradient underflow (``torch.amp.GradScaler``).
    """
    scaler = torch.amp.GradScaler(compute.device, enabled=compute.precision == "fp16")
    epoch_losses: list[float] = []
    epoch_sum = 0.0
    for epoch in range(config.local_epochs):
        order = _batches(torch.randperm(n_train, generator=gen).tolist(), config.batch_size)
        epoch_sum = 0.0
        for idx, (images, labels) in zip(order, batches(order), strict=True):
            optimiser.zero_grad(set_to_none=True)
            with compute.autocast():
                logits = model(images)
            loss = loss_fn(logits.float(), labels)
            total = loss + proximal_term(model, anchor, config.proximal_mu) if anchor is not None else loss
            if not torch.isfinite(total):
                raise FloatingPointError(
                    f"training loss became {float(total)} in epoch {epoch + 1}; lower train.lr "
                    f"(now {config.lr}) or set max_grad_norm"
                )
            scaler.scale(total).backward()
            if config.max_grad_norm is not None:
                scaler.unscale_(optimiser)
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            scaler.step(optimiser)
            scaler.update()
            epoch_sum += float(loss.detach()) * len(idx)
            if on_batch is not None:
                on_batch(len(idx))
        epoch_losses.append(epoch_sum / n_train)
        log.info("epoch %d/%d: train loss %.4f", epoch + 1, config.local_epochs, epoch_losses[-1])
    return epoch_losses, epoch_sum


def training_compute(compute: Compute, *, private: bool) -> Compute:
    """What a round runs on when ``compute`` is asked for: DP-SGD is fp32 and contiguous memory
    on the same device (see :func:`train_local`), anything else ``compute`` itself."""
    return Compute(device=compute.device) if private else compute


def train_local(
    model: torch.nn.Module,
    spec: ModelSpec,
    train: Sequence[TrainSample],
    val: Sequence[TrainSample],
    config: TrainConfig,
    *,
    global_state: Mapping[str, torch.Tensor] | None = None,
    progress: bool = False,
    private: PrivateTraining | None = None,
    running_stats: RunningStats = "local",
    compute: Compute = REFERENCE,
) -> LocalTrainResult:
    """Train ``model`` in place for ``config.local_epochs`` epochs on ``train``; score ``val``.

    Deterministic for ``config.seed`` (on CPU, for a given ``compute``): ``torch.manual_seed``
    is set and shuffling / augmentation draw from their own seeded generator. A fresh
    optimiser is made each call (optimiser state does not travel between rounds). With
    ``config.proximal_mu > 0`` the FedProx term against ``global_state`` is added to the
    optimised loss. With ``private`` the round is DP-SGD (``common.dp_sgd``: Poisson batches
    and noise that no seed replays, so not deterministic) and the result says the epsilon
    spent. ``running_stats`` is the rule for the BatchNorm statistics left in the weights
    (``received`` needs ``global_state``).

    ``compute`` (``common.device``): where the forward and backward passes run and in what
    precision (autocast; the weights and the optimiser stay float32). DP-SGD runs in fp32 and
    contiguous memory on ``compute``'s device: under bf16 autocast Opacus's per-slice
    gradients come out in bf16 and its noise step cannot assign them to the float32 weights;
    the result's ``compute`` says what ran. Each sample's model-size input is made once per
    call; on CUDA the batches come through a ``torch.utils.data.DataLoader`` with pinned
    memory. The returned ``state_dict`` is float32, contiguous, on the CPU, and so is ``model``
    afterwards.
    """
    if not train:
        raise ValueError("train_local needs at least one training slice")
    if config.proximal_mu > 0 and global_state is None:
        raise ValueError(f"proximal_mu={config.proximal_mu} needs global_state (the round's global weights)")
    if running_stats == "received" and global_state is None:
        raise ValueError("running_stats='received' needs global_state (the weights the site received)")
    _check_samples(train, spec, "training")
    _check_samples(val, spec, "validation")
    started = time.perf_counter()
    compute = training_compute(compute, private=private is not None)
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    inputs = ModelInputs.of(train, spec)
    compute.prepare(model)
    anchor = None
    if config.proximal_mu > 0 and global_state is not None:
        anchor = {name: t.detach().to(compute.torch_device, copy=True) for name, t in global_state.items()}
    loss_fn = _loss_fn(config)
    optimiser = _optimizer(model, config)
    model.train()
    spent: tuple[float, float] | None = None
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=config.local_epochs * len(train), desc="train", unit="slice")

    def host_batch(idx: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = inputs.batch(idx)
        return _augment(images, labels, gen) if config.augment else (images, labels)

    try:
        if private is not None:
            outcome = train_private(
                model,
                len(train),
                lambda idx: _on_device(host_batch(idx), compute),
                optimiser,
                config,
                private,
                anchor=anchor,
                on_batch=bar.update if bar is not None else None,
            )
            epoch_losses, epoch_sum = outcome.epoch_losses, outcome.last_epoch_sum
            spent = (outcome.epsilon, outcome.delta)
        else:
            epoch_losses, epoch_sum = _train_epochs(
                model,
                len(train),
                _loader(host_batch, compute),
                optimiser,
                loss_fn,
                config,
                gen,
                anchor,
                bar.update if bar else None,
                compute,
            )
    finally:
        if bar is not None:
            bar.close()
    in_order = (
        compute.batch(inputs.batch(idx)[0]) for idx in _batches(list(range(len(train))), config.batch_size)
    )
    with compute.autocast():
        apply_running_stats(model, running_stats, received=global_state, batches=in_order)
    if val:
        val_sum, n_val, counts = evaluate_loss(model, spec, val, config, compute=compute)
        val_mean: float | None = val_sum / n_val
    else:
        val_sum, n_val, val_mean = 0.0, 0, None
        counts = {name: (0, 0) for name in METRIC_CLASSES}
    model.to(device="cpu")
    model.to(memory_format=torch.contiguous_format)
    state = {name: t.detach().cpu().contiguous().clone() for name, t in model.state_dict().items()}
    return LocalTrainResult(
        state_dict=state,
        n_train=len(train),
        n_val=n_val,
        train_loss_sum=epoch_sum,
        train_loss_mean=epoch_sum / len(train),
        val_loss_sum=val_sum,
        val_loss_mean=val_mean,
        val_counts=counts,
        epochs=config.local_epochs,
        seconds=time.perf_counter() - started,
        epoch_losses=epoch_losses,
        epsilon=spent[0] if spent else None,
        delta=spent[1] if spent else None,
        compute=compute,
    )


class _Batches(torch.utils.data.Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """One epoch's batches as a Dataset: item ``k`` is the whole batch ``order[k]``, on the host."""

    def __init__(self, make: HostBatch, order: list[list[int]]) -> None:
        self.make, self.order = make, order

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.make(self.order[k])


def _loader(make: HostBatch, compute: Compute) -> EpochBatches:
    """How an epoch's batches reach the device, made in order by ``make`` (which draws the
    augmentation from the seeded generator, so the order of the draws is the seed's).

    CPU and MPS: in this process. CUDA: through a ``torch.utils.data.DataLoader`` with pinned
    memory, so the host-to-GPU copy is asynchronous. No worker processes: the inputs are made
    once per call (:class:`ModelInputs`), so a batch is an index into them (plus the optional
    flip and shift), cheaper than handing it between processes, and the seeded generator's
    draws stay in one process, in order.
    """
    if compute.device != "cuda":
        return lambda order: (_on_device(make(idx), compute) for idx in order)

    def epoch(order: list[list[int]]) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        loader = torch.utils.data.DataLoader(
            _Batches(make, order), batch_size=None, shuffle=False, num_workers=0, pin_memory=True
        )
        return (_on_device(pair, compute) for pair in loader)

    return epoch
