"""`lightrainer tune`: the space file (every key and value validated, one clear line each), a
sweep on the digits config (tune_results, best.yaml, pictures, trials that are ordinary runs),
pruning, a crashing trial, kill -9 then --resume, --workers 2 and a Ray-backed sweep."""

from __future__ import annotations

import csv
import logging
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

optuna = pytest.importorskip("optuna")

import lightrainer as lt  # noqa: E402
from lightrainer.cli import main  # noqa: E402
from lightrainer.sweep import (  # noqa: E402
    PRUNERS,
    SAMPLERS,
    KeySpace,
    counts_toward,
    dead_trials,
    load_space,
    reruns_needed,
    state_of,
)
from test_hostile import NAN_NET  # noqa: E402  (a network whose output turns NaN after 2 training batches)

#: A digits trial in about a second: 10 training batches, 3 validation batches an epoch.
QUICK = ["--trainer.limit_train_batches", "10", "--trainer.limit_val_batches", "3", "--plots", "False",
         "--device", "cpu", "--num_workers", "0"]
QUICK_KW = {"plots": False, "device": "cpu", "num_workers": 0}
QUICK_TRAINER = {"trainer": {"limit_train_batches": 10, "limit_val_batches": 3}}


@pytest.fixture
def digits(repo_path: str) -> str:
    return os.path.join(repo_path, "configs", "digits.yaml")


@pytest.fixture
def cfg(digits: str) -> lt.Config:
    return lt.load_config(digits)


def rows(folder: Path) -> list[dict]:
    with open(folder / "tune_results.csv", newline="") as f:
        return list(csv.DictReader(f))


def study_of(folder: Path, name: str = "digits"):
    return optuna.load_study(study_name=name, storage=f"sqlite:///{folder / 'study.db'}")


# ---------------------------------------------------------------------------------- the space file
def test_shipped_space_files_validate(cfg: lt.Config, repo_path: str) -> None:
    space = load_space(os.path.join(repo_path, "configs", "spaces", "digits.yaml"), cfg)
    kinds = {k.key: k for k in space.keys}
    assert kinds["lr0"] == KeySpace("lr0", "float", low=1e-4, high=3e-2, log=True)
    assert kinds["warmup_epochs"].kind == "float" and kinds["warmup_epochs"].low == 0.0  # a float key stays float
    assert kinds["optimizer"].choices == ("SGD", "Adam", "AdamW")
    assert kinds["model.init_args.net.init_args.width"].choices == (16, 32)
    assert (space.sampler, space.pruner) == ("tpe", "median")
    mnist = lt.load_config(os.path.join(repo_path, "configs", "mnist.yaml"))
    assert load_space(os.path.join(repo_path, "configs", "spaces", "mnist.yaml"), mnist).keys


def test_values_take_the_configs_spelling_and_types(cfg: lt.Config) -> None:
    space = load_space({"optimizer": ["adamw", "sgd"], "batch": [16, "32"], "epochs": {"low": 1, "high": 4},
                        "ema": [True, False]}, cfg)
    keys = {k.key: k for k in space.keys}
    assert keys["optimizer"].choices == ("AdamW", "SGD")
    assert keys["batch"].choices == (16, 32)
    assert keys["epochs"].kind == "int" and (keys["epochs"].low, keys["epochs"].high) == (1, 4)
    assert keys["ema"].choices == (True, False)


