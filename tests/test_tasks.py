"""Every task is first-class: a task in a user's own module, from the command line, through
export with ``--weights`` alone, exactly as the built-in tasks; fitness directions from the task's
declaration; weights files are data."""

from __future__ import annotations

import re
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import lightrainer as lt
from lightrainer.cli import main
from lightrainer.modules import ClassificationModule, SmallCNN, VQVAEModule
from lightrainer.registry import TASKS

REPO = Path(__file__).resolve().parents[1]
SHRINK = ["--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "2", "--plots", "False"]

# A user's own task, in a module of their own beside the YAML (not in lightrainer/), declaring a
# key the way the original's README does: register_task_keys("ink", ...).
USER_TASK = '''
import torch.nn.functional as F

import lightrainer as lt
from lightrainer.config import ExtraKey, at_least, register_task_keys

register_task_keys("ink", {"huber_delta": ExtraKey(float, 1.0, at_least(0.0), "Huber loss delta")})


class InkHuber(lt.LightrainerModule):
    """Regress the fraction of bright pixels of a digit, with a Huber loss."""

    metric_modes = {"mae": "min"}
    fitness_key, fitness_mode = "val/mae", "min"

    def step(self, batch, stage):
        x, _ = batch
        target = (x > 0.5).float().mean(dim=(1, 2, 3))
        pred = self.net(x).squeeze(1)
        return F.huber_loss(pred, target, delta=self.cfg.huber_delta), {"mae": (pred - target).abs().mean()}
'''


def write_user_task(folder: Path, module: str, huber_delta: float = 0.5) -> Path:
    """``<module>.py`` and ``my.yaml`` beside it; returns the YAML."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{module}.py").write_text(USER_TASK)
    config = {
        "save_dir": str(folder / "runs"), "name": "ink", "epochs": 1, "batch": 32, "num_workers": 0,
        "warmup_epochs": 0, "huber_delta": huber_delta,
        "model": {"class_path": f"{module}.InkHuber",
                  "init_args": {"net": {"class_path": "lightrainer.modules.SmallCNN",
                                        "init_args": {"num_classes": 1, "width": 8}}}},
        "data": {"class_path": "lightrainer.datamodules.DigitsDataModule"},
    }
    path = folder / "my.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def forget(module: str) -> None:
    """Drop a user module and its task, so another process-like run must import it again."""
    sys.modules.pop(module, None)
    TASKS.unregister("inkhuber")


def test_user_task_key_from_the_yaml_and_as_a_flag(tmp_path, monkeypatch, capsys) -> None:
    yaml_path = write_user_task(tmp_path / "proj", "ink_task_a")
    monkeypatch.chdir(tmp_path)
    assert main(["fit", "--config", str(yaml_path), "--huber_delta", "0.3", *SHRINK]) == 0
    run = tmp_path / "proj" / "runs" / "ink"
    args = yaml.safe_load((run / "args.yaml").read_text())
    assert args["huber_delta"] == 0.3 and args["task"] == "inkhuber"
    # The run's own task keys only: nothing of the classification or VQ-VAE task.
    assert "label_smoothing" not in args and "recon_weight" not in args
    best = torch.load(run / "weights" / "best.pt", weights_only=True)
    assert best["run"]["config"]["huber_delta"] == 0.3
    assert best["run"]["model"]["class_path"] == "ink_task_a.InkHuber"
    forget("ink_task_a")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--huber_delt", "0.3"], r"unknown flag --huber_delt \(did you mean 'huber_delta'\?\)"),
        (["--huber_delta", "-1"], r"huber_delta: must be >= 0.0, got -1"),
        (["--fitness", "accuracy"], r"fitness: 'accuracy' is not a metric InkHuber logs; it logs loss, mae"),
        (["--model.class_path", "ink_task_gone.InkHuber"], r"model.class_path: cannot import 'ink_task_gone.InkHuber'"),
    ],
)
def test_user_task_mistakes_exit_2_before_any_work(tmp_path, monkeypatch, capsys, extra, message) -> None:
    yaml_path = write_user_task(tmp_path / "proj", "ink_task_b")
    monkeypatch.chdir(tmp_path)
    assert main(["fit", "--config", str(yaml_path), *extra, *SHRINK]) == 2
    err = capsys.readouterr().err
    assert pytest.importorskip("re").search(message, err), err
    assert not (tmp_path / "proj" / "runs").exists()
    forget("ink_task_b")


def test_help_lists_the_user_tasks_keys(tmp_path, monkeypatch, capsys) -> None:
    yaml_path = write_user_task(tmp_path / "proj", "ink_task_c")
    monkeypatch.chdir(tmp_path)
    assert main(["fit", "--config", str(yaml_path), "--help"]) == 0
    out = capsys.readouterr().out
    assert "--huber_delta" in out and "Huber loss delta" in out
    assert "--recon_weight" not in out
    forget("ink_task_c")


def test_export_with_weights_alone_reimports_the_users_module(tmp_path, monkeypatch) -> None:
    pytest.importorskip("onnxruntime")
    yaml_path = write_user_task(tmp_path / "proj", "ink_task_d")
    monkeypatch.chdir(tmp_path / "proj")
    assert main(["fit", "--config", str(yaml_path), *SHRINK]) == 0
    best = tmp_path / "proj" / "runs" / "ink" / "weights" / "best.pt"
    # Another session, elsewhere: the module is not imported and its folder not on sys.path.
    forget("ink_task_d")
    monkeypatch.setattr(sys, "path", [p for p in sys.path if Path(p or ".").resolve() != tmp_path / "proj"])
    monkeypatch.chdir(tmp_path)
    assert main(["export", "--weights", str(best)]) == 0
    onnx_path = best.with_suffix(".onnx")
    import onnxruntime as ort

    # Independent reference: the network built by hand from the weights file.
    net = SmallCNN(num_classes=1, width=8).eval()
    net.load_state_dict(torch.load(best, weights_only=True)["model"])
    x = torch.rand(5, 1, 8, 8)
    got = ort.InferenceSession(str(onnx_path)).run(None, {"input": x.numpy()})[0]
    np.testing.assert_allclose(got, net(x).detach().numpy(), atol=1e-5)
    forget("ink_task_d")


def test_a_class_that_no_longer_imports_is_named_with_the_fix(tmp_path, monkeypatch, capsys) -> None:
    yaml_path = write_user_task(tmp_path / "proj", "ink_task_e")
    monkeypatch.chdir(tmp_path / "proj")
    assert main(["fit", "--config", str(yaml_path), *SHRINK]) == 0
    best = tmp_path / "proj" / "runs" / "ink" / "weights" / "best.pt"
    forget("ink_task_e")
    (tmp_path / "proj" / "ink_task_e.py").unlink()
    assert main(["export", "--weights", str(best)]) == 2
    err = capsys.readouterr().err
    assert "cannot import 'ink_task_e.InkHuber'" in err and "ink_task_e.py" in err and "PYTHONPATH" in err
    assert not best.with_suffix(".onnx").exists()


def shrink_flags(config: Path) -> list[str]:
    flags = ["--epochs", "1", "--device", "cpu", "--num_workers", "0", "--exist_ok", "False", *SHRINK]
    keys = yaml.safe_load(config.read_text())
    if lt.load_config(config).task_class is VQVAEModule:
        flags += ["--lpips_weight", "0", "--patches_per_epoch", "64", "--channels", "8", "--codebook_size", "16"]
    if "batch" in keys and keys["batch"] > 32:
        flags += ["--batch", "32"]
    return flags


@pytest.mark.parametrize("config", sorted(p.name for p in (REPO / "configs").glob("*.y*ml")))
def test_export_with_weights_alone_for_every_shipped_config(tmp_path, monkeypatch, config) -> None:
    pytest.importorskip("onnxruntime")
    path = REPO / "configs" / config
    monkeypatch.chdir(tmp_path)
    assert main(["fit", "--config", str(path), "--save_dir", str(tmp_path / "runs"), "--name", "run",
                 *shrink_flags(path)]) == 0
    best = tmp_path / "runs" / "run" / "weights" / "best.pt"
    assert main(["export", "--weights", str(best)]) == 0
    assert best.with_suffix(".onnx").is_file()


def test_export_with_weights_alone_for_the_custom_task_example(tmp_path, monkeypatch) -> None:
    pytest.importorskip("onnxruntime")
    # As a notebook does: import the example's module from its folder, train, export from a
    # fresh state with --weights alone.
    monkeypatch.syspath_prepend(str(REPO / "examples"))
    import custom_task

    cfg = custom_task.main(save_dir=str(tmp_path / "runs"), epochs=1, limit_train_batches=2, limit_val_batches=2,
                           enable_progress_bar=False)
    best = Path(cfg.run_dir) / "weights" / "best.pt"
    assert torch.load(best, weights_only=True)["run"]["model"]["class_path"] == "custom_task.InkRegression"
    sys.modules.pop("custom_task")
    TASKS.unregister("inkregression")
    assert main(["export", "--weights", str(best)]) == 0


SCRIPT = """
import torch.nn.functional as F
import lightrainer as lt
from lightrainer.datamodules import DigitsDataModule
from lightrainer.modules import SmallCNN


class Script(lt.LightrainerModule):
    def step(self, batch, stage):
        x, y = batch
        return F.cross_entropy(self.net(x), y), {}


if __name__ == "__main__":
    cfg = lt.load_config({"epochs": 1, "save_dir": "runs", "name": "script", "num_workers": 0, "warmup_epochs": 0})
    trainer = lt.build_trainer(cfg, limit_train_batches=2, limit_val_batches=2, enable_progress_bar=False)
    trainer.fit(Script(SmallCNN(num_classes=10, width=4), cfg), datamodule=DigitsDataModule(cfg))
"""


def test_export_with_weights_alone_for_a_task_defined_in_a_script(tmp_path) -> None:
    pytest.importorskip("onnxruntime")
    import subprocess

    (tmp_path / "train_script.py").write_text(SCRIPT)
    subprocess.run([sys.executable, "train_script.py"], cwd=tmp_path, check=True, capture_output=True)
    best = tmp_path / "runs" / "script" / "weights" / "best.pt"
    assert torch.load(best, weights_only=True)["run"]["model"]["class_path"] == "train_script.Script"
    done = subprocess.run([sys.executable, "-m", "lightrainer", "export", "--weights", str(best)], cwd=REPO,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert best.with_suffix(".onnx").is_file()


def test_fitness_direction_comes_from_the_tasks_declaration() -> None:
    net = SmallCNN(num_classes=3, width=4)
    for metric, mode in (("recon", "min"), ("vq", "min"), ("lpips", "min"), ("ssim", "max"), ("usage", "max")):
        cfg = lt.load_config({"fitness": metric, "lpips_weight": 0.0}, task_class=VQVAEModule)
        assert VQVAEModule(lt.modules.VQVAE(channels=8, codebook_size=8, code_dim=4), cfg).fitness_monitor == (
            f"val/{metric}", mode)
    cfg = lt.load_config({"fitness": "val/acc_top5"})
    assert ClassificationModule(net, cfg).fitness_monitor == ("val/acc_top5", "max")
    with pytest.raises(lt.ConfigError, match=r"fitness: 'accuracy' is not a metric ClassificationModule logs; "
                                             r"it logs acc, acc_top5, loss \(did you mean 'acc'\?\)"):
        lt.load_config({"fitness": "accuracy"})
    with pytest.raises(lt.ConfigError, match="must be a validation metric"):
        lt.load_config({"fitness": "train/loss"})


def test_a_config_for_one_task_refuses_another_tasks_module() -> None:
    cfg = lt.load_config({"recon_weight": 3.0})
    assert cfg.task_class is VQVAEModule
    with pytest.raises(lt.ConfigError, match="ClassificationModule does not declare the key"):
        ClassificationModule(SmallCNN(num_classes=3, width=4), cfg)
    with pytest.raises(lt.ConfigError, match="unknown key 'recon_weight': it is a key of task vqvae, not of ClassificationModule"):
        lt.load_config({"recon_weight": 3.0}, task_class=ClassificationModule)


# ----------------------------------------------------------------------------- weights files are data
def hostile_weights(tmp_path: Path, payload: dict) -> Path:
    path = tmp_path / "runs" / "evil" / "weights" / "best.pt"
    path.parent.mkdir(parents=True)
    torch.save(payload, path)
    return path


STATE = {"w": torch.zeros(1)}


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"model": {}, "config": {"data": {"class_path": "os.system", "init_args": {"command": "touch pwned"}}}},
         "is a builtin_function_or_method, not a class|no record|not a"),
        ({"model": STATE, "run": {"config": {}, "model": {"class_path": "os.system"}, "net": None, "data": None}},
         "not a class"),
        ({"model": STATE, "run": {"config": {}, "model": {"class_path": "lightrainer.modules.ClassificationModule"},
                                  "net": None, "data": {"class_path": "subprocess.Popen", "init_args": {"args": "touch pwned"}}}},
         r"data.class_path: subprocess.Popen is not a lightning.pytorch.core.datamodule.LightningDataModule subclass"),
        ({"model": STATE, "run": {"config": {}, "model": {"class_path": "lightrainer.modules.ClassificationModule"},
                                  "net": {"class_path": "subprocess.Popen", "init_args": {"args": "touch pwned"}}, "data": None}},
         r"net.class_path: subprocess.Popen is not a torch.nn.modules.module.Module subclass"),
        ({"model": STATE, "run": {"config": {}, "model": {"class_path": "lightrainer.modules.ClassificationModule",
                                                           "init_args": {"num_classes": {"class_path": "subprocess.Popen",
                                                                                         "init_args": {"args": "touch pwned"}}}},
                                  "net": {"default": True}, "data": None}},
         r"subprocess.Popen is not a torch.nn.modules.module.Module subclass"),
    ],
)
@pytest.mark.parametrize("command", ["export", "benchmark", "ptq"])
def test_a_weights_file_never_runs_code(tmp_path, monkeypatch, capsys, payload, message, command) -> None:
    monkeypatch.chdir(tmp_path)
    weights = hostile_weights(tmp_path, payload)
    assert main([command, "--weights", str(weights)]) == 2
    err = capsys.readouterr().err
    assert pytest.importorskip("re").search(message, err), err
    assert "weights_only=False" not in err
    assert not (tmp_path / "pwned").exists()


def test_validate_with_the_checkpoint_alone_rebuilds_the_users_task(tmp_path, monkeypatch) -> None:
    yaml_path = write_user_task(tmp_path / "proj", "ink_task_f")
    monkeypatch.chdir(tmp_path / "proj")
    assert main(["fit", "--config", str(yaml_path), *SHRINK]) == 0
    run = tmp_path / "proj" / "runs" / "ink"
    forget("ink_task_f")
    monkeypatch.chdir(tmp_path)
    assert main(["validate", "--ckpt_path", str(run / "weights" / "best.ckpt"), "--trainer.limit_val_batches", "2"]) == 0
    scored = (run.parent / "ink_validate" / "logs" / "metrics.csv").read_text().splitlines()
    header, values = scored[0].split(","), scored[1].split(",")
    fit_rows = (run / "results.csv").read_text().splitlines()
    fit = dict(zip(fit_rows[0].split(","), fit_rows[1].split(",")))
    assert float(values[header.index("val/mae")]) == pytest.approx(float(fit["val/mae"]), rel=1e-5)


GENERIC = ("config.py", "build.py", "trainer.py", "cli.py", "module.py", "record.py", "registry.py", "task.py",
           "tuner.py", "export", "quant", "callbacks/checkpoint.py", "callbacks/results.py", "callbacks/export.py",
           "callbacks/ptq.py", "callbacks/qat.py")


def test_generic_code_never_names_a_task() -> None:
    """Only docstrings and comments may mention the built-in tasks outside their own files (the
    config's default task is a default value, as the default optimizer is)."""
    import ast

    package = REPO / "lightrainer"
    offenders = []
    for entry in GENERIC:
        for path in ([package / entry] if entry.endswith(".py") else sorted((package / entry).rglob("*.py"))):
            tree = ast.parse(path.read_text())
            for node in ast.walk(tree):
                if isinstance(node, ast.Name) and re.search(r"vqvae|classification", node.id, re.I):
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno}: {node.id}")
                if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.lower() in (
                        "vqvae", "classification") and not (path.name == "config.py"):
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno}: {node.value!r}")
                if isinstance(node, ast.ImportFrom) and node.module and re.search(r"vqvae|classification", node.module):
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno}: from {node.module}")
    assert not offenders, offenders


