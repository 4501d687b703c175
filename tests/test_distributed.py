"""Several processes on the CPU (gloo) standing in for several GPUs and machines: Lightning's own
launcher, torchrun, a two-node launch; the same training as one process, one run folder, metrics
over the whole val set, rank-0-only files; bad device/node/batch input refused before any work."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lightrainer as lt
from lightrainer.config import ConfigError
from lightrainer.trainer import launcher_layout, resolve_devices, resolve_strategy

N_TRAIN, N_VAL, BATCH, EPOCHS = 101, 37, 8, 2  # last global batch of 5: shards of 3 and 2

# One training, run by the test (1 process) and by the launchers (2 processes). Every rank writes
# rank<N>.json outside the run folder: its view of the run, and every file-system write it made
# under save_dir (Python audit events), so the test can tell that only rank 0 wrote.
SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    from pathlib import Path
    import torch
    torch.set_num_threads(1)
    args = json.loads(sys.argv[1])
    save_dir = os.path.realpath(args["save_dir"])
    writes = []
    def audit(event, info):
        if event not in ("open", "os.rename", "os.mkdir", "os.remove"):
            return
        mode = info[1] if event == "open" else "w"
        paths = info[:2] if event == "os.rename" else info[:1]
        for path in paths:
            if isinstance(path, (str, os.PathLike)) and isinstance(mode, str) and set(mode) & set("wax+"):
                if os.path.realpath(os.fspath(path)).startswith(save_dir):
                    writes.append([event, os.fspath(path)])
    sys.addaudithook(audit)
    sys.path.insert(0, args["tests"])
    from test_distributed import fit_once
    trainer, cfg = fit_once(args["cfg"])
    stopper = next(c for c in trainer.callbacks if type(c).__name__ == "FitnessEarlyStopping")
    view = {
        "rank": trainer.global_rank, "world_size": trainer.world_size, "run_dir": cfg.run_dir,
        "metrics": {k: float(v) for k, v in trainer.callback_metrics.items() if k != "loss"},
        "best_path": trainer.checkpoint_callback.best_model_path,
        "best_score": float(trainer.checkpoint_callback.best_model_score),
        "stopped_epoch": stopper.stopped_epoch, "epoch": trainer.current_epoch, "writes": writes,
        "params": {k: v.tolist() for k, v in trainer.lightning_module.net.state_dict().items()},
    }
    Path(args["out"], f"rank{trainer.global_rank}.json").write_text(json.dumps(view))
    """
)


def make_data() -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N_TRAIN + N_VAL, 6, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long() + (x[:, 2] > 1).long()
    return (x[:N_TRAIN], y[:N_TRAIN]), (x[N_TRAIN:], y[N_TRAIN:])


def make_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))  # no batch norm


def config(save_dir: str, **kw) -> dict:
    values = dict(save_dir=save_dir, batch=BATCH, nbs=16, epochs=EPOCHS, optimizer="SGD", lr0=0.05,
                  warmup_epochs=1.0, num_workers=0, plots=False, patience=5, device="cpu")
    values.update(kw)
    return values


def fit_once(values: dict):
    """The shared training (used in this process and by SCRIPT in launched processes)."""
    from lightrainer.datamodules import ArrayDataModule
    from lightrainer.modules import ClassificationModule

    cfg = lt.load_config(values)
    train, val = make_data()
    trainer = lt.build_trainer(cfg, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(ClassificationModule(make_net(), cfg), datamodule=ArrayDataModule(cfg, train=train, val=val))
    return trainer, cfg


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra: str) -> dict:
    drop = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
            "MASTER_PORT", "LIGHTRAINER_RUN_DIR", "TORCHELASTIC_RUN_ID")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("SLURM_")}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", **extra)
    return env