@pytest.mark.parametrize(
    "space, message",
    [
        ({"lr00": {"low": 1e-4, "high": 0.1}}, r"unknown key 'lr00' \(did you mean 'lr0'\?\)"),
        ({"lr0": {"low": -1, "high": 0.1}}, r"lr0: must be in \(0, 10\], got -1.0 \(the low end of the range\)"),
        ({"lr0": {"low": 1e-4}}, r"lr0: a range needs low and high \(missing high\)"),
        ({"batch": [32, "big"]}, r"batch: expected an integer, got 'big'"),
        ({"optimizer": ["SGD", "Adamm"]}, r"optimizer: 'Adamm' is not one of .*\(did you mean 'Adam'\?\)"),
        ({"optimizer": {"low": 0, "high": 1}}, r"optimizer is not a number: give a list of choices"),
        ({"epochs": {"low": 1, "high": 5.5}}, r"epochs: expected an integer, got 5.5"),
        ({"lr0": {"low": 0.1, "high": 0.01}}, r"lr0: low must be below high"),
        ({"weight_decay": {"low": 0, "high": 0.1, "log": True}}, r"weight_decay: log: true needs low > 0"),
        ({"lr0": {"low": 1e-3, "high": 0.1, "lg": True}}, r"unknown entry 'lg' in the range \(did you mean 'log'\?\)"),
        ({"lr0": 0.01}, r"lr0: 0.01 is one value; give a range .* or a list of choices"),
        ({"lr0": []}, r"lr0: an empty list of choices"),
        ({"name": ["a", "b"]}, r"name cannot be tuned: the sweep names its trials"),
        ({"fitness": ["loss"]}, r"fitness cannot be tuned"),
        ({"recon_weight": [1.0]}, r"it is a key of task vqvae, not of ClassificationModule"),
        ({"model.init_args.net.init_args.widht": [16]}, r"SmallCNN takes no argument 'widht' \(did you mean 'width'\?\)"),
        ({"model.init_args.net.init_args.width": {"low": 8, "high": 16.5}}, r"width: expected an integer, got 16.5"),
        ({"model.init_args.nope": [1]}, r"model: ClassificationModule takes no argument 'nope'"),
        ({"data.init_args.nope": [1]}, r"data: DigitsDataModule takes no argument 'nope'"),
        ({"model.net.width": [1]}, r"a class argument is written model.init_args.NAME"),
        ({"sampler": "tpee", "lr0": [0.1]}, r"sampler: 'tpee' is not one of .*\(did you mean 'tpe'\?\)"),
        ({"pruner": "medain", "lr0": [0.1]}, r"pruner: 'medain' is not one of .*\(did you mean 'median'\?\)"),
        ({"sampler": "tpe"}, r"names no key to tune"),
    ],
)
def test_a_bad_space_gets_one_clear_line(cfg: lt.Config, space: dict, message: str) -> None:
    with pytest.raises(lt.ConfigError, match=message):
        load_space(space, cfg)


@pytest.mark.parametrize(
    "space_text, flags, message",
    [
        ("lr00: {low: 0.001, high: 0.1}\n", [], r"unknown key 'lr00' \(did you mean 'lr0'\?\)"),
        ("lr0: {low: -1, high: 0.1}\n", [], r"lr0: must be in \(0, 10\]"),
        ("lr0: {low: 0.001}\n", [], r"missing high"),
        ("batch: [32, big]\n", [], r"batch: expected an integer"),
        ("lr0: [0.001, 0.01\n", [], r"malformed YAML"),
        ("lr0: {low: 0.001, high: 0.1}\n", ["--sampler", "grid"], r"sampler grid: lr0 is a range without a step"),
        ("lr0: [0.001]\n", ["--trials", "0"], r"--trials must be an integer >= 1, got 0"),
        ("lr0: [0.001]\n", ["--trials", "many"], r"--trials must be an integer >= 1, got 'many'"),
        ("lr0: [0.001]\n", ["--workers", "1.5"], r"--workers must be an integer >= 1, got 1.5"),
        ("lr0: [0.001]\n", ["--timeout", "-3"], r"--timeout must be a number > 0, got -3"),
        ("lr0: [0.001]\n", ["--backend", "rey"], r"--backend 'rey' is not one of optuna, ray \(did you mean 'ray'\?\)"),
        ("lr0: [0.001]\n", ["--pruner", "medain"], r"tune: --pruner: 'medain' is not one of .*\(did you mean 'median'\?\)"),
        ("lr0: [0.001]\n", ["--address", "auto"], r"--address names a Ray cluster: add --backend ray"),
        ("lr0: [0.001]\n", ["--resume"], r"--resume: no sweep .*digits\[N\] to resume"),
    ],
)
def test_cli_bad_space_exits_2_and_creates_nothing(tmp_path, capsys, digits: str, space_text: str, flags: list,
                                                    message: str) -> None:
    space = tmp_path / "space.yaml"
    space.write_text(space_text)
    save_dir = tmp_path / "runs"
    code = main(["tune", "--config", digits, "--space", str(space), "--save_dir", str(save_dir), *flags])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert re.search(message, err), err
    assert "README.md#" in err
    assert not save_dir.exists()  # nothing created


