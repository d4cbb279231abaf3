"""Distillers: one class per method, registered by name.

Importing this package registers the built-in distillers: ``scratch``, ``hinton_kd``,
``label_smoothing``, ``dkd``, ``dist`` (logits); ``fitnets``, ``at``, ``nst``, ``ab``, ``vid`` (features);
``sp``, ``rkd``, ``pkt`` (relations); ``medtex``, ``medex``, ``medtex_student_only`` (MED-TEX and
its ablations); ``xdistill`` (XDistillation); ``cat_kd`` (class activation transfer);
``crd`` (contrastive representation distillation); ``e2kd`` (explanation-enhanced KD);
``teacher_assistant`` (a chain teacher -> assistant -> student).
"""

from xkd.distill.assistant import TeacherAssistant
from xkd.distill.base import DistillContext, Distiller, build_distiller, distiller_params
from xkd.distill.cae import CAE
from xkd.distill.cat import CATKD
from xkd.distill.crd import CRD
from xkd.distill.e2kd import E2KD
from xkd.distill.feature import NST, VID, ActivationBoundaries, AttentionTransfer, FitNets
from xkd.distill.logits import (
    DIST,
    DKD,
    HintonKD,
    LabelSmoothing,
    Scratch,
    dist_terms,
    dkd_terms,
    kd_loss,
    soft_log_targets,
)
from xkd.distill.medtex import (
    ExplainerNet,
    MaskedStudent,
    MedEx,
    MedTex,
    MedTexStudentOnly,
    teacher_cross_entropy,
)
from xkd.distill.relation import PKT, RKD, SP
from xkd.distill.vid import VIDLoss
from xkd.distill.xdistill import XDistillation, XDistillParams, XDistillStudent

__all__ = [
    "CAE",
    "CATKD",
    "CRD",
    "DIST",
    "DKD",
    "E2KD",
    "NST",
    "PKT",
    "RKD",
    "SP",
    "TeacherAssistant",
    "VID",
    "ActivationBoundaries",
    "AttentionTransfer",
    "DistillContext",
    "Distiller",
    "ExplainerNet",
    "FitNets",
    "HintonKD",
    "LabelSmoothing",
    "MaskedStudent",
    "MedEx",
    "MedTex",
    "MedTexStudentOnly",
    "Scratch",
    "VIDLoss",
    "XDistillParams",
    "XDistillStudent",
    "XDistillation",
    "build_distiller",
    "distiller_params",
    "dist_terms",
    "dkd_terms",
    "kd_loss",
    "soft_log_targets",
    "teacher_cross_entropy",
]
