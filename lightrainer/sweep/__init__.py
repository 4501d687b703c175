"""Sweeps: tune any YAML key with Optuna, on one machine or a cluster; every trial is a run.

``lightrainer tune --config C.yaml --space S.yaml --trials N`` (or :func:`tune` in a notebook).
The space file names flat keys (and ``model.init_args...`` / ``data.init_args...`` paths), each
with a distribution::

    lr0: {low: 1.0e-4, high: 1.0e-1, log: true}   # a range: float or int as the key is
    warmup_epochs: {low: 0, high: 3}
    optimizer: [SGD, AdamW]                      # a list: the choices
    model.init_args.net.init_args.width: [16, 32, 64]
    sampler: tpe                                 # optional settings: sampler, pruner

Every key and value is validated with the config's own rules before anything is created.
Optuna runs underneath: the study lives in the sweep folder (``<save_dir>/tune/<name>[N]/
study.db``, SQLite) or in ``--storage URL``; a pruner judges each trial's fitness per epoch;
the direction is the task's fitness direction. Each trial is an ordinary run
(``<sweep>/trial_000/``); the sweep folder gets ``tune_results.csv/.md``, ``best.yaml`` and
Optuna's pictures.

Scale-out uses existing engines: ``--workers K`` starts K processes on this machine that share
the study (one GPU each where there are GPUs); ``--storage URL`` lets several machines join one
study (PostgreSQL/MySQL); ``--backend ray`` runs each trial as a Ray task on a Ray cluster,
with the study served to the tasks by Optuna's gRPC storage proxy.

Which trials count toward ``--trials``: complete, pruned, running, and failed by their own error.
A trial whose process was killed (``interrupted``) does not count: ``--resume`` runs its
parameters again as a new trial.

The package holds one idea a module, listed bottom to top; imports point one way: a module imports
only those listed before it.

1. ``space``: :class:`KeySpace`, :class:`Space` (the validated space, plain data);
2. ``samplers``: the ``SAMPLERS``/``PRUNERS`` registries and Optuna's import;
3. ``sections``: ``model.init_args...``/``data.init_args...`` paths (the class arguments tuned);
4. ``space_file``: :func:`load_space`: a space file read and validated;
5. ``states``: which trials count, which were killed (pure decisions);
6. ``study``: the :class:`~lightrainer.sweep.study.Job`, the storage, the study, recovery;
7. ``report``: :class:`TrialReport`, the per-epoch callback of a trial;
8. ``trial``: one trial run, told and logged;
9. ``results``: the tables, ``best.yaml``, the pictures, the summary;
10. ``options``: :class:`SweepOptions`;
11. ``workers``: a worker's loop and ``--workers K`` processes;
12. ``ray_backend``: ``--backend ray``;
13. this ``__init__``: a whole sweep (:func:`run_sweep`, :func:`tune`, ``lightrainer tune``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sys
import time
import typing
from pathlib import Path
from typing import Any, Iterator, Mapping, NamedTuple, Union

import yaml

from lightrainer.config import Config, ConfigError, config_yaml, load_config
from lightrainer.errors import closest_hint
from lightrainer.logs import install_fallback_handler
from lightrainer.io import atomic_write
from lightrainer.runs import create_run_dir, run_folders
from lightrainer.sweep.options import BACKENDS, SweepOptions
from lightrainer.sweep.ray_backend import import_ray, run_ray
from lightrainer.sweep.report import TrialReport
from lightrainer.sweep.results import best_config, best_trial, log_summary, write_pictures, write_tables
from lightrainer.sweep.samplers import PRUNERS, SAMPLERS, import_optuna
from lightrainer.sweep.space import KeySpace, Space
from lightrainer.sweep.space_file import load_space
from lightrainer.sweep.states import counts_toward, dead_trials, reruns_needed, state_of
from lightrainer.sweep.study import (
    Job,
    check_joined_study,
    create_study,
    live_trials,
    open_storage,
    open_study,
    recover,
)
from lightrainer.sweep.workers import run_workers, work
from lightrainer.task import resolve_fitness

log = logging.getLogger(__name__)

#: Files of the sweep folder.
CONFIG_FILE, SPACE_FILE, STUDY_FILE = "config.yaml", "space.yaml", "study.db"

#: Keys a resumed sweep may change in its base config (where and how trials run, not what they train).
RESUMABLE_KEYS = frozenset({"save_dir", "name", "exist_ok", "device", "devices", "num_workers", "plots",
                            "tensorboard", "wandb", "wandb_project", "wandb_offline"})


class TuneResult(NamedTuple):
    """What :func:`tune` returns: ``study, best, folder = lightrainer.tune(...)``."""

    study: Any
    best_config: Config | None
    folder: Path


def check_options(options: SweepOptions, cfg: Config, space: Space) -> tuple[str, str]:
    """Refuse flags that do not go together, before anything is created; returns (sampler, pruner).

    Raises:
        ConfigError: one line naming the flag.
    """
    for name in ("trials", "workers"):
        value = getattr(options, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"tune: --{name} must be an integer >= 1, got {value!r}")
    for name, low in (("timeout", 0), ("cpus_per_trial", 0), ("gpus_per_trial", -1)):
        value = getattr(options, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= low):
            raise ConfigError(f"tune: --{name} must be a number {'>= 0' if low < 0 else '> 0'}, got {value!r}")
    if options.backend not in BACKENDS:
        raise ConfigError(f"tune: --backend {options.backend!r} is not one of {', '.join(BACKENDS)}"
                          + closest_hint(str(options.backend), BACKENDS))
    if options.address and options.backend != "ray":
        raise ConfigError("tune: --address names a Ray cluster: add --backend ray")
    if options.workers > 1 and (cfg.devices or 1) > 1:
        raise ConfigError(f"tune: --workers {options.workers} runs each trial on one device, but devices: {cfg.devices}: "
                          "drop devices (or run one worker)")
    sampler = SAMPLERS.canonical(options.sampler or space.sampler or "tpe", "tune: --sampler")
    pruner = PRUNERS.canonical(options.pruner or space.pruner or "median", "tune: --pruner")
    if sampler == "grid":
        try:
            space.grid_size()
        except ConfigError as err:
            raise ConfigError(f"tune: {err}") from None
    import_optuna()
    if options.backend == "ray":
        import_ray()
    return sampler, pruner


def sweep_folder(cfg: Config, resume: bool) -> Path:
    """``save_dir/tune/name``: a new folder (claimed, numbered), or with ``resume`` the newest
    existing one.

    Raises:
        ConfigError: ``resume`` and there is none.
    """
    root = Path(cfg.save_dir) / "tune"
    if resume:
        found = [p for p in run_folders(root, cfg.name) if (p / SPACE_FILE).is_file()]
        if not found:
            raise ConfigError(f"tune: --resume: no sweep {root / cfg.name}[N] to resume (none holds {SPACE_FILE})")
        return found[-1]
    return create_run_dir(root, cfg.name)


def _differences(asked: Config, saved: Config) -> list[str]:
    mine, theirs = {**asked.to_dict(), **asked.sections}, {**saved.to_dict(), **saved.sections}
    return [f"{k}: {theirs.get(k)!r} in the sweep, {v!r} asked" for k, v in mine.items()
            if k not in RESUMABLE_KEYS and k != "trainer" and theirs.get(k) != v]


def _resumed_base(folder: Path, cfg: Config, space: Space) -> Config:
    """The base config a resumed sweep keeps (its own), after checking the command line agrees.

    Raises:
        ConfigError: the space or a training key differs from the sweep's.
    """
    saved_space = yaml.safe_load((folder / SPACE_FILE).read_text()) or {}
    if saved_space != space.to_data():
        raise ConfigError(f"tune: --resume: the space differs from the sweep's ({folder / SPACE_FILE}); resume with "
                          "the same space file, or start a new sweep (without --resume)")
    saved = load_config(folder / CONFIG_FILE, task_class=cfg.task_class)
    differences = _differences(cfg, saved)
    if differences:
        raise ConfigError(f"tune: --resume: the command line changes what the trials of {folder} train "
                          f"({'; '.join(differences)}); only {', '.join(sorted(RESUMABLE_KEYS))} may change")
    return saved.replace(**{k: v for k, v in cfg.to_dict().items() if k in RESUMABLE_KEYS - {"save_dir", "name", "exist_ok"}})


def run_sweep(cfg: Config, options: SweepOptions) -> TuneResult:
    """A sweep: validate, claim the folder, create (or resume) the study, run the trials here,
    in worker processes or as Ray tasks, then write the tables, ``best.yaml`` and the pictures.

    Raises:
        ConfigError: a bad space file or flag (nothing is created), a resume that does not match.
    """
    space = load_space(options.space, cfg)
    sampler, pruner = check_options(options, cfg, space)
    trials = options.trials
    if sampler == "grid" and space.grid_size() < trials:
        log.info("the grid has %d points: the sweep runs %d trials", space.grid_size(), space.grid_size())
        trials = space.grid_size()
    shared = open_storage(options.storage) if options.storage else None
    if shared is not None:
        with _optuna_quiet(import_optuna()):
            check_joined_study(shared, cfg.name, cfg, space)  # before this machine's folder exists
    folder = sweep_folder(cfg, options.resume)
    base = _resumed_base(folder, cfg, space) if options.resume else cfg
    if not options.resume:
        atomic_write(folder / CONFIG_FILE, config_yaml(cfg))
        atomic_write(folder / SPACE_FILE, yaml.safe_dump(space.to_data(), sort_keys=False))
    url = options.storage or f"sqlite:///{(folder / STUDY_FILE).resolve()}"
    job = Job(folder=str(folder), study_name=cfg.name, storage=url, trials=trials, sampler=sampler, pruner=pruner,
              config=config_yaml(base), space=space.to_data(), quiet=options.quiet,
              deadline=time.time() + options.timeout if options.timeout else None,
              import_paths=[p for p in sys.path if p and Path(p).is_dir()])
    optuna = import_optuna()
    with _optuna_quiet(optuna):
        storage = shared or open_storage(url)
        study = create_study(job, base, space, storage)
        if options.resume and not options.storage and live_trials(study):
            live = live_trials(study)[0]
            raise ConfigError(f"tune: --resume: trial {live.number} of {folder} is still running (process "
                              f"{live.user_attrs.get('pid')}): stop that sweep first, or wait for it")
        queued = recover(study, storage)
        done = sum(counts_toward(t) for t in study.get_trials(deepcopy=False))
        metric, mode = resolve_fitness(base.task_class, base.fitness)
        log.info("sweep %s: %d trials over %s (%s sampler, %s pruner, %s %s)%s%s", folder, trials,
                 ", ".join(space.names()), sampler, pruner, "max" if mode == "max" else "min", metric,
                 f"; {done} done already" if done else "",
                 f"; trial(s) {', '.join(map(str, queued))} run again" if queued else "")
        if options.backend == "ray":
            run_ray(job, base, space, options)
        elif options.workers > 1:
            run_workers(job, options.workers, base)
        else:
            work(job, base, space, study=open_study(job, base, space, storage=storage))
        study = optuna.load_study(study_name=job.study_name, storage=storage)
        write_tables(study, folder, space, base)
        pictures = write_pictures(study, folder, metric)
    best = best_trial(study)
    log_summary(study, folder, metric, pictures)
    return TuneResult(study, best_config(best, base) if best else None, folder)


@contextlib.contextmanager
def _optuna_quiet(optuna: Any) -> Iterator[None]:
    """Optuna's own info lines off (each trial logs one line of ours)."""
    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(level)