def test_cli_without_space_says_so(tmp_path, capsys, digits: str) -> None:
    assert main(["tune", "--config", digits, "--save_dir", str(tmp_path / "runs")]) == 2
    assert "tune: --space is required" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_grid_values_and_membership() -> None:
    assert KeySpace("batch", "int", low=16, high=64, step=16).grid() == [16, 32, 48, 64]
    assert KeySpace("lrf", "float", low=0.0, high=0.3, step=0.1).grid() == [0.0, 0.1, 0.2, 0.3]
    lr = KeySpace("lr0", "float", low=1e-4, high=1e-1, log=True)
    assert lr.contains(0.002) and not lr.contains(0.2) and not lr.contains("0.002")
    assert KeySpace("optimizer", "categorical", choices=("SGD", "AdamW")).contains("AdamW")
    assert not KeySpace("batch", "int", low=16, high=64, step=16).contains(40)


# ---------------------------------------------------------------------------------- which trials count
def _frozen(state: str, number: int = 0, **attrs):
    trial = optuna.trial.create_trial(state=getattr(optuna.trial.TrialState, state),
                                      value=1.0 if state == "COMPLETE" else None, user_attrs=attrs)
    trial.number = number
    return trial


def test_counting_rules_are_pure_decisions() -> None:
    trials = [
        _frozen("COMPLETE", 0), _frozen("PRUNED", 1), _frozen("FAIL", 2, error="RuntimeError: x"),
        _frozen("FAIL", 3, interrupted=True), _frozen("FAIL", 4, surplus=True), _frozen("WAITING", 5, rerun_of=3),
    ]
    assert [state_of(t) for t in trials] == ["complete", "pruned", "failed", "interrupted", "skipped", "waiting"]
    assert [counts_toward(t) for t in trials] == [True, True, True, False, False, False]
    assert reruns_needed(trials) == []  # trial 3 is queued again as trial 5
    assert [t.number for t in reruns_needed(trials[:5])] == [3]
    running = [_frozen("RUNNING", 6, host="here", pid=11), _frozen("RUNNING", 7, host="here", pid=12),
               _frozen("RUNNING", 8, host="there", pid=11)]
    assert [t.number for t in dead_trials(running, "here", lambda pid: pid == 12)] == [6]


@pytest.mark.parametrize("name", SAMPLERS.names())
def test_every_sampler_samples_the_space(cfg: lt.Config, name: str) -> None:
    if name == "cmaes":
        pytest.importorskip("cmaes")
    space = load_space({"lr0": {"low": 1e-4, "high": 1e-1, "log": True, **({} if name != "grid" else {})},
                        "batch": [16, 32]} if name != "grid" else {"lr0": [1e-3, 1e-2], "batch": [16, 32]}, cfg)
    study = optuna.create_study(sampler=SAMPLERS.get(name)(space, 0, 4), direction="maximize")
    for _ in range(4):
        trial = study.ask()
        values = {k.key: k.suggest(trial) for k in space.keys}
        assert 1e-4 <= values["lr0"] <= 1e-1 and values["batch"] in (16, 32)
        study.tell(trial, values["lr0"])
    if name == "grid":  # the grid visits each point once
        assert len({(t.params["lr0"], t.params["batch"]) for t in study.trials}) == 4


@pytest.mark.parametrize("name", PRUNERS.names())
def test_every_pruner_builds(name: str) -> None:
    assert isinstance(PRUNERS.get(name)(3, 10), optuna.pruners.BasePruner)