def test_a_run_of_the_point_cloud_example_gets_a_clear_message(tmp_path, monkeypatch, capsys) -> None:
    """Its datamodule holds arrays and a collate function given in Python: a weights file cannot hold
    them, so export asks for a config instead of building something else."""
    monkeypatch.syspath_prepend(str(REPO / "examples"))
    import point_clouds

    cfg = point_clouds.main(save_dir=str(tmp_path), epochs=1, limit_train_batches=2, limit_val_batches=2,
                            enable_progress_bar=False)
    sys.modules.pop("point_clouds")
    assert main(["export", "--weights", str(Path(cfg.run_dir) / "weights" / "best.pt")]) == 2
    assert "ArrayDataModule was built in Python with argument(s) train, collate_fn" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ("data:\n  class_path: os.system\n  init_args: {command: touch pwned}\n", "os.system does not correspond to a subclass of LightningDataModule"),
        ("model:\n  class_path: subprocess.Popen\n  init_args: {args: touch pwned}\n", "subprocess.Popen does not correspond to a subclass of LightningModule"),
        ("data:\n  class_path: subprocess.Popen\n  init_args: {args: touch pwned}\n", "subprocess.Popen does not correspond to a subclass of LightningDataModule"),
    ],
)
def test_a_yaml_class_path_must_be_a_class_of_the_expected_kind(tmp_path, monkeypatch, capsys, section, message) -> None:
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "evil.yaml"
    config.write_text("epochs: 1\n" + section)
    assert main(["fit", "--config", str(config), "--save_dir", str(tmp_path / "runs")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "runs").exists()


def test_a_shift_larger_than_the_images_is_refused_with_no_folder(tmp_path, capsys) -> None:
    config = REPO / "configs" / "digits.yaml"
    assert main(["fit", "--config", str(config), "--shift", "1000", "--save_dir", str(tmp_path / "runs")]) == 2
    assert "shift: 1000 pixels moves 8x8 images out of view" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