def tune(
    cfg: Union[Config, str, os.PathLike, Mapping[str, Any]],
    space: Union[str, os.PathLike, Mapping[str, Any]],
    trials: int = 20,
    *,
    resume: bool = False,
    workers: int = 1,
    storage: str | None = None,
    backend: str = "optuna",
    address: str | None = None,
    sampler: str | None = None,
    pruner: str | None = None,
    timeout: float | None = None,
    cpus_per_trial: float = 1.0,
    gpus_per_trial: float | None = None,
    quiet: bool = True,
    **overrides: Any,
) -> TuneResult:
    """Tune the keys of ``space`` over ``trials`` runs of ``cfg`` (``lightrainer tune`` in Python).

    Args:
        cfg: a :class:`Config`, a YAML file or a mapping of keys.
        space: a space file or a mapping: key -> ``{low, high, log, step}`` or a list of choices.
        trials: trials that count (complete, pruned or failed; killed ones are run again).
        resume: continue the newest sweep ``save_dir/tune/name[N]``.
        workers: trials at once on this machine (processes), or Ray tasks at once.
        storage: an Optuna database URL shared by several machines (PostgreSQL/MySQL).
        backend: "optuna" (this machine) or "ray" (tasks on a Ray cluster at ``address``).
        sampler: tpe (default), random, grid, cmaes, gp.
        pruner: median (default), percentile, hyperband, halving, none.
        timeout: no trial starts after this many seconds.
        cpus_per_trial, gpus_per_trial: Ray resources of a trial.
        quiet: keep Lightning's lines out (one line per trial).
        **overrides: keys that replace those of ``cfg`` (``epochs=3``).

    Returns:
        ``TuneResult(study, best_config, folder)``: the Optuna study, the best trial's config
        (None when none completed), the sweep folder.

    Raises:
        ConfigError: a bad space, key or option (before anything is created).
    """
    if isinstance(cfg, Config):
        cfg = cfg.replace(**overrides) if overrides else cfg
    else:
        cfg = load_config(cfg, **overrides)
    options = SweepOptions(space=space, trials=trials, resume=resume, workers=workers, storage=storage,
                           backend=backend, address=address, sampler=sampler, pruner=pruner, timeout=timeout,
                           cpus_per_trial=cpus_per_trial, gpus_per_trial=gpus_per_trial, quiet=quiet)
    install_fallback_handler()  # a notebook that set up no logging still sees the trial lines
    return run_sweep(cfg, options)


