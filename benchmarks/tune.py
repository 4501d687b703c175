"""Sweeps on MNIST-5k: the tuned config against the shipped one, and the epochs pruning saves.

    python benchmarks/tune.py                         # about 15 min on 2 cores
    python benchmarks/tune.py --trials 6 --epochs 2   # a quick look

Every run trains ``configs/mnist.yaml`` for the same budget of ``--epochs`` epochs (the shipped
config trains 10; the budget is shrunk to keep the whole benchmark under 25 minutes on 2 cores).

1. Two sweeps of ``--trials`` trials over ``configs/spaces/mnist.yaml``, TPE, same seed: one with
   the median pruner (the default), one without pruning. Trial 0 of each is the shipped config.
2. The median pruner replayed on the unpruned sweep's own curves (Optuna's MedianPruner, the same
   settings, the same trials in the same order): the epochs it would have saved, and whether the
   best trial survives (then the best fitness is equal by construction).
3. The shipped config and each sweep's best.yaml retrained with ``--seeds`` (the seed also
   draws the validation split, so these are scored on data the sweep did not select on).

One torch thread; trials run one after another in this process.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _common import REPO, machine_note, pin_threads, write_results

import optuna

import lightrainer as lt
from lightrainer.config import seed_all
from lightrainer.sweep import PRUNERS

CONFIG = REPO / "configs" / "mnist.yaml"
SPACE = REPO / "configs" / "spaces" / "mnist.yaml"


def best_val_acc(run_dir: str) -> float:
    """The best val/acc of a finished run (its results.csv)."""
    import csv

    with open(Path(run_dir) / "results.csv", newline="") as f:
        return max(float(r["val/acc"]) for r in csv.DictReader(f))


def retrain(cfg: lt.Config, seed: int, save_dir: str) -> float:
    """Train ``cfg`` with ``seed`` (as ``lightrainer fit`` does) and return its best val/acc."""
    from lightrainer.build import build_from_config

    cfg = cfg.replace(seed=seed, save_dir=save_dir, name=f"seed{seed}", plots=False)
    seed_all(cfg.seed)
    module, datamodule = build_from_config(cfg)
    lt.build_trainer(cfg, enable_progress_bar=False, enable_model_summary=False).fit(module, datamodule=datamodule)
    return best_val_acc(cfg.run_dir)


def replay_median(study: optuna.Study, epochs: int, trials: int) -> tuple[int, float, bool]:
    """Optuna's median pruner (the sweep's settings) on a finished unpruned study's curves, trial by
    trial in order: (epochs it trains, best fitness of the trials it keeps, best trial kept)."""
    replay = optuna.create_study(direction=study.direction, pruner=PRUNERS.get("median")(epochs, trials))
    used, kept = 0, []
    for trial in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)):
        live = replay.ask()
        curve = [trial.intermediate_values[e] for e in sorted(trial.intermediate_values)]
        for epoch, value in enumerate(curve):
            used += 1
            live.report(value, epoch)
            if epoch + 1 < len(curve) and live.should_prune():  # as the sweep: never at the last epoch
                replay.tell(live, state=optuna.trial.TrialState.PRUNED)
                break
        else:
            replay.tell(live, trial.value)
            kept.append(trial)
    best = max(kept, key=lambda t: t.value)
    return used, best.value, best.number == study.best_trial.number


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2], help="seeds of the retraining")
    parser.add_argument("--keep", default=None, help="a folder to keep the sweeps in (default: a temporary one)")
    args = parser.parse_args()
    pin_threads(1)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in ("lightning.pytorch", "lightrainer"):  # the sweep's own line per trial stays
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("lightrainer.sweep").setLevel(logging.INFO)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    note = machine_note(1)
    root = args.keep or tempfile.mkdtemp(prefix="tune_bench_")
    shipped = lt.load_config(CONFIG, epochs=args.epochs, device="cpu", save_dir=root, plots=False)

    sweeps = {}
    for pruner in ("median", "none"):
        started = time.perf_counter()
        study, best, folder = lt.tune(shipped.replace(name=f"mnist_{pruner}"), SPACE, trials=args.trials,
                                      sampler="tpe", pruner=pruner)
        sweeps[pruner] = (study, best, time.perf_counter() - started, folder)

    full = args.trials * args.epochs
    scores = {"shipped": [retrain(shipped, s, f"{root}/shipped") for s in [0, *args.seeds]]}
    rows = [{"variant": "shipped config", "trials": 1, "pruned": 0, "epochs": args.epochs, "epochs_saved": "",
             "best_val_acc": scores["shipped"][0], "wall_s": ""}]
    for pruner, (study, best, wall, _) in sweeps.items():
        done = study.get_trials()
        pruned = sum(t.state == optuna.trial.TrialState.PRUNED for t in done)
        epochs = sum(t.user_attrs.get("epochs", 0) for t in done)
        scores[pruner] = [study.best_value] + [retrain(best, s, f"{root}/best_{pruner}") for s in args.seeds]
        rows.append({"variant": f"sweep, TPE, pruner {pruner}", "trials": len(done), "pruned": pruned,
                     "epochs": epochs, "epochs_saved": 1 - epochs / full, "best_val_acc": study.best_value,
                     "wall_s": wall})
    used, replay_best, survived = replay_median(sweeps["none"][0], args.epochs, args.trials)
    rows.append({"variant": "pruner none, median replayed", "trials": args.trials,
                 "pruned": "", "epochs": used, "epochs_saved": 1 - used / full, "best_val_acc": replay_best,
                 "wall_s": ""})
    for row, key in zip(rows, ["shipped", "median", "none", None]):
        for i, seed in enumerate(args.seeds):
            row[f"val_acc_seed{seed}"] = scores[key][i + 1] if key else ""
        row["mean_val_acc_retrained"] = statistics.mean(scores[key][1:]) if key else ""
    write_results("tune", rows, f"Sweeps on MNIST-5k: tuned vs shipped config, {args.epochs} epochs a run", [
        note,
        f"every run trains configs/mnist.yaml for {args.epochs} epochs (shipped: 10; shrunk so that the benchmark "
        f"stays under 25 min on 2 cores); {args.trials} trials a sweep over configs/spaces/mnist.yaml "
        f"({', '.join(sweeps['none'][0].best_params)}), TPE, seed 0; trial 0 of each sweep is the shipped config",
        "best_val_acc: the best epoch's val/acc of the sweep's best trial (seed 0's validation split: the one the "
        "sweep selected on); val_acc_seedN: the shipped config, or the sweep's best.yaml, retrained with seed N "
        "(another validation split); epochs_saved: 1 - epochs trained / (trials x epochs); wall_s: seconds of the "
        "sweep on a machine shared with other jobs (compare epochs, not seconds)",
        f"median replayed: Optuna's MedianPruner with the sweep's settings on the unpruned sweep's curves; its best "
        f"trial {'survives, so the best fitness is equal' if survived else 'is pruned'}",
    ])


if __name__ == "__main__":
    sys.exit(main())
