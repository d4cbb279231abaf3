"""CRD: contrastive representation distillation (Tian, Krishnan & Isola, "Contrastive Representation
Distillation", ICLR 2020; the authors' code is RepDistiller, ``crd/criterion.py`` and ``crd/memory.py``).

The student's and the teacher's penultimate features are embedded (a linear head each, then L2
normalisation, RepDistiller's ``Embed``) in a ``feat_dim``-dimensional space, and a noise-contrastive
estimate (NCE, eq. 18) of the mutual information between them is maximised. Negatives come from a
**memory bank**: one student and one teacher embedding per training image, updated with momentum
``m`` by dataset index after every step (``memory[i] <- normalise(m * memory[i] + (1 - m) * v_i)``).
For an image ``i`` with ``K`` negatives ``j_1..j_K``, with ``N`` training images and ``T = nce_t``::

    h(v, u)  = exp(v . u / T) / Z          (Z fixed at the first step: mean exp(v . u / T) * N)
    P_n      = 1 / N
    l(v, M)  = - log( h(v, M[i]) / (h(v, M[i]) + K P_n) ) - sum_k log( K P_n / (h(v, M[j_k]) + K P_n) )
    crd      = mean_i l(v_s,i, M_t) + mean_i l(v_t,i, M_s)

(the student's embedding against the teacher's memory, and the teacher's against the student's;
``eps = 1e-7`` in the denominators, as RepDistiller). The gradient reaches the student and both
embedding heads; the memory is a buffer (no gradient) and the teacher stays frozen. The loss is::

    L = ce_weight * CE(y, z_s) + kd_weight * T_kd^2 KL(z_t/T_kd || z_s/T_kd) + beta * crd

Defaults: RepDistiller's command for CRD (``-r 1 -a 0 -b 0.8``: ``ce_weight`` 1, ``kd_weight`` 0,
``beta`` 0.8; ``kd_weight: 1`` is its "CRD+KD"), ``feat_dim`` 128, ``nce_t`` 0.07, ``nce_m`` 0.5,
``temperature`` 4 (``kd_T``, for the KD term only).

Negatives are sampled as RepDistiller's default ``exact`` mode: the positive is the image itself and
the ``K`` negatives are drawn, per image, among the training images of **other classes**; xkd draws
them without replacement on the device (a seeded generator) instead of in the data loader.
**K scales to the data set**: at most ``N - n_max`` negatives exist for an image of the largest class
(``n_max`` images), so ``nce_k: null`` (default) means ``min(16384, N - n_max)`` (16384 is the
paper's K for CIFAR-100, 50,000 images), and an explicit ``nce_k`` above ``N - n_max`` is a
:class:`~xkd.errors.ConfigError` in :meth:`CRD.setup`, before training. (RepDistiller draws with
replacement when K exceeds the pool.)

Features: by default the **input of each model's classifier** (its last ``nn.Linear``), which is
RepDistiller's ``feat[-1]`` (the pooled, flattened penultimate feature) for GAP heads and the
flattened last map for ``kdfmv_cnn``'s flatten head. ``layers: [[student_path, teacher_path]]``
names other modules instead (a 4-D output is globally average-pooled).

The memory bank (``memory_s``, ``memory_t``, ``N x feat_dim``) and the constants ``Z`` are
buffers of :attr:`CRD.head`, which :meth:`CRD.trainable_modules` returns: they follow ``.to(device)``
and are saved in checkpoints, so ``--resume`` continues with the same memory. Cost: RepDistiller
gathers ``2 x B x (K + 1) x feat_dim`` memory floats per step (0.5 GiB each at B = 64, K = 16384);
xkd scores against the whole memory by one matrix product instead when ``N <= 8 (K + 1)``
(:func:`contrast_exp`), which gives the same numbers. The negatives of training step ``t`` are
drawn from a generator seeded by the seed, the rank and ``t``, and the step count is checkpointed
(``crd_state``), so a resumed run draws the negatives the uninterrupted one would have drawn.

Under ``torchrun`` every rank gathers all ranks' embeddings and indices before updating its memory
(:func:`gather_updates`) and the first step's ``Z`` is averaged over the ranks, so the banks stay
identical on every rank; they are excluded from DistributedDataParallel's per-step buffer broadcast,
which would otherwise keep only rank 0's updates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from xkd.data.base import Batch, dataset_labels
from xkd.distill.adapters import LayerPairs, check_layer_pairs, model_device, probe_shapes, resolve_layer_pairs
from xkd.distill.base import DistillContext, Distiller
from xkd.distill.cat import capture_input, dry_run_input, last_linear
from xkd.distill.logits import StepCounter, kd_loss
from xkd.distill.relation import embed
from xkd.errors import ConfigError
from xkd.models.hooks import capture_features
from xkd.registry import DISTILLERS

PAPER_K = 16384
"""The paper's number of negatives (CIFAR-100)."""

