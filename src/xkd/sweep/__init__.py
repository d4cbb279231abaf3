"""``xkd sweep``: hyper-parameter search with Optuna, every trial an ordinary xkd run.

- :mod:`xkd.sweep.plan`: the ``sweep:`` section checked and resolved (searched config paths and
  their distributions, objectives read from a run's records);
- :mod:`xkd.sweep.study`: the Optuna study (storage, sampler, pruner, workers, budget) and the
  trial that runs ``xkd run``;
- :mod:`xkd.sweep.outputs`: the sweep folder, ``best.yaml``, ``records/sweep.json`` and ``sweep.html``.
"""

from xkd.sweep.study import sweep

__all__ = ["sweep"]