def add_tune_arguments(parser: Any) -> None:
    """The flags of ``lightrainer tune`` beside the config's keys."""
    from jsonargparse import ActionYesNo

    # Numbers are read as Any and checked by check_options: one line naming the flag, not the parser's.
    parser.add_argument("--space", type=typing.Optional[str], default=None,
                        help="the space file (required): key: {low, high, log} or [choices]")
    parser.add_argument("--trials", type=Any, default=20, help="trials that count (complete, pruned, failed)")
    parser.add_argument("--resume", action=ActionYesNo, default=False,
                        help="continue the newest sweep save_dir/tune/name[N] (an interrupted trial runs again)")
    parser.add_argument("--workers", type=Any, default=1, help="trials at once on this machine (one GPU each)")
    parser.add_argument("--storage", type=typing.Optional[str], default=None,
                        help="an Optuna database URL several machines share (postgresql://..., mysql://...)")
    parser.add_argument("--backend", type=str, default="optuna", help="optuna (this machine) or ray (a Ray cluster)")
    parser.add_argument("--address", type=typing.Optional[str], default=None, help="the Ray cluster (ray://host:10001, auto)")
    parser.add_argument("--sampler", type=typing.Optional[str], default=None,
                        help=f"one of {', '.join(SAMPLERS)} (default: the space file's, else tpe)")
    parser.add_argument("--pruner", type=typing.Optional[str], default=None,
                        help=f"one of {', '.join(PRUNERS)} (default: the space file's, else median)")
    parser.add_argument("--timeout", type=Any, default=None, help="no trial starts after this many seconds")
    parser.add_argument("--cpus_per_trial", type=Any, default=1.0, help="Ray: CPUs of a trial")
    parser.add_argument("--gpus_per_trial", type=Any, default=None,
                        help="Ray: GPUs of a trial (default: 1 where the cluster has GPUs)")


def tune_command(cfg: Config, values: Mapping[str, Any]) -> TuneResult:
    """``lightrainer tune``: the sweep the parsed flags describe."""
    if not values.get("space"):
        raise ConfigError("tune: --space is required: a space file of keys to tune, key: {low: ..., high: ...} or "
                          "key: [choice, ...] (see configs/spaces/digits.yaml)")
    names = [f.name for f in dataclasses.fields(SweepOptions) if f.name != "quiet"]
    return run_sweep(cfg, SweepOptions(**{k: values[k] for k in names if k in values}))


__all__ = ["KeySpace", "PRUNERS", "SAMPLERS", "Space", "SweepOptions", "TrialReport", "TuneResult", "add_tune_arguments",
           "counts_toward", "dead_trials", "load_space", "reruns_needed", "run_sweep", "state_of", "tune",
           "tune_command"]