# ---------------------------------------------------------------------------------- sweeps that train
def test_cli_sweep_writes_results_best_yaml_and_pictures(tmp_path, caplog, digits: str) -> None:
    caplog.set_level(logging.INFO, logger="lightrainer.sweep")
    space = tmp_path / "space.yaml"
    space.write_text("lr0: {low: 1.0e-3, high: 1.0e-2, log: true}\noptimizer: [Adam, AdamW]\n"
                     "model.init_args.net.init_args.width: [16, 32]\n")
    save_dir = tmp_path / "runs"
    assert main(["tune", "--config", digits, "--space", str(space), "--trials", "3", "--epochs", "2",
                 "--save_dir", str(save_dir), "--pruner", "none", *QUICK]) == 0
    folder = save_dir / "tune" / "digits"
    table = rows(folder)
    assert [r["trial"] for r in table] == ["0", "1", "2"] and {r["state"] for r in table} == {"complete"}
    # Trial 0 runs the config's own values.
    assert (float(table[0]["lr0"]), table[0]["optimizer"], table[0]["model.init_args.net.init_args.width"]) == (
        0.002, "AdamW", "32")
    for row in table:
        run = folder / row["run"]
        args = lt.load_config(run / "args.yaml")  # an ordinary run: its config reads back
        assert args.lr0 == pytest.approx(float(row["lr0"])) and args.optimizer == row["optimizer"]
        net = args.sections["model"]["init_args"]["net"]["init_args"]
        assert net["width"] == int(row["model.init_args.net.init_args.width"])
        with open(run / "results.csv", newline="") as f:
            accs = [float(r["val/acc"]) for r in csv.DictReader(f)]
        assert len(accs) == 2 and float(row["val/acc"]) == pytest.approx(max(accs), abs=1e-5)  # the best epoch
        assert (run / "weights" / "best.pt").is_file()
    best = max(table, key=lambda r: float(r["val/acc"]))
    best_cfg = lt.load_config(folder / "best.yaml")
    assert best_cfg.lr0 == pytest.approx(float(best["lr0"])) and best_cfg.optimizer == best["optimizer"]
    assert (best_cfg.save_dir, best_cfg.name, best_cfg.epochs) == (str(save_dir), "digits", 2)
    for picture in ("tune_history.png", "tune_importances.png", "tune_parallel.png", "tune_slice.png",
                    "tune_intermediate.png"):
        assert (folder / picture).stat().st_size > 5000, picture
    assert "**" + best["trial"] + "**" in (folder / "tune_results.md").read_text()
    assert "trial 2: " in caplog.text and "best: trial" in caplog.text
    # The best config trains as it is, and a trial's weights open in other commands.
    assert main(["fit", "--config", str(folder / "best.yaml"), "--epochs", "1", *QUICK]) == 0
    assert (save_dir / "digits" / "weights" / "best.pt").is_file()
    assert main(["validate", "--ckpt_path", str(folder / best["run"] / "weights" / "best.pt"), *QUICK[:4]]) == 0


def test_pruning_stops_weak_trials_early(tmp_path, cfg: lt.Config) -> None:
    space = {"lr0": {"low": 1e-7, "high": 1e-2, "log": True}}
    study, best, folder = lt.tune(cfg, space, trials=6, sampler="random", epochs=3, warmup_epochs=0,
                                  save_dir=str(tmp_path), **QUICK_KW, trainer={"limit_train_batches": 20,
                                                                               "limit_val_batches": 3})
    trials = study.get_trials()
    pruned = [t for t in trials if t.state == optuna.trial.TrialState.PRUNED]
    assert pruned, [(t.params, t.intermediate_values) for t in trials]
    for trial in pruned:
        step = max(trial.intermediate_values)
        # The median rule, computed here: below the median of the earlier complete trials at that epoch.
        earlier = [t.intermediate_values[step] for t in trials
                   if t.state == optuna.trial.TrialState.COMPLETE and t.number < trial.number]
        assert earlier and trial.intermediate_values[step] < statistics.median(earlier)
        assert step < 2  # stopped before its last epoch
        with open(folder / trial.user_attrs["run"] / "results.csv", newline="") as f:
            assert len(list(csv.DictReader(f))) == step + 1  # it trained no further
    assert best.lr0 == pytest.approx(study.best_trial.params["lr0"])


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_a_crashing_trial_is_recorded_and_the_sweep_goes_on(tmp_path, cfg: lt.Config) -> None:
    # width 0 cannot build a network: that trial fails, the other one completes.
    study, best, folder = lt.tune(cfg, {"model.init_args.net.init_args.width": [0, 16]}, trials=2, sampler="grid",
                                  epochs=1, save_dir=str(tmp_path), **QUICK_KW, **QUICK_TRAINER)
    table = {r["model.init_args.net.init_args.width"]: r for r in rows(folder)}
    assert table["0"]["state"] == "failed" and table["0"]["note"]
    assert table["16"]["state"] == "complete"
    assert (folder / "errors").is_dir() and "Traceback" in next((folder / "errors").iterdir()).read_text()
    assert best.sections["model"]["init_args"]["net"]["init_args"]["width"] == 16


