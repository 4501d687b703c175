"""Optuna's samplers and pruners by name (the registries a space file and ``--sampler``/``--pruner``
choose from), and Optuna itself, imported when a sweep asks for it."""

from __future__ import annotations

from typing import Any, Callable

from lightrainer.errors import MissingDependencyError
from lightrainer.registry import Registry
from lightrainer.sweep.space import Space


def import_optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise MissingDependencyError('lightrainer tune needs Optuna: pip install "lightrainer[tune]"') from None
    return optuna


#: name -> builder(space, seed, trials) -> optuna sampler.
SAMPLERS: Registry[Callable[..., Any]] = Registry("sampler")

#: name -> builder(epochs, trials) -> optuna pruner.
PRUNERS: Registry[Callable[..., Any]] = Registry("pruner")


@SAMPLERS.register("tpe")
def _tpe(space: Space, seed: int, trials: int) -> Any:
    # Optuna starts TPE with 10 random trials; a sweep of 12 would be a random search: a third.
    return import_optuna().samplers.TPESampler(seed=seed, n_startup_trials=min(10, max(2, trials // 3)))


@SAMPLERS.register("random")
def _random(space: Space, seed: int, trials: int) -> Any:
    return import_optuna().samplers.RandomSampler(seed=seed)


@SAMPLERS.register("grid")
def _grid(space: Space, seed: int, trials: int) -> Any:
    class SweepGrid(import_optuna().samplers.GridSampler):
        """Optuna's grid; the sweep stops at the grid's size itself (GridSampler's own stop works
        only inside ``study.optimize``, and the sweep asks and tells)."""

        def after_trial(self, study: Any, trial: Any, state: Any, values: Any) -> None:
            return None

    return SweepGrid({k.key: k.grid() for k in space.keys}, seed=seed)


@SAMPLERS.register("cmaes")
def _cmaes(space: Space, seed: int, trials: int) -> Any:
    try:
        import cmaes  # noqa: F401 - Optuna's CMA-ES sampler imports it lazily; fail now, by name
    except ImportError:
        raise MissingDependencyError("sampler cmaes needs the cmaes package: pip install cmaes") from None
    return import_optuna().samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)


@SAMPLERS.register("gp")
def _gp(space: Space, seed: int, trials: int) -> Any:
    return import_optuna().samplers.GPSampler(seed=seed)


def startup_trials(trials: int) -> int:
    """Finished trials before the median pruner judges: a fifth of the sweep, 1 to 5."""
    return min(5, max(1, trials // 5))


def warmup_epochs_unjudged(epochs: int) -> int:
    """Epochs a trial trains before the median pruner judges it: a third of the run, at least one
    (an early epoch, often still in lr warmup, says little about where a run ends)."""
    return max(1, epochs // 3)


@PRUNERS.register("median")
def _median(epochs: int, trials: int) -> Any:
    return import_optuna().pruners.MedianPruner(n_startup_trials=startup_trials(trials),
                                          n_warmup_steps=warmup_epochs_unjudged(epochs))


@PRUNERS.register("percentile")
def _percentile(epochs: int, trials: int) -> Any:
    return import_optuna().pruners.PercentilePruner(25.0, n_startup_trials=startup_trials(trials),
                                              n_warmup_steps=warmup_epochs_unjudged(epochs))


@PRUNERS.register("hyperband")
def _hyperband(epochs: int, trials: int) -> Any:
    return import_optuna().pruners.HyperbandPruner(min_resource=1, max_resource=max(epochs, 1))


@PRUNERS.register("halving")
def _halving(epochs: int, trials: int) -> Any:
    return import_optuna().pruners.SuccessiveHalvingPruner(min_resource=1)


@PRUNERS.register("none")
def _no_pruner(epochs: int, trials: int) -> Any:
    return import_optuna().pruners.NopPruner()
