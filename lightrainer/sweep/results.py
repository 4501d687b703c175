"""What a sweep writes: the results table (``tune_results.csv``/``.md``), ``best.yaml``, Optuna's
pictures, and the summary it logs."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

from lightrainer.config import Config, config_yaml
from lightrainer.io import atomic_write
from lightrainer.tables import csv_text, markdown_table
from lightrainer.plots import _pyplot, save_figure
from lightrainer.sweep.space import Space
from lightrainer.sweep.states import state_of
from lightrainer.sweep.trial import apply_params, format_params, one_line
from lightrainer.task import resolve_fitness

log = logging.getLogger(__name__)

#: Files of the sweep folder.
RESULTS_CSV, RESULTS_MD, BEST_FILE = "tune_results.csv", "tune_results.md", "best.yaml"


def result_rows(study: Any, space: Space, metric: str) -> list[dict[str, Any]]:
    """A row per trial: number, state, fitness, epochs, time, each key, the run folder, a note."""
    trials = study.get_trials(deepcopy=False)
    reruns = {t.user_attrs.get("rerun_of"): t.number for t in trials if t.user_attrs.get("rerun_of") is not None}
    hosts = {t.user_attrs.get("host") for t in trials if t.user_attrs.get("host")}
    rows = []
    for t in trials:
        state, attrs = state_of(t), t.user_attrs
        value = t.value if t.state.name == "COMPLETE" else (
            t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None)
        note = attrs.get("error") or (f"diverged: {attrs['diverged']}" if attrs.get("diverged") else "")
        if attrs.get("pruned_at"):
            note = f"pruned after epoch {attrs['pruned_at']}"
        if state == "interrupted":
            note = "process killed" + (f"; run again as trial {reruns[t.number]}" if t.number in reruns else "")
        if attrs.get("rerun_of") is not None:
            note = f"runs trial {attrs['rerun_of']} again" + (f"; {note}" if note else "")
        if attrs.get("baseline"):
            note = "the config's own values" + (f"; {note}" if note else "")
        row: dict[str, Any] = {"trial": t.number, "state": state, metric: value,
                               "epochs": attrs.get("epochs", len(t.intermediate_values)),
                               "time_s": attrs.get("time_s", "")}
        row.update({k: t.params.get(k, "") for k in space.names()})
        row["run"] = attrs.get("run", "")
        if len(hosts) > 1:
            row["host"] = attrs.get("host", "")
        row["note"] = note
        rows.append(row)
    return rows


def best_trial(study: Any) -> Any | None:
    """The best complete trial, or None before one completes."""
    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    if not complete:
        return None
    return study.best_trial


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def write_tables(study: Any, folder: Path, space: Space, base: Config) -> list[Path]:
    """``tune_results.csv`` and ``.md`` (a row per trial) and ``best.yaml``, written atomically."""
    metric, mode = resolve_fitness(base.task_class, base.fitness)
    rows = result_rows(study, space, metric)
    if not rows:
        return []
    files = [atomic_write(folder / RESULTS_CSV, csv_text(rows, lambda v: "" if v is None else v))]
    best = best_trial(study)
    counts = {s: sum(r["state"] == s for r in rows) for s in dict.fromkeys(r["state"] for r in rows)}
    lines = [f"## Sweep {folder.name}", "",
             f"{len(rows)} trials ({', '.join(f'{n} {s}' for s, n in counts.items())}); fitness {metric} ({mode}).",
             f"Best: trial {best.number}, {metric} {_cell(best.value)} ({format_params(best.params)}); "
             f"train it: `lightrainer fit --config {folder / BEST_FILE}`" if best else "No trial has completed yet.",
             ""]
    table = markdown_table(rows, _cell, bold=lambda row: best is not None and row["trial"] == best.number)
    files.append(atomic_write(folder / RESULTS_MD, "\n".join(lines) + "\n" + table))
    if best is not None:
        files.append(write_best(best, base, folder, metric))
    return files


def best_config(trial: Any, base: Config) -> Config:
    """The base config with the trial's values (a config ``lightrainer fit`` trains)."""
    return apply_params(base, trial.params)


def write_best(trial: Any, base: Config, folder: Path, metric: str) -> Path:
    """``best.yaml``: the best trial's config; ``lightrainer fit --config best.yaml`` trains it."""
    head = (f"# The best trial of the sweep {folder}: trial {trial.number} ({trial.user_attrs.get('run', '')}), "
            f"{metric} {trial.value:.6g}\n# with {format_params(trial.params)}.\n"
            f"# Train it: lightrainer fit --config {folder / BEST_FILE}\n")
    return atomic_write(folder / BEST_FILE, head + config_yaml(best_config(trial, base)))


#: The pictures of a finished sweep: file -> Optuna's matplotlib plot.
PICTURES = {
    "tune_history.png": "plot_optimization_history",
    "tune_importances.png": "plot_param_importances",
    "tune_parallel.png": "plot_parallel_coordinate",
    "tune_slice.png": "plot_slice",
    "tune_intermediate.png": "plot_intermediate_values",
}


def write_pictures(study: Any, folder: Path, metric: str) -> list[Path]:
    """Optuna's pictures of the sweep (history, importances, parallel coordinates, a slice per
    key, the fitness per epoch of every trial); one that cannot be drawn yet is skipped."""
    import numpy as np

    plt = _pyplot()
    from optuna.visualization import matplotlib as plots

    written = []
    keys = len(study.user_attrs.get("space") or {}) or 1
    # Categorical numbers ([16, 32]) make matplotlib log a line per axis; nothing to act on.
    category = logging.getLogger("matplotlib.category")
    level = category.level
    category.setLevel(logging.WARNING)
    try:
        for name, function in PICTURES.items():
            kwargs = {} if function == "plot_intermediate_values" else {"target_name": metric}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    axes = np.atleast_1d(getattr(plots, function)(study, **kwargs))
                except (ValueError, RuntimeError, ZeroDivisionError) as err:
                    log.info("%s not drawn: %s", name, one_line(err))
                    plt.close("all")
                    continue
                figure = axes.flat[0].figure
                if name == "tune_intermediate.png":
                    axes.flat[0].set_ylabel(metric)
                    axes.flat[0].set_xlabel("epoch (0: the first)")
                if name == "tune_slice.png":
                    figure.set_size_inches(max(4.0 * axes.size, 6.0), 4.0)
                if name == "tune_parallel.png":
                    figure.set_size_inches(max(1.6 * (keys + 1) + 2.0, 7.0), 5.0)
                figure.tight_layout()
            written.append(save_figure(figure, folder / name))
    finally:
        category.setLevel(level)
    return written


def log_summary(study: Any, folder: Path, metric: str, pictures: list[Path]) -> None:
    trials = study.get_trials(deepcopy=False)
    counts = {s: sum(state_of(t) == s for t in trials) for s in dict.fromkeys(state_of(t) for t in trials)}
    log.info("sweep done: %s; %s, %s", ", ".join(f"{n} {s}" for s, n in counts.items()),
             folder / RESULTS_CSV, ", ".join(p.name for p in pictures) or "no pictures")
    best = best_trial(study)
    if best is None:
        log.warning("no trial completed: see %s", folder / RESULTS_MD)
        return
    log.info("best: trial %d, %s %.4f (%s); train it: lightrainer fit --config %s", best.number, metric, best.value,
             format_params(best.params), folder / BEST_FILE)
