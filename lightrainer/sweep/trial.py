"""One trial: the config with the trial's values, a fit of it with its fitness reported, its
result told to the study, and the one line it prints."""

from __future__ import annotations

import contextlib
import copy
import logging
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Iterator, Mapping

from lightrainer.build import build_from_config, trainer_kwargs
from lightrainer.config import Config, seed_all
from lightrainer.errors import TrainingDiverged
from lightrainer.io import atomic_write
from lightrainer.sweep.report import TrialReport
from lightrainer.sweep.samplers import import_optuna
from lightrainer.sweep.sections import section_spec, split_path
from lightrainer.sweep.space import Space
from lightrainer.trainer import build_trainer

log = logging.getLogger(__name__)

#: The folder of the sweep that holds a failed trial's traceback.
ERRORS_DIR = "errors"


def apply_params(base: Config, params: Mapping[str, Any], **overrides: Any) -> Config:
    """``base`` with a trial's values: flat keys replaced, class arguments set in their sections.

    Raises:
        ConfigError: a combination the config refuses (both ptq and qat, ...).
    """
    sections: dict[str, Any] = {}
    for path, value in params.items():
        if "." not in path:
            continue
        section, names = split_path(path)
        if section not in sections:
            sections[section] = copy.deepcopy(section_spec(base, section))
        spec = sections[section]
        for name in names[:-1]:
            spec = spec.setdefault("init_args", {})[name]
        spec.setdefault("init_args", {})[names[-1]] = value
    flat = {k: v for k, v in params.items() if "." not in k}
    return base.replace(**flat, **sections, **overrides)


def _trainer_kwargs(cfg: Config) -> dict[str, Any]:
    """The ``trainer:`` section's arguments, built; a trial shows no progress bar or summary."""
    return {"enable_progress_bar": False, "enable_model_summary": False, **trainer_kwargs(cfg)}


@contextlib.contextmanager
def quiet_logs(quiet: bool = True) -> Iterator[None]:
    """Lightning's, lightrainer's and Optuna's info lines off while trials run (each trial
    prints one line of its own; its files hold the rest)."""
    if not quiet:
        yield
        return
    names = ("lightning.pytorch", "lightning.fabric", "lightrainer", "optuna")
    saved = {name: logging.getLogger(name).level for name in names}
    # Every module of lightrainer.sweep keeps its info lines (below "lightrainer", set to WARNING).
    sweep_log = logging.getLogger("lightrainer.sweep")
    own = sweep_log.level
    for name in names:
        logging.getLogger(name).setLevel(logging.WARNING)
    sweep_log.setLevel(logging.INFO)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module="lightning")
            yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)
        sweep_log.setLevel(own)


def one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def run_trial(study: Any, trial: Any, base: Config, space: Space, folder: Path, quiet: bool = True) -> dict[str, Any]:
    """Run one trial: a fit of ``base`` with the trial's values in ``folder/trial_NNN``, its
    fitness reported each epoch; the trial is told its result (complete, pruned, failed).

    Returns:
        A summary for the log line: number, params, state, value, epochs, time, note.
    """
    params = {k.key: k.suggest(trial) for k in space.keys}
    start = time.time()
    report = TrialReport(trial)
    error: BaseException | None = None
    run = f"trial_{trial.number:03d}"
    try:
        cfg = apply_params(base, params, save_dir=str(folder), name=run, exist_ok=False)
        with quiet_logs(quiet):
            seed_all(cfg.seed)  # the network starts as `lightrainer fit --config trial/args.yaml` would
            module, datamodule = build_from_config(cfg)
            trainer = build_trainer(cfg, callbacks=[report], **_trainer_kwargs(cfg))
            run = Path(cfg.run_dir).name
            trial.set_user_attr("run", run)
            trainer.fit(module, datamodule=datamodule, weights_only=True)
    except TrainingDiverged as err:
        report.diverged = " ".join(str(err).split())
    except Exception as err:  # noqa: BLE001 - a crashing trial is recorded and the sweep goes on
        error = err
        _write_error(folder, run, err)
    except BaseException:
        # Killed from the keyboard (Lightning turns Ctrl-C into SystemExit): --resume runs it again.
        trial.set_user_attr("interrupted", True)
        study.tell(trial, state=import_optuna().trial.TrialState.FAIL)
        raise
    seconds = time.time() - start
    trial.set_user_attr("time_s", round(seconds, 2))
    trial.set_user_attr("epochs", report.epochs)
    states = import_optuna().trial.TrialState
    summary = {"number": trial.number, "params": params, "value": report.best, "epochs": report.epochs,
               "time_s": seconds, "run": run, "metric": report.monitor}
    if error is None and report.diverged is None and report.best is None:
        error = RuntimeError(f"the fitness {report.monitor} was never logged")
    if error is not None:
        note = one_line(error)
        trial.set_user_attr("error", note)
        study.tell(trial, state=states.FAIL)
        return {**summary, "state": "failed", "note": note}
    if report.diverged is not None:
        trial.set_user_attr("diverged", report.diverged)
        study.tell(trial, state=states.PRUNED)
        return {**summary, "state": "pruned", "note": f"diverged: {report.diverged}"}
    if report.pruned_at is not None:
        trial.set_user_attr("pruned_at", report.pruned_at + 1)
        study.tell(trial, state=states.PRUNED)
        return {**summary, "state": "pruned", "note": f"pruned after epoch {report.pruned_at + 1}"}
    study.tell(trial, report.best)
    return {**summary, "state": "complete", "note": ""}


def _write_error(folder: Path, run: str, err: BaseException) -> None:
    """The full traceback of a failed trial, in ``errors/trial_NNN.txt`` (its one line is in the table)."""
    with contextlib.suppress(OSError):
        (folder / ERRORS_DIR).mkdir(exist_ok=True)
        atomic_write(folder / ERRORS_DIR / f"{run}.txt", "".join(traceback.format_exception(err)))


def format_params(params: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def log_trial(summary: Mapping[str, Any], trials: int, prefix: str = "") -> None:
    """The one line a finished trial prints."""
    value, state = summary.get("value"), summary["state"]
    shown = f"{summary['metric']} {value:.4f}" if isinstance(value, float) else ""
    took = f"{summary['epochs']} epochs, {summary['time_s']:.1f} s"
    if state == "complete":
        tail = f"{shown} ({took})"
    elif state == "pruned":
        tail = f"pruned ({summary['note'].replace('pruned ', '')}), {shown or 'no fitness'} ({took})"
    else:
        tail = f"{state}: {summary['note']} ({took})"
    log.info("%strial %d: %s -> %s", prefix, summary["number"], format_params(summary["params"]), tail)