NCE_EPS = 1e-7


# ----------------------------------------------------------------------------------------------
# the contrastive loss and the memory bank, as functions


def nce_loss(scores: Tensor, n_data: int) -> Tensor:
    """RepDistiller's ``ContrastLoss`` (Tian et al. 2020, eq. 18): ``scores (B, K+1)`` are the
    normalised ``h`` of the positive (column 0) and the ``K`` negatives; with noise ``P_n = 1/N``::

        - (sum_b log(h_b0 / (h_b0 + K P_n + eps)) + sum_{b,k} log(K P_n / (h_bk + K P_n + eps))) / B
    """
    k = scores.shape[1] - 1
    noise = k / float(n_data)
    pos = scores[:, 0]
    neg = scores[:, 1:]
    log_d1 = torch.log(pos / (pos + noise + NCE_EPS))
    log_d0 = torch.log(noise / (neg + noise + NCE_EPS))
    return -(log_d1.sum() + log_d0.sum()) / scores.shape[0]


DENSE_RATIO = 8
"""Score against the whole memory (one matrix product) when it has at most this many rows per
sampled row (see :func:`contrast_exp`)."""


def contrast_exp(anchor: Tensor, memory: Tensor, rows: Tensor, temperature: float, dense: bool | None = None) -> Tensor:
    """``exp(memory[rows_b,j] . anchor_b / T)`` for ``anchor (B, d)``, ``memory (N, d)`` and
    ``rows (B, K+1)`` -> ``(B, K+1)``.

    RepDistiller gathers the ``B x (K+1) x d`` memory rows and multiplies them by the anchors; when
    the memory is not much larger than the sample (``dense``, default ``N <= 8 (K+1)``), xkd takes
    the scores against every row with one ``(B, d) x (d, N)`` product and picks the sampled ones:
    the same numbers without copying the rows (a whole CRD training step of the default models at
    ``N`` = 10,000, ``K`` = 9,000, batch 128 took 0.35 s instead of 2.2 s on a 2-core CPU)."""
    if dense is None:
        dense = memory.shape[0] <= DENSE_RATIO * rows.shape[1]
    if dense:
        scores = (anchor @ memory.t()).gather(1, rows)
    else:
        scores = torch.bmm(memory[rows], anchor.unsqueeze(2)).squeeze(2)
    return torch.exp(scores / temperature)


@torch.no_grad()
def momentum_update(memory: Tensor, index: Tensor, value: Tensor, momentum: float, inplace: bool = True) -> Tensor:
    """``memory[i] <- (m * memory[i] + (1 - m) * v) / ||...||`` for the rows ``index`` (RepDistiller's
    memory update). In place, or (``inplace=False``) into a new tensor, for a memory that a pending
    backward pass still reads (:func:`contrast_exp`'s dense product saves it); returns the memory."""
    rows = memory.index_select(0, index) * momentum + value.to(memory.dtype) * (1.0 - momentum)
    if inplace:
        return memory.index_copy_(0, index, F.normalize(rows, dim=1))
    return memory.index_copy(0, index, F.normalize(rows, dim=1))


def max_negatives(labels: Tensor) -> int:
    """``N - n_max``: the most negatives of other classes every image has (``n_max`` = the size of the
    largest class)."""
    return int(labels.numel() - torch.bincount(labels).max())


