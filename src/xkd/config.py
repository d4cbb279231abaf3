"""Typed run configuration: YAML -> dataclasses (validated by :mod:`xkd.plan`; files and ``--set``
overrides are read and written by :mod:`xkd.config_files`).

Errors name the key path (``students[1].params.alpha``) and the allowed values. Method parameters
live next to their method as small dataclasses and are validated with :func:`from_dict` too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from xkd.errors import ConfigError
from xkd.plugins import import_plugins

# ----------------------------------------------------------------------------------------------
# schema


@dataclass
class AugmentConfig:
    """Training-time augmentation of ``data.augment``, all off by default; applied batch-wise on the
    device by :class:`xkd.data.augment.BatchAugment` (see there for the details). Evaluation never
    augments.

    Attributes:
        crop_padding: pad by this many pixels, then crop back to the image size at a random offset
            (the CIFAR recipe uses 4); 0 = off.
        crop_padding_mode: what the padding holds: ``zero`` (black, as torchvision's ``RandomCrop``)
            or ``reflect`` (the mirrored border).
        hflip: flip each image horizontally with probability 0.5.
        resized_crop: ``[min, max]`` fraction of the image area cropped (aspect ratio in [3/4, 4/3])
            and resized back to the image size, e.g. ``[0.8, 1.0]``; None = off.
        rotation: rotate by an angle drawn uniformly from ``[-rotation, rotation]`` degrees; 0 = off.
        color_jitter: brightness, contrast and saturation factors drawn from
            ``[1 - color_jitter, 1 + color_jitter]``; RGB data only; 0 = off.
    """

    crop_padding: int = 0
    crop_padding_mode: Literal["zero", "reflect"] = "zero"
    hflip: bool = False
    resized_crop: list[float] | None = None
    rotation: float = 0.0
    color_jitter: float = 0.0

    @property
    def enabled(self) -> bool:
        """Whether any option is on."""
        return bool(
            self.crop_padding > 0
            or self.hflip
            or self.resized_crop is not None
            or self.rotation > 0
            or self.color_jitter > 0
        )

    def validate(self) -> None:
        if self.crop_padding < 0:
            raise ConfigError(f"crop_padding must be >= 0 pixels (0 = off), got {self.crop_padding}")
        if self.resized_crop is not None:
            rc = self.resized_crop
            if len(rc) != 2 or not 0.0 < rc[0] <= rc[1] <= 1.0:
                raise ConfigError(
                    f"resized_crop must be [min, max] area fractions with 0 < min <= max <= 1 "
                    f"(e.g. [0.8, 1.0]; null = off), got {rc}"
                )
        if not 0.0 <= self.rotation <= 180.0:
            raise ConfigError(f"rotation must be in [0, 180] degrees (0 = off), got {self.rotation}")
        if not 0.0 <= self.color_jitter <= 1.0:
            raise ConfigError(f"color_jitter must be in [0, 1] (0 = off), got {self.color_jitter}")


@dataclass
class DataConfig:
    """Which dataset to build and how much of it.

    Attributes:
        name: a registered dataset (``xkd list``).
        root: folder for ``imagefolder`` or a folder of Fashion-MNIST idx files.
        image_size: resize images to ``image_size`` x ``image_size`` (None keeps the native size).
        train_size, val_size, test_size: seeded, class-stratified subsets (None = all).
        seed: seed of the split and of generated data.
        params: builder-specific options (e.g. ``lesions``: ``num_per_class``, ``size``).
        augment: training-time augmentation (:class:`AugmentConfig`; all off by default).
    """

    name: str = "fashion-mnist"
    root: str | None = None
    image_size: int | None = None
    train_size: int | None = None
    val_size: int | None = None
    test_size: int | None = None
    seed: int = 0
    params: dict[str, Any] = field(default_factory=dict)
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class ModelConfig:
    """A registered model name or a dotted import path ``package.module:Class`` / ``package.module.Class``.

    ``params`` are keyword arguments of the builder; ``pretrained`` asks for downloaded weights.
    """

    name: str = "kdfmv_cnn"
    pretrained: bool = False
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class OptimizerConfig:
    """``fused``: torch's one-kernel update (``auto``: on a GPU, where small models are launch-bound)."""

    name: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    fused: bool | Literal["auto"] = "auto"


@dataclass
class SchedulerConfig:
    name: Literal["none", "cosine", "step"] = "none"
    step_size: int = 10
    gamma: float = 0.1


@dataclass
class TrainConfig:
    """Optimisation budget and how the steps run.

    Attributes:
        epochs, batch_size, optimizer, scheduler: the budget.
        num_workers: worker processes for datasets that decode lazily (image folders); ``auto``:
            one per CPU core but one, at most 8. In-memory datasets are gathered by index in the
            training process (and, on a GPU, held on the device when they fit).
        max_steps_per_epoch: caps an epoch (for quick tests).
        amp: mixed precision: ``auto`` (bf16 on a CUDA device that supports it, off elsewhere),
            ``bf16``, ``fp16`` (CUDA only, with a gradient scaler) or ``off``.
        channels_last: train in the channels-last memory layout (faster convolutions on GPUs).
        compile: run the training step through ``torch.compile``.
        tensorboard: write TensorBoard event files (:mod:`xkd.tracking`). The students' ``train``
            switches it for the whole run; ``teacher.train.tensorboard: false`` leaves out the
            teacher's curves only. Never part of a cache key.
    """

    epochs: int = 5
    batch_size: int = 128
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    num_workers: int | Literal["auto"] = "auto"
    max_steps_per_epoch: int | None = None
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"
    channels_last: bool = False
    compile: bool = False
    tensorboard: bool = True


@dataclass
class TeacherConfig:
    """The teacher: trained first (or loaded from the cache / ``checkpoint``)."""

    model: ModelConfig = field(default_factory=lambda: ModelConfig(name="cifar_resnet"))
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: str | None = None


@dataclass
class StudentConfig:
    """One student: a label, a registered distiller and its parameters, optionally its own model."""

    name: str = "kd"
    distiller: str = "hinton_kd"
    params: dict[str, Any] = field(default_factory=dict)
    model: ModelConfig | None = None


@dataclass
class ExplainerConfig:
    """One explainer of the evaluation: registered ``name`` (``+superpixel`` for the superpixel form),
    its ``params``, and the ``label`` it is recorded and shown under (default: the name; set it to
    run one explainer twice, e.g. UniCAM's ``distilled`` and ``residual`` kinds)."""

    name: str = "grad_cam"
    params: dict[str, Any] = field(default_factory=dict)
    label: str | None = None

    @property
    def key(self) -> str:
        return self.label or self.name


@dataclass
class EvaluationConfig:
    """What is explained and scored after training.

    Attributes:
        explainers: registered explainers to run on teacher and every student (``name+superpixel``
            gives any explainer's XDistillation superpixel form; ``unicam`` runs on students only).
        metrics: registered metrics to compute (``xkd list``); None: every metric declared on by
            default (the plan writes the list out). Those that need masks are skipped on data
            without masks (with a warning when listed), and the test-split metrics (accuracy, cost) always run.
        metric_params: keyword arguments per metric, e.g. ``{road: {percentages: [0.2, 0.5]}}``.
        superpixel: SLIC options of the superpixel metrics (``n_segments`` = XDistillation's k, 19).
        num_images: test images explained for the explanation metrics (None = whole test set).
        samples_per_class: images per class in the report's overlay grid.
        batch_size: batch size of explaining and scoring.
        fidelity_keep: fraction of most-salient pixels kept by the fidelity metric. 0.5 by default:
            keeping 20% of Fashion-MNIST's pixels makes images so unlike the training data that a
            Grad-CAM map scored no better than a random map (0.12 vs 0.18 for the default teacher),
            while at 50% it separates them (0.61 vs 0.32).
        agreement_top_k: fraction of pixels in the teacher-student top-k% IoU.
        met_images: images timed for the mean execution time of each explainer.
        sanity_images: images explained at every step of the randomisation sanity check.
        transfer_layers: ``{teacher: path, student: path}`` matched layers of FSS/RS (None entries:
            each model's default layer, the one Grad-CAM explains).
    """

    explainers: list[ExplainerConfig] = field(
        default_factory=lambda: [ExplainerConfig("grad_cam"), ExplainerConfig("feature_maps")]
    )
    metrics: list[str] | None = None
    metric_params: dict[str, dict[str, Any]] = field(default_factory=dict)
    superpixel: dict[str, Any] = field(default_factory=dict)
    num_images: int | None = 256
    samples_per_class: int = 2
    batch_size: int = 64
    fidelity_keep: float = 0.5
    agreement_top_k: float = 0.1
    met_images: int = 32
    sanity_images: int = 8
    transfer_layers: dict[str, str | None] = field(default_factory=dict)


@dataclass
class CompareConfig:
    """How ``xkd compare`` repeats the run and what it ranks on.

    Attributes:
        seeds: number of seeds; seed ``i`` runs with ``seed + i`` (the students' initialisation,
            data order and explained images change; the data split and the teacher stay fixed).
        agreement_explainer: the explainer (its ``label``, or name) whose teacher-student agreement
            is the headline "explanation agreement" (None: the first configured explainer that has
            agreement records, i.e. not ``feature_maps`` or a pair explainer).
        agreement_metric: the agreement metric of that explainer used as the headline
            (``rank_correlation``, ``top_k_agreement``, ``map_pearson``, ``closer_to_teacher``,
            ``superpixel_mse`` or ``superpixel_sign_agreement``); it must be among ``evaluation.metrics``.
    """

    seeds: int = 3
    agreement_explainer: str | None = None
    agreement_metric: str = "rank_correlation"


@dataclass
class DiffROARConfig:
    """DiffROAR of ``xkd study kd-vs-ls`` (:mod:`xkd.studies.diffroar`).

    Attributes:
        explainer: the explainer whose maps rank the pixels (registered name).
        explainer_params: its parameters.
        fractions: the fractions ``k`` of pixels kept, each in (0, 1).
        epochs: training epochs of each retrained model (few: it runs on small data here).
        batch_size: its batch size.
        lr: its Adam learning rate.
        model: the retrained architecture (None: ``student_model``).
    """

    explainer: str = "grad_cam"
    explainer_params: dict[str, Any] = field(default_factory=dict)
    fractions: list[float] = field(default_factory=lambda: [0.1, 0.3, 0.5])
    epochs: int = 3
    batch_size: int = 64
    lr: float = 2e-3
    model: ModelConfig | None = None

    def validate(self) -> None:
        if not self.fractions or any(not 0.0 < f < 1.0 for f in self.fractions):
            raise ConfigError(f"fractions must be a non-empty list of values in (0, 1), got {self.fractions}")
        if self.epochs < 1:
            raise ConfigError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.lr <= 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")


@dataclass
class StudyConfig:
    """Options of ``xkd study`` (read by the studies only; ``xkd run`` and ``xkd compare`` ignore them).

    Attributes:
        concepts: the data set dissected for concept detectors (None: the run's data); it must
            have concept masks (``concepts``, ``lesions``, or an ``imagefolder`` with masks).
        layer: module path of the students' dissected layer (None: each model's default layer).
        teacher_layer: the same for the teacher (None: its default layer).
        quantile: per-unit activation quantile of network dissection (Bau et al.: 0.995).
        iou_threshold: IoU above which a unit is a detector for its best concept (0.05).
        explainer: explainer of the ground-truth precision/recall (and its ``explainer_params``).
        region_fraction: fraction of most salient pixels scored against the discriminative region.
        diffroar: :class:`DiffROARConfig`.
        teachers: the teachers of growing capacity of ``xkd study capacity-gap`` (at least 3).
        assistant: the assistant of the teacher -> assistant -> student chain for the largest gap.
        distiller: how every student learns from its teacher (and from the assistant) in that study.
        params: that distiller's parameters.
        data_fractions: the fractions of the training split that ``xkd study explanation-transfer``
            distils with (class-stratified; the teacher always trains on the largest).
        equal_steps: in that study, scale the students' epochs at each smaller fraction so that they
            take as many optimiser steps as at the largest (a student that sees 5% of the images for
            the same number of epochs takes 1/20 of the steps and has barely started training).
    """

    concepts: DataConfig | None = None
    layer: str | None = None
    teacher_layer: str | None = None
    quantile: float = 0.995
    iou_threshold: float = 0.05
    explainer: str = "grad_cam"
    explainer_params: dict[str, Any] = field(default_factory=dict)
    region_fraction: float = 0.1
    diffroar: DiffROARConfig = field(default_factory=DiffROARConfig)
    teachers: list[ModelConfig] = field(default_factory=list)
    assistant: ModelConfig | None = None
    distiller: str = "hinton_kd"
    params: dict[str, Any] = field(default_factory=dict)
    data_fractions: list[float] = field(default_factory=lambda: [1.0, 0.05])
    equal_steps: bool = True

    def validate(self) -> None:
        if not 0.0 < self.quantile < 1.0:
            raise ConfigError(f"quantile must be in (0, 1), got {self.quantile}")
        if not 0.0 <= self.iou_threshold < 1.0:
            raise ConfigError(f"iou_threshold must be in [0, 1), got {self.iou_threshold}")
        if not 0.0 < self.region_fraction <= 1.0:
            raise ConfigError(f"region_fraction must be in (0, 1], got {self.region_fraction}")


@dataclass
class SweepObjective:
    """One score ``xkd sweep`` optimises, read from a trial's records (:mod:`xkd.sweeps.plan`).

    Attributes:
        metric: ``val_accuracy`` (the student's best validation accuracy, what the pruner watches),
            a test-split metric (``accuracy``, ``macro_f1``, ``loss``, ``posthoc_agreement``,
            ``params``, ``flops``) or any recorded column of a metric in ``evaluation.metrics``
            (``rank_correlation``, ``fidelity``, ``fss``, ``met``, ...).
        student: the student it is read for (None: the student whose settings the sweep searches,
            or the only student).
        explainer: the explainer's label, for explanation metrics (None: the only configured one).
        direction: ``maximize`` or ``minimize`` (None: the metric's declared direction).
    """

    metric: str = "val_accuracy"
    student: str | None = None
    explainer: str | None = None
    direction: Literal["maximize", "minimize"] | None = None


@dataclass
class SweepConfig:
    """Options of ``xkd sweep`` (read by the sweep only; ``xkd run`` and ``xkd compare`` ignore them).

    Attributes:
        params: the searched settings, by config path (``students.1.params.alpha``), each a
            distribution: ``{uniform: [low, high]}``, ``{log_uniform: [low, high]}``,
            ``{int: [low, high]}`` (``step: k`` optional for ``uniform`` and ``int``) or
            ``{categorical: [a, b, ...]}``.
        objectives: the scores optimised (:class:`SweepObjective`); empty: the validation accuracy
            of the tuned student. Two or more give a Pareto front.
        sampler: ``tpe``, ``random`` or ``nsga2`` (None: ``tpe`` for one objective, ``nsga2`` for several).
        pruner: ``median`` (stop a trial whose tuned student's validation accuracy after an epoch is
            below the median of earlier trials at that epoch) or ``none``; None: ``median`` when
            there is one objective to maximise (Optuna prunes single-objective studies only), else ``none``.
        trials: finished (complete or pruned) trials the study ends with, counted over every process.
        seed: the sampler's seed (None: the run's ``seed``).
    """

    params: dict[str, Any] = field(default_factory=dict)
    objectives: list[SweepObjective] = field(default_factory=list)
    sampler: Literal["tpe", "random", "nsga2"] | None = None
    pruner: Literal["median", "none"] | None = None
    trials: int = 20
    seed: int | None = None


@dataclass
class TrackingConfig:
    """An experiment tracker the run also logs to (:mod:`xkd.tracking`); TensorBoard is separate
    (``train.tensorboard``) and on by default.

    Attributes:
        backend: ``none`` or ``mlflow`` (needs ``pip install 'xkd[mlflow]'``).
        uri: the MLflow tracking URI (a server ``http://host:5000``, ``sqlite:///path.db``, ...);
            None: ``$MLFLOW_TRACKING_URI`` when set, else ``sqlite:///<output_dir>/mlruns/mlflow.db``
            (artifacts in ``<output_dir>/mlruns/artifacts/``).
        experiment: the MLflow experiment the run is logged under.
        run_name: the MLflow run's name; None: the config's ``name`` (a comparison names its seeds
            ``<name>/seed_N``, a sweep its trials ``<sweep folder>/trial-NNNN``).
    """

    backend: Literal["none", "mlflow"] = "none"
    uri: str | None = None
    experiment: str = "xkd"
    run_name: str | None = None


@dataclass
class RunConfig:
    """A whole run: data, teacher, students, training budget, evaluation.

    ``train`` is the students' budget; the teacher has its own under ``teacher.train``. ``student_model`` is the
    default architecture of every student. ``compare`` is read by ``xkd compare`` only, ``study`` by ``xkd study``
    only, ``sweep`` by ``xkd sweep`` only. ``deterministic`` asks torch for deterministic algorithms (same seed,
    same numbers; see the README for what may still differ on a GPU). ``plugins``: the user's modules,
    imported as the config is built, so that the names they register can be used in it.
    """

    plugins: list[str] = field(default_factory=list)
    name: str = "default"
    seed: int = 0
    output_dir: str = "runs"
    cache_dir: str | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    deterministic: bool = False
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student_model: ModelConfig = field(default_factory=ModelConfig)
    students: list[StudentConfig] = field(
        default_factory=lambda: [
            StudentConfig("scratch", "scratch"),
            StudentConfig("kd", "hinton_kd"),
            StudentConfig("ls", "label_smoothing"),
        ]
    )
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)
    study: StudyConfig = field(default_factory=StudyConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        if isinstance(self.plugins, str):  # from Python: read letter by letter otherwise
            raise ConfigError(f"plugins must be a list of module names, e.g. [{self.plugins!r}]")
        import_plugins(self.plugins)