def launch(tmp_path: Path, values: dict, prefix: list[str], envs: list[dict]) -> list[dict]:
    """Start one process per env (each running SCRIPT), wait, return the rank views by rank."""
    script, out = tmp_path / "fit_script.py", tmp_path / "out"
    script.write_text(SCRIPT)
    out.mkdir(exist_ok=True)
    arg = json.dumps({"save_dir": values["save_dir"], "cfg": values, "out": str(out),
                      "tests": os.path.dirname(__file__)})
    procs = [subprocess.Popen([*prefix, str(script), arg], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for env in envs]
    logs = [p.communicate(timeout=240)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> dict:
    """The reference: the same config in one process."""
    save_dir = tmp_path_factory.mktemp("single")
    trainer, cfg = fit_once(config(str(save_dir)))
    return {"params": {k: v.detach().clone() for k, v in trainer.lightning_module.net.state_dict().items()},
            "metrics": {k: float(v) for k, v in trainer.callback_metrics.items() if k != "loss"},
            "results": (Path(cfg.run_dir) / "results.csv").read_text()}


def check_same_run(views: list[dict], single: dict, save_dir: Path, run_name: str) -> None:
    r0, r1 = views
    assert (r0["rank"], r1["rank"], r0["world_size"]) == (0, 1, 2)
    # One run folder, decided once: the earlier "train" is kept, exactly one new one.
    assert sorted(p.name for p in save_dir.iterdir()) == ["train", run_name]
    assert r0["run_dir"] == r1["run_dir"] == str(save_dir / run_name)
    # Parameters after two epochs: 2 processes == 1 process (same global batches, same seed).
    for key, want in single["params"].items():
        for view in views:
            torch.testing.assert_close(torch.tensor(view["params"][key]), want, rtol=1e-5, atol=1e-7, msg=key)
    # Metrics cover the val set once, are the same on both ranks, and equal one process's.
    assert r0["metrics"] == r1["metrics"]
    assert r0["metrics"] == pytest.approx(single["metrics"], rel=1e-5, abs=1e-6)
    assert (save_dir / run_name / "results.csv").read_text().splitlines()[0] == single["results"].splitlines()[0]
    # The best checkpoint and the early-stopping state agree across ranks.
    assert (r0["best_path"], r0["best_score"], r0["stopped_epoch"]) == (r1["best_path"], r1["best_score"],
                                                                       r1["stopped_epoch"])
    assert r0["best_path"] == str(save_dir / run_name / "weights" / "best.ckpt")
    # Only rank 0 touched the file system under save_dir.
    assert r1["writes"] == []
    written = {Path(p).name for _, p in r0["writes"]}
    assert {"results.csv", "last.ckpt", "last.pt", "args.yaml"} <= written


def test_val_metrics_of_one_process_match_an_independent_computation(single) -> None:
    _, (x, y) = make_data()
    net = make_net()
    net.load_state_dict(single["params"])
    with torch.no_grad():
        logits = net(x)
    assert single["metrics"]["val/loss"] == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-5)
    assert single["metrics"]["val/acc"] == pytest.approx((logits.argmax(1) == y).float().mean().item(), abs=1e-6)


def test_lightning_ddp_two_processes_equal_one(tmp_path, single) -> None:
    save_dir = tmp_path / "runs"
    (save_dir / "train").mkdir(parents=True)
    views = launch(tmp_path, config(str(save_dir), devices=2), [sys.executable], [clean_env()])
    check_same_run(views, single, save_dir, "train2")


def test_torchrun_two_processes_equal_one(tmp_path, single) -> None:
    save_dir = tmp_path / "runs"
    (save_dir / "train").mkdir(parents=True)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone"]
    views = launch(tmp_path, config(str(save_dir)), torchrun, [clean_env()])  # devices come from torchrun
    check_same_run(views, single, save_dir, "train2")


def test_two_machines_simulated_equal_one(tmp_path, single) -> None:
    """Two "machines" (NODE_RANK 0 and 1, one process each), as one starts them by hand or a
    cluster script does: MASTER_ADDR/PORT and NODE_RANK on each, num_nodes: 2 in the config."""
    save_dir = tmp_path / "runs"
    (save_dir / "train").mkdir(parents=True)
    port = str(free_port())
    envs = [clean_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, NODE_RANK=str(rank)) for rank in (0, 1)]
    views = launch(tmp_path, config(str(save_dir), devices=1, num_nodes=2), [sys.executable], envs)
    check_same_run(views, single, save_dir, "train2")


# ------------------------------------------------------------------------------ bad input
@pytest.fixture
def no_launcher(monkeypatch):
    for var in ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "LOCAL_WORLD_SIZE", "WORLD_SIZE", "MASTER_ADDR",
                "TORCHELASTIC_RUN_ID", "SLURM_NTASKS", "SLURM_JOB_NAME", "SLURM_NNODES", "SLURM_NTASKS_PER_NODE", "SLURM_PROCID"):
        monkeypatch.delenv(var, raising=False)