def test_a_diverging_trial_is_pruned(tmp_path, monkeypatch, cfg: lt.Config) -> None:
    (tmp_path / "nan_net.py").write_text(NAN_NET)
    monkeypatch.syspath_prepend(str(tmp_path))
    model = {"class_path": "lightrainer.modules.ClassificationModule",
             "init_args": {"net": {"class_path": "nan_net.NaNAfter", "init_args": {}}}}
    study, best, folder = lt.tune(cfg, {"model.init_args.net.init_args.batches": [3, 1000]}, trials=2, sampler="grid",
                                  epochs=2, nan_patience=0, model=model, save_dir=str(tmp_path / "runs"),
                                  **QUICK_KW, **QUICK_TRAINER)
    table = {r["model.init_args.net.init_args.batches"]: r for r in rows(folder)}
    assert table["3"]["state"] == "pruned" and table["3"]["note"].startswith("diverged: "), table["3"]
    assert "optimizer step" in table["3"]["note"]
    assert table["1000"]["state"] == "complete"
    assert best.sections["model"]["init_args"]["net"]["init_args"]["batches"] == 1000


def test_machines_sharing_a_storage_join_one_study(tmp_path, cfg: lt.Config) -> None:
    # Two machines running the same command against one database: here, one after the other.
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    space = {"lr0": [1e-3, 2e-3, 5e-3]}
    first = lt.tune(cfg, space, trials=2, storage=url, epochs=1, save_dir=str(tmp_path), **QUICK_KW, **QUICK_TRAINER)
    second = lt.tune(cfg, space, trials=3, storage=url, epochs=1, save_dir=str(tmp_path), **QUICK_KW, **QUICK_TRAINER)
    trials = optuna.load_study(study_name="digits", storage=url).get_trials()
    assert [state_of(t) for t in trials] == ["complete"] * 3  # --trials counts the study's trials
    assert (first.folder.name, second.folder.name) == ("digits", "digits2")
    assert [t.user_attrs["run"] for t in trials] == ["trial_000", "trial_001", "trial_002"]
    assert (second.folder / "trial_002").is_dir() and not (second.folder / "trial_000").exists()
    assert len(rows(second.folder)) == 3  # the table lists the whole study
    assert not (second.folder / "study.db").exists()
    with pytest.raises(lt.ConfigError, match="tunes another space or fitness"):
        lt.tune(cfg, {"lr0": [1e-3]}, trials=4, storage=url, save_dir=str(tmp_path))
    assert sorted(p.name for p in (tmp_path / "tune").iterdir()) == ["digits", "digits2"]  # nothing created


def _wait_for(predicate, timeout: float, proc: subprocess.Popen | None = None) -> None:
    end = time.time() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the sweep ended early (exit {proc.returncode})")
        if time.time() > end:
            raise AssertionError("timed out")
        time.sleep(0.2)


def _finished(folder: Path) -> int:
    try:
        return sum(r["state"] in ("complete", "pruned", "failed") for r in rows(folder))
    except (OSError, KeyError):
        return 0


