"""The studies of ``xkd study``: claims of the sources re-measured on the user's models and data.

- ``kd-vs-ls`` (:mod:`xkd.studies.kd_vs_ls`): KD vs label smoothing vs scratch (Han et al., ICML 2023).
- ``capacity-gap`` (:mod:`xkd.studies.capacity_gap`): teachers of growing size and a teacher assistant
  (UniCAM, Adhane et al. 2024; Mirzadeh et al., AAAI 2020).
- ``explanation-transfer`` (:mod:`xkd.studies.explanation_transfer`): e2KD vs KD on agreement with the
  teacher's explanations, accuracy and data size (Parchami-Araghi et al., ECCV 2024; Ojha et al. 2023).

Each registers its ``run_study(cfg, seeds, *, resume, overwrite, progress) -> Path`` in
:data:`xkd.registry.STUDIES`. All are built on :func:`xkd.comparison.compare` (multi-seed runs of one
config) and write ``records/study.json`` and ``study.html`` next to it.
"""

from xkd.studies import capacity_gap, explanation_transfer, kd_vs_ls

__all__ = ["capacity_gap", "explanation_transfer", "kd_vs_ls"]