@pytest.mark.parametrize(
    "values, message",
    [
        (dict(device="cpu", devices=4, batch=30), r"batch: 30 does not split over 4 devices .*7\.5.* set batch to 28 \(7 a device\) or 32"),
        (dict(device="cpu", devices=2, num_nodes=2, batch=8),
         r"num_nodes: 2 needs a launcher .*torchrun --nnodes=2 .*srun .*MASTER_ADDR, MASTER_PORT and NODE_RANK"),
        (dict(device="mps", devices=2), r"MPS is one device: set devices: 1"),
        (dict(device="cpu", devices=2, sync_bn=True), r"sync_bn: True needs CUDA GPUs .*set sync_bn: False"),
    ],
)
def test_bad_layout_refused_before_any_folder(tmp_path, no_launcher, values: dict, message: str) -> None:
    cfg = lt.load_config(dict(save_dir=str(tmp_path / "runs"), **values))
    with pytest.raises(ConfigError, match=message):
        lt.build_trainer(cfg)
    assert not (tmp_path / "runs").exists()


def test_gpu_ids_that_do_not_exist(tmp_path, monkeypatch, no_launcher) -> None:
    # A one-GPU machine, as torch reports it (this test machine has none).
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match=r"device: GPU \[1\] does not exist; this machine has 1 GPU\(s\) with ids 0..0"):
        resolve_devices(lt.load_config(dict(device="0,1")))
    with pytest.raises(ConfigError, match=r"devices: 3 GPUs asked for, this machine has 1: set devices: 1"):
        resolve_devices(lt.load_config(dict(devices=3)))
    with pytest.raises(ConfigError, match=r"device: \[0\] names 1 GPU\(s\) but devices: 2"):
        resolve_devices(lt.load_config(dict(device=[0], devices=2)))


def test_more_cpu_processes_than_cores_warns(no_launcher) -> None:
    cores = os.cpu_count() or 1
    with pytest.warns(UserWarning, match=rf"devices: {cores + 1} CPU processes on {cores} cores"):
        layout = resolve_devices(lt.load_config(dict(device="cpu", devices=cores + 1)))
    assert layout["world_size"] == cores + 1


def test_torchrun_and_slurm_layouts_come_from_the_environment(monkeypatch, no_launcher) -> None:
    # What torchrun --nnodes=2 --nproc_per_node=4 sets in each worker.
    torchrun_env = dict(RANK="5", GROUP_RANK="1", LOCAL_RANK="1", LOCAL_WORLD_SIZE="4", WORLD_SIZE="8",
                        TORCHELASTIC_RUN_ID="job1")
    for var, value in torchrun_env.items():
        monkeypatch.setenv(var, value)
    assert launcher_layout() == ("torchrun", 4, 2)
    with pytest.warns(UserWarning, match=r"devices: 2 in the config, but torchrun started 4 process\(es\) per machine"):
        layout = resolve_devices(lt.load_config(dict(device="cpu", devices=2)))
    assert (layout["devices"], layout["num_nodes"], layout["world_size"]) == (4, 2, 8)
    for var in torchrun_env:
        monkeypatch.delenv(var)
    # What `srun --nodes=3 --ntasks-per-node=2` sets.
    for var, value in dict(SLURM_NTASKS="6", SLURM_NNODES="3", SLURM_NTASKS_PER_NODE="2", SLURM_JOB_NAME="train",
                           SLURM_PROCID="0").items():
        monkeypatch.setenv(var, value)
    assert launcher_layout() == ("SLURM", 2, 3)
    layout = resolve_devices(lt.load_config(dict(device="cpu")))
    assert (layout["devices"], layout["num_nodes"], layout["world_size"]) == (2, 3, 6)


def test_strategy_for_scripts_and_notebooks(monkeypatch, no_launcher) -> None:
    assert resolve_strategy(1) == "auto" and resolve_strategy(2) == "ddp"
    monkeypatch.setattr(sys, "ps1", ">>> ", raising=False)  # what a notebook kernel or a REPL sets
    assert resolve_strategy(2) == "ddp_notebook"  # Lightning's "ddp" cannot re-run a notebook