def _running(folder: Path) -> bool:
    trials = study_of(folder).get_trials(deepcopy=False)
    return any(t.state == optuna.trial.TrialState.RUNNING and t.number > 0 for t in trials)


@pytest.mark.slow
def test_kill_9_then_resume_gives_the_trials_asked_for(tmp_path, digits: str) -> None:
    space = tmp_path / "space.yaml"
    space.write_text("lr0: {low: 1.0e-3, high: 1.0e-2, log: true}\n")
    save_dir = tmp_path / "runs"
    args = ["tune", "--config", digits, "--space", str(space), "--trials", "4", "--epochs", "4",
            "--save_dir", str(save_dir), "--pruner", "none", *QUICK]
    proc = subprocess.Popen([sys.executable, "-m", "lightrainer", *args], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    folder = save_dir / "tune" / "digits"
    try:
        _wait_for(lambda: _finished(folder) >= 1, 240, proc)
        _wait_for(lambda: _running(folder), 60, proc)  # kill it in the middle of a trial
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert main([*args, "--resume"]) == 0
    trials = study_of(folder).get_trials()
    counted = [t for t in trials if counts_toward(t)]
    assert len(counted) == 4 and all(state_of(t) == "complete" for t in counted)
    assert len({t.number for t in trials}) == len(trials)
    runs = [t.user_attrs["run"] for t in counted]
    assert len(set(runs)) == 4 and all((folder / r / "weights" / "best.pt").is_file() for r in runs)
    (killed,) = [t for t in trials if state_of(t) == "interrupted"]
    (again,) = [u for u in trials if u.user_attrs.get("rerun_of") == killed.number]  # run again, with its values
    assert again.params == killed.params and state_of(again) == "complete"
    assert not list(save_dir.glob("tune/digits?*"))  # resumed in place, no second sweep folder


@pytest.mark.slow
def test_workers_run_trials_at_once(tmp_path, digits: str) -> None:
    space = tmp_path / "space.yaml"
    space.write_text("lr0: {low: 1.0e-3, high: 1.0e-2, log: true}\n")
    save_dir = tmp_path / "runs"
    # Trials of a few seconds (40 batches an epoch), longer than the gap between the two workers'
    # start-ups on a loaded machine: with one-second trials their hand-offs could line up end to start.
    assert main(["tune", "--config", digits, "--space", str(space), "--trials", "4", "--epochs", "2",
                 "--save_dir", str(save_dir), "--workers", "2", "--pruner", "none", *QUICK,
                 "--trainer.limit_train_batches", "40"]) == 0
    folder = save_dir / "tune" / "digits"
    trials = study_of(folder).get_trials()
    assert len(trials) == 4 and all(state_of(t) == "complete" for t in trials)
    assert {t.user_attrs["worker"] for t in trials} == {0, 1}
    assert len({t.user_attrs["pid"] for t in trials}) == 2
    spans = sorted((t.datetime_start, t.datetime_complete) for t in trials)
    assert any(a[1] > b[0] for a, b in zip(spans, spans[1:])), spans  # two trials ran at the same time
    assert len(rows(folder)) == 4 and (folder / "best.yaml").is_file()


@pytest.mark.slow
def test_ray_backend_runs_trials_as_ray_tasks(tmp_path, cfg: lt.Config) -> None:
    ray = pytest.importorskip("ray")
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    except Exception as err:  # noqa: BLE001 - a machine where Ray cannot start
        pytest.skip(f"Ray cannot start here: {err}")
    try:
        study, best, folder = lt.tune(cfg, {"lr0": {"low": 1e-3, "high": 1e-2, "log": True}}, trials=2, backend="ray",
                                      pruner="none", epochs=1, save_dir=str(tmp_path), **QUICK_KW, **QUICK_TRAINER)
    finally:
        ray.shutdown()
    trials = study.get_trials()
    assert len(trials) == 2 and all(state_of(t) == "complete" for t in trials)
    assert all(t.user_attrs.get("ray_task") for t in trials)
    assert all((folder / t.user_attrs["run"] / "args.yaml").is_file() for t in trials)
    assert best is not None and (folder / "tune_results.csv").is_file()