def sample_negatives(
    labels: Tensor, order: Tensor, start: Tensor, count: Tensor, k: int, generator: torch.Generator | None = None
) -> Tensor:
    """``K`` distinct dataset indices per image ``(B, K)``, drawn uniformly among the images of other
    classes than ``labels (B,)``. ``order`` lists the dataset's indices grouped by class (class ``c``
    at ``order[start[c] : start[c] + count[c]]``). Draws ``B x N`` uniform keys and keeps the ``K``
    smallest among the ``N - count[y]`` positions outside the image's class."""
    n = order.numel()
    keys = torch.rand(labels.shape[0], n, generator=generator, device=order.device)
    pool = (n - count[labels]).unsqueeze(1)  # positions 0 .. pool-1 are the other classes' images
    keys.masked_fill_(torch.arange(n, device=order.device).unsqueeze(0) >= pool, 2.0)
    pos = keys.topk(k, dim=1, largest=False, sorted=False).indices
    c_start, c_count = start[labels].unsqueeze(1), count[labels].unsqueeze(1)
    return order[pos + (pos >= c_start) * c_count]  # skip the image's own class block


def world_size() -> int:
    """Processes training together (``torchrun``), 1 otherwise."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@torch.no_grad()
def gather_updates(index: Tensor, *values: Tensor, rows: int) -> tuple[Tensor, ...]:
    """Under ``torchrun``: every rank's ``index`` and ``values`` (rows matching ``index``), so every
    rank applies the same memory updates and the memory banks stay identical; an image that appears
    twice (the sampler pads the last batches) gets its first row at every appearance, so a bank's
    ``index_copy_`` writes the same values whichever copy lands last. Unchanged in one process. Every
    rank must pass the same batch size (xkd's sharded loaders do); ``rows``: the banks' row count."""
    world = world_size()
    if world == 1:
        return (index, *values)
    out = []
    for t in (index, *values):
        parts = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(parts, t.contiguous())
        out.append(torch.cat(parts))
    index, values = out[0], out[1:]
    # the first position of each image, by scatter over the bank's rows (unique() would make the host
    # wait for the device at every step)
    position = torch.arange(index.numel(), device=index.device)
    first = torch.full((rows,), index.numel(), dtype=position.dtype, device=index.device)
    first = first.scatter_reduce_(0, index, position, "amin")[index]
    return (index, *(v[first] for v in values))


class ContrastHead(nn.Module):
    """CRD's trainable and stateful parts: the two embedding heads (linear, then L2 normalisation in
    :meth:`embed`), the memory bank ``memory_s``/``memory_t`` (``N x feat_dim``, initialised uniformly
    in ``[-a, a]``, ``a = 1/sqrt(feat_dim/3)``, as RepDistiller) and the constants ``z_s``/``z_t``
    (``-1`` until the first step sets them). The class grouping used to sample negatives is kept as
    non-persistent buffers (rebuilt from the data by :meth:`CRD.setup`)."""

    def __init__(self, s_dim: int, t_dim: int, feat_dim: int, labels: Tensor, seed: int = 0) -> None:
        super().__init__()
        self.embed_s = nn.Linear(s_dim, feat_dim)
        self.embed_t = nn.Linear(t_dim, feat_dim)
        n = labels.numel()
        g = torch.Generator().manual_seed(seed)
        a = 1.0 / math.sqrt(feat_dim / 3.0)
        self.register_buffer("memory_s", torch.rand(n, feat_dim, generator=g) * (2 * a) - a)
        self.register_buffer("memory_t", torch.rand(n, feat_dim, generator=g) * (2 * a) - a)
        self.register_buffer("z_s", torch.tensor(-1.0))
        self.register_buffer("z_t", torch.tensor(-1.0))
        count = torch.bincount(labels)
        self.register_buffer("labels", labels.clone(), persistent=False)
        self.register_buffer("order", torch.argsort(labels, stable=True), persistent=False)
        self.register_buffer("count", count, persistent=False)
        self.register_buffer("start", torch.cumsum(count, 0) - count, persistent=False)

    @property
    def n_data(self) -> int:
        return self.memory_s.shape[0]

    def embed(self, f_s: Tensor, f_t: Tensor) -> tuple[Tensor, Tensor]:
        """L2-normalised embeddings ``(B, feat_dim)`` of student and teacher features (RepDistiller's ``Embed``)."""
        v_s = F.normalize(self.embed_s(f_s.flatten(1)).float(), dim=1)
        v_t = F.normalize(self.embed_t(f_t.flatten(1)).float(), dim=1)
        return v_s, v_t


# ----------------------------------------------------------------------------------------------
# the distiller


@dataclass
class CRDParams:
    """CRD's parameters (defaults: RepDistiller's CRD command and options; see the module docstring).

    Attributes:
        beta: weight of the CRD term (``-b``), >= 0.
        ce_weight: weight of the cross-entropy with the labels (``-r``), >= 0.
        kd_weight: weight of a Hinton KD term (``-a``; 0 = CRD, 1 = "CRD+KD"), >= 0.
        temperature: the KD term's temperature (``kd_T``), > 0.
        feat_dim: embedding width (``feat_dim``), >= 1.
        nce_k: negatives per image; ``null`` = ``min(16384, N - n_max)``; more than ``N - n_max`` is
            an error at setup.
        nce_t: NCE temperature, > 0.
        nce_m: memory momentum, in ``[0, 1)``.
        layers: ``null`` (each classifier's input) or one ``[[student_path, teacher_path]]`` pair.
    """

    beta: float = 0.8
    ce_weight: float = 1.0
    kd_weight: float = 0.0
    temperature: float = 4.0
    feat_dim: int = 128
    nce_k: int | None = None
    nce_t: float = 0.07
    nce_m: float = 0.5
    layers: LayerPairs | None = None

    def validate(self) -> None:
        for key in ("beta", "ce_weight", "kd_weight"):
            value = getattr(self, key)
            if not (value >= 0 and math.isfinite(value)):
                raise ConfigError(f"{key} must be a finite number >= 0, got {value}")
        for key in ("temperature", "nce_t"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"{key} must be > 0, got {getattr(self, key)}")
        if self.feat_dim < 1:
            raise ConfigError(f"feat_dim must be >= 1, got {self.feat_dim}")
        if self.nce_k is not None and self.nce_k < 1:
            raise ConfigError(
                f"nce_k must be >= 1 or null (as many as the data allow, at most {PAPER_K}), got {self.nce_k}"
            )
        if not 0.0 <= self.nce_m < 1.0:
            raise ConfigError(f"nce_m must be in [0, 1), got {self.nce_m}")
        check_layer_pairs(self.layers)
        if self.layers is not None and len(self.layers) != 1:
            raise ConfigError(
                f"layers: CRD embeds one feature per model; give one [student_path, teacher_path] pair or null, got {len(self.layers)}"
            )


def resolve_nce_k(requested: int | None, labels: Tensor) -> int:
    """The number of negatives for a training split with ``labels``: ``requested``, or
    ``min(16384, N - n_max)`` when ``None``; a :class:`~xkd.errors.ConfigError` when the split has
    one class or ``requested`` exceeds ``N - n_max``."""
    n, most = labels.numel(), max_negatives(labels) if labels.numel() else 0
    if most < 1:
        raise ConfigError(
            "crd needs training images of at least two classes to draw negatives from; the training split has "
            + (f"{n} images, all of one class" if n else "no images")
        )
    if requested is None:
        return min(PAPER_K, most)
    if requested > most:
        largest = n - most
        raise ConfigError(
            f"nce_k = {requested} negatives per image, but the training split has {n} images and its largest class "
            f"{largest}, so an image of that class has only {most} images of other classes to contrast with; set "
            f"nce_k <= {most}, or null (min({PAPER_K}, {most}))"
        )
    return requested


@DISTILLERS.register("crd")
class CRD(Distiller):
    """Contrastive representation distillation (Tian et al., ICLR 2020, eq. 18 with RepDistiller's
    memory bank): terms ``ce``, ``crd`` and ``kd`` when ``kd_weight > 0``. Needs :meth:`setup` with
    the training split (the memory has one row per training image) and batches carrying their
    ``indices``."""

    Params = CRDParams

    def __init__(self, student: nn.Module, teacher: nn.Module | None = None, params: CRDParams | None = None):
        super().__init__(student, teacher, params)
        p: CRDParams = self.params
        if p.layers is None:
            self.paths = (last_linear(self.student, "student"), last_linear(self.teacher, "teacher"))
        else:
            self.paths = resolve_layer_pairs(p.layers, self.student, self.teacher)[0]
        self.head: ContrastHead | None = None
        self.nce_k: int | None = None
        self.seed = 0
        self._generator: torch.Generator | None = None
        self.counter = StepCounter()
        self._z_ready = False
        self._index_checked = False

    # -- features ----------------------------------------------------------------------------
    def _features(self, model: nn.Module, path: str, images: Tensor, detach: bool) -> tuple[Tensor, Tensor]:
        """``model``'s logits and its feature at ``path`` (the classifier's input by default)."""
        if self.params.layers is None:
            with capture_input(model.get_submodule(path)) as seen:
                logits = model(images)
            feat = seen["input"]
        else:
            with capture_features(model, [path], detach=detach) as feats:
                logits = model(images)
            feat = embed(feats[path], pool=True)
        return logits, feat.flatten(1)

    def feature_dims(self, sample: Tensor) -> tuple[int, int]:
        """Widths of the student's and the teacher's features, from eval-mode dry runs."""
        dims = []
        for model, path in zip((self.student, self.teacher), self.paths):
            if self.params.layers is None:
                flags = {m: m.training for m in model.modules()}
                try:
                    model.eval()
                    with torch.no_grad():
                        _, feat = self._features(model, path, dry_run_input(sample, model), True)
                finally:
                    for m, flag in flags.items():
                        m.training = flag
                dims.append(int(feat.shape[1]))
            else:
                shape = probe_shapes(model, [path], sample)[path]
                dims.append(int(shape[1]) if len(shape) == 4 else math.prod(shape[1:]))
        return dims[0], dims[1]

    def preflight(self, sample: Tensor) -> None:
        self.feature_dims(sample)

    def check_data(self, train: Any, augmented: bool = False) -> None:
        resolve_nce_k(self.params.nce_k, dataset_labels(train))

    def setup(self, context: DistillContext) -> None:
        """Size the memory bank from ``context.train`` (one row per image), resolve ``nce_k`` (a
        :class:`~xkd.errors.ConfigError` when it is too large) and build the embedding heads."""
        if context.train is None:
            raise ConfigError(
                "crd needs the training split (DistillContext.train): its memory bank has one row per image"
            )
        p: CRDParams = self.params
        labels = dataset_labels(context.train)
        self.nce_k = resolve_nce_k(p.nce_k, labels)
        s_dim, t_dim = self.feature_dims(context.sample)
        self.seed = context.seed
        self.head = ContrastHead(s_dim, t_dim, p.feat_dim, labels, context.seed).to(model_device(self.student))
        self._generator, self._z_ready, self._index_checked = None, False, False
        # under torchrun every rank applies every rank's memory updates (gather_updates): DDP must not
        # overwrite the banks with rank 0's at each step (a broadcast of 2 N x feat_dim floats)
        names = [f"head.{n}" for n, _ in self.head.named_buffers()]
        nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(self, names)

    def trainable_modules(self) -> nn.ModuleDict:
        modules = {"student": self.student}
        if self.head is not None:
            modules["crd"] = self.head  # its buffers (memory bank, Z) go into checkpoints with it
            modules["crd_state"] = self.counter  # the step count the negatives' draws are seeded by
        return nn.ModuleDict(modules)

    # -- the loss ----------------------------------------------------------------------------
    def _rng(self, device: torch.device, step: int | None = None) -> torch.Generator:
        """The generator of the negatives, on ``device``; seeded anew for training step ``step`` (a
        host-side seed: no synchronisation), so the draws of a step do not depend on the steps before."""
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device)
            step = self.counter.count if step is None else step
        if step is not None:
            rank = dist.get_rank() if world_size() > 1 else 0
            self._generator.manual_seed(((self.seed + 1 + 7919 * rank) * 1_000_003 + step) % 2**63)
        return self._generator

    def contrast(self, v_s: Tensor, v_t: Tensor, index: Tensor, negatives: Tensor) -> Tensor:
        """The CRD term (before ``beta``) for embeddings ``v_s``, ``v_t`` ``(B, d)`` of the images
        ``index (B,)`` against the memory rows ``negatives (B, K)``; sets ``Z`` at the first call and,
        in training mode, updates the memory rows ``index`` afterwards."""
        head = self.head
        rows = torch.cat([index.unsqueeze(1), negatives], dim=1)
        dense = head.n_data <= DENSE_RATIO * rows.shape[1]
        exp_s = contrast_exp(v_s, head.memory_t, rows, self.params.nce_t, dense)  # student anchor, teacher memory
        exp_t = contrast_exp(v_t, head.memory_s, rows, self.params.nce_t, dense)  # teacher anchor, student memory
        if not self._z_ready:
            if float(head.z_s) < 0:  # the first step: RepDistiller's Z = mean * N, fixed from then on
                z = torch.stack([exp_s.detach().mean(), exp_t.detach().mean()]).float() * head.n_data
                if world_size() > 1:  # the same constants on every rank: the mean of the ranks' estimates
                    dist.all_reduce(z)
                    z /= world_size()
                head.z_s.fill_(float(z[0]))
                head.z_t.fill_(float(z[1]))
            self._z_ready = True
        loss = nce_loss(exp_s / head.z_s, head.n_data) + nce_loss(exp_t / head.z_t, head.n_data)
        if self.training:  # the dense product's backward reads the memory as it was: update a copy
            m = self.params.nce_m
            index, new_s, new_t = gather_updates(index, v_s.detach(), v_t.detach(), rows=head.n_data)
            head.memory_s = momentum_update(head.memory_s, index, new_s, m, inplace=not dense)
            head.memory_t = momentum_update(head.memory_t, index, new_t, m, inplace=not dense)
        return loss

    def _check_index(self, index: Tensor) -> None:
        """Batch indices must name rows of the memory bank: images of the training split it was sized for.

        Checked on the first training batch after :meth:`setup` (a host sync; xkd's loaders then keep
        to the split) and on every batch in evaluation mode; a later training batch from another
        split fails in the gather (an IndexError on the CPU, a device-side assert on a GPU)."""
        n = self.head.n_data
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= n):
            raise ValueError(
                f"crd: batch indices {int(index.min())}..{int(index.max())} are not indices of the {n} training "
                "images its memory bank holds; feed it batches of the training split (DistillContext.train), "
                "also in evaluation mode (its contrastive term is defined on the training images only)"
            )
        self._index_checked = self.training

    def forward(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        if self.head is None:
            raise RuntimeError(
                "distiller 'crd': setup(context) was not run, so its memory bank does not exist; build it with "
                "build_distiller(..., context=DistillContext(sample=..., train=...)) or call setup() before training"
            )
        if batch.indices is None:
            raise ValueError(
                "crd reads and updates its memory bank by the training images' dataset indices, but this batch "
                "has none (Batch.indices); batches from xkd's loaders carry them"
            )
        p: CRDParams = self.params
        s_path, t_path = self.paths
        logits, f_s = self._features(self.student, s_path, batch.images, False)
        with torch.no_grad():
            t_logits, f_t = self._features(self.teacher, t_path, batch.images, True)
        index = batch.indices.to(self.head.memory_s.device, torch.long)
        if not self._index_checked or not self.training:  # once in training (no host sync per step)
            self._check_index(index)
        with torch.autocast(index.device.type, enabled=False):
            v_s, v_t = self.head.embed(f_s.float(), f_t.float())
            negatives = sample_negatives(
                self.head.labels[index],
                self.head.order,
                self.head.start,
                self.head.count,
                self.nce_k,
                self._rng(index.device, self.counter.tick() if self.training and torch.is_grad_enabled() else None),
            )
            crd = self.contrast(v_s, v_t, index, negatives)
        terms = {"ce": p.ce_weight * F.cross_entropy(logits, batch.labels), "crd": p.beta * crd}
        if p.kd_weight > 0:
            terms["kd"] = kd_loss(logits, t_logits, p.temperature, weight=p.kd_weight)
        return logits, terms
