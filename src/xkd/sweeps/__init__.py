"""``xkd sweep``: hyper-parameter search with Optuna, every trial an ordinary xkd run.

- :mod:`xkd.sweeps.plan`: the ``sweep:`` section checked and resolved (searched config paths and
  their distributions, objectives read from a run's records);
- :mod:`xkd.sweeps.study`: the Optuna study (storage, sampler, pruner, workers, budget) and the
  trial that runs ``xkd run``;
- :mod:`xkd.sweeps.outputs`: the sweep folder, ``best.yaml``, ``records/sweep.json`` and ``sweep.html``.
"""

from xkd.sweeps.study import sweep

__all__ = ["sweep"]
