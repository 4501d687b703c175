"""Hostile input and hostile moments (issue 18): each case reproduces what went wrong and checks
what happens now. Bad configs end in one ConfigError (exit 2 from the command line) and create
nothing; runs that start together get a folder each; NaN is never trained on or saved; SIGTERM
and SIGINT save a resumable state and exit 143/130; a run resumed mid-epoch equals the run that
was never stopped, on both loader paths; temporary files of killed runs are cleaned.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import struct
import subprocess
import sys
import textwrap
import time
import zlib
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn

import lightrainer as lt
from lightrainer.callbacks.checkpoint import AtomicCheckpointIO, nan_entries
from lightrainer.callbacks.interrupt import exit_code, resume_command
from lightrainer.config import ConfigError, MAX_CONFIG_BYTES
from lightrainer.datamodules import ArrayDataModule
from lightrainer.datamodules.stream import BadImage, check_image_files, scan_image
from lightrainer.errors import MissingDependencyError, TrainingDiverged
from lightrainer.io import temp_path_for
from lightrainer.module import non_finite_verdict
from lightrainer.trainer import with_slurm_requeue
from test_cli import results  # results.csv without its time column
from test_distributed import clean_env  # the environment of a process no launcher started
from lightrainer.modules import ClassificationModule
from lightrainer.runs import (
    check_checkpoint_payload,
    create_run_dir,
    load_checkpoint,
    newest_complete_checkpoint,
    numbered_name,
    remove_if_empty,
    run_folders,
    run_number,
    stale_temp_files,
)

TESTS = Path(__file__).resolve().parent
DIGITS = str(TESTS.parent / "configs" / "digits.yaml")
FEW = ["--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "2", "--plots", "False"]
N_TRAIN, N_VAL, BATCH = 96, 32, 16


# ------------------------------------------------------------------------------ helpers
def cli_exit_code(argv: list[str]) -> int:
    """``lightrainer ARGV`` in-process, as the shell would see its exit code: what ``main``
    returns, the code of a ``SystemExit`` it raises (143 after SIGTERM), or 1 for an exception
    that escapes it (Python's own exit code for a traceback)."""
    from lightrainer.cli import main

    try:
        return main(argv)
    except SystemExit as err:
        return err.code if isinstance(err.code, int) else int(err.code is not None)
    except Exception:  # noqa: BLE001 - what the interpreter would turn into exit code 1
        return 1


def refused_by_cli(capsys, argv: list[str]) -> str:
    """Run a command line that must be refused: exit 2, one line on stderr; returns the line."""
    capsys.readouterr()
    assert cli_exit_code(argv) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


def make_data() -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N_TRAIN + N_VAL, 6, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long() + (x[:, 2] > 1).long()
    return (x[:N_TRAIN], y[:N_TRAIN]), (x[N_TRAIN:], y[N_TRAIN:])


class PoisonableNet(nn.Module):
    """A small MLP with dropout (so the random generators matter) whose output is NaN while
    ``poisoned`` is set."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(6, 16), nn.Dropout(0.2), nn.Tanh(), nn.Linear(16, 3))
        self.poisoned = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        return out * float("nan") if self.poisoned else out


def collate(samples: list) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.stack([s[0] for s in samples]), torch.stack([s[1] for s in samples])


def config(save_dir: Path, **kw) -> lt.Config:
    values = dict(save_dir=str(save_dir), name="run", batch=BATCH, nbs=32, epochs=3, optimizer="SGD", lr0=0.05,
                  warmup_epochs=1.0, num_workers=0, patience=0, plots=False, device="cpu")
    values.update(kw)
    return lt.load_config(values)


def fit_run(cfg: lt.Config, loader: str = "in-memory", callbacks: tuple = (), ckpt_path=None, run_dir=None):
    """One small classification fit; ``loader`` "dataloader" takes the torch DataLoader path."""
    train, val = make_data()
    datamodule = ArrayDataModule(cfg, train=train, val=val, collate_fn=collate if loader == "dataloader" else None)
    trainer = lt.build_trainer(cfg, run_dir=run_dir, callbacks=list(callbacks), enable_progress_bar=False,
                               enable_model_summary=False)
    module = ClassificationModule(PoisonableNet(), cfg)
    trainer.fit(module, datamodule=datamodule, ckpt_path=None if ckpt_path is None else str(ckpt_path),
                weights_only=True if ckpt_path else None)
    return trainer, module


class SignalAt(L.Callback):
    """Sends this process ``signum`` when batch ``batch`` of epoch ``epoch`` (0-based) starts."""

    def __init__(self, signum: int, epoch: int, batch: int) -> None:
        self.signum, self.at, self.sent = signum, (epoch, batch), False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if (trainer.current_epoch, batch_idx) == self.at and not self.sent:
            self.sent = True
            os.kill(os.getpid(), self.signum)


def assert_same_tensors(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0, msg=key)


def all_finite(obj) -> bool:
    if isinstance(obj, torch.Tensor):
        return not obj.is_floating_point() or bool(torch.isfinite(obj).all())
    if isinstance(obj, dict):
        return all(all_finite(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return all(all_finite(v) for v in obj)
    return True


# ------------------------------------------------------------------------------ config files
def test_config_files_that_are_not_configs_are_one_clear_error(tmp_path, capsys, monkeypatch) -> None:
    runs = tmp_path / "runs"
    cases = {
        "binary.yaml": (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR garbage", "a binary file, not a YAML config"),
        "latin1.yaml": (b"epochs: 3\nname: caf\xe9\n", r"not UTF-8 text \(byte 0xe9 on line 2\)"),
        "twice.yaml": (b"epochs: 3\nbatch: 8\nlr0: 0.1\nbatch: 16\n", r"key 'batch' is given twice \(lines 2 and 4\)"),
        "nested.yaml": (b"model:\n  class_path: a.B\n  class_path: c.D\n", r"key 'class_path' is given twice \(lines 2 and 3\)"),
        "recursive.yaml": (b"a: &a [*a]\n", "refers to a node that contains it"),
        "deep.yaml": (b"[" * 20000 + b"]" * 20000, "nested too deeply"),
        "big.yaml": (b"# " + b"x" * MAX_CONFIG_BYTES + b"\n", "larger than 1024 KB"),
    }
    for name, (data, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(ConfigError, match=message):
            lt.load_config(path)
        assert re.search(message, refused_by_cli(capsys, ["fit", "--config", str(path), "--save_dir", str(runs)]))
    with pytest.raises(ConfigError, match="is a folder, not a config file"):
        lt.load_config(tmp_path)
    assert "is a folder" in refused_by_cli(capsys, ["fit", "--config", str(tmp_path), "--save_dir", str(runs)])
    # No read permission (root reads anything, so the refusal is simulated where the test runs as root).
    locked = tmp_path / "locked.yaml"
    locked.write_text("epochs: 3\n")
    locked.chmod(0)
    if os.geteuid() == 0:
        real_open = open

        def no_read(file, *args, **kwargs):
            if str(file) == str(locked):
                raise PermissionError(13, "Permission denied", str(file))
            return real_open(file, *args, **kwargs)

        monkeypatch.setattr("builtins.open", no_read)
    with pytest.raises(ConfigError, match=r"cannot read the config file \(permission denied\)"):
        lt.load_config(locked)
    monkeypatch.undo()
    assert not runs.exists()
    # A YAML merge key is not a repeat: keys of its own override the merged ones.
    merged = tmp_path / "merged.yaml"
    merged.write_text("model: &m {class_path: lightrainer.modules.ClassificationModule}\nepochs: 3\n")
    assert lt.load_config(merged).epochs == 3


def test_a_yaml_alias_bomb_is_refused_before_it_expands(tmp_path, capsys) -> None:
    # "Billion laughs": 9 levels of 9 aliases, under 1 KB, expanding to 9**9 (387 million) strings.
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\n")
    assert bomb.stat().st_size < 1024
    with pytest.raises(ConfigError, match=r"aliases \(\*name\) expand it to more than 100000 values"):
        lt.load_config(bomb)
    assert "alias bomb" in refused_by_cli(capsys, ["fit", "--config", str(bomb), "--save_dir", str(tmp_path / "r")])
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"seed": 99999999999}, r"seed: must be at most 4294967295, got 99999999999"),
        ({"seed": -1}, r"seed: must be >= 0"),
        ({"batch": 1e30}, r"batch: 1e\+30 is out of range for an integer setting"),
        ({"batch": "1e30"}, r"batch: '1e30' is out of range for an integer setting"),
        ({"batch": 2**31}, r"batch: must be at most 2147483647"),
        ({"epochs": 10**12}, r"epochs: must be at most 2147483647, got 1000000000000"),
        ({"epochs": 10**17}, r"epochs: must be at most 2147483647, got 1e\+17"),
        ({"num_workers": 10**10}, r"num_workers: must be at most 2147483647"),
        ({"nan_patience": -1}, r"nan_patience: must be >= 0"),
        ({"name": "../x"}, r"name: '../x' is not a folder name"),
        ({"name": "/tmp/abs"}, r"name: '/tmp/abs' is not a folder name"),
        ({"name": "."}, r"name: '.' is not a folder name"),
        ({"name": ".."}, r"name: '..' is not a folder name"),
        ({"name": "a/b"}, r"name: 'a/b' is not a folder name"),
        ({"name": "a\\b"}, r"is not a folder name"),
        ({"name": "  "}, r"name: a value is required"),
        ({"save_dir": "$LIGHTRAINER_UNSET_VARIABLE/runs"}, r"save_dir: .*\$LIGHTRAINER_UNSET_VARIABLE, which is not set"),
    ],
)
def test_absurd_values_and_escaping_names_are_refused(values: dict, message: str) -> None:
    os.environ.pop("LIGHTRAINER_UNSET_VARIABLE", None)
    with pytest.raises(ConfigError, match=message):
        lt.load_config(values)


def test_seed_at_the_numpy_limit_is_accepted() -> None:
    assert lt.load_config({"seed": 2**32 - 1}).seed == 2**32 - 1


def test_save_dir_expands_home_and_variables_once(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("RUNS_ROOT", str(tmp_path / "scratch"))
    monkeypatch.chdir(tmp_path)
    assert lt.load_config({"save_dir": "~/runs"}).save_dir == str(tmp_path / "home" / "runs")
    cfg = config(Path("$RUNS_ROOT/runs"), name="exp")
    assert cfg.save_dir == str(tmp_path / "scratch" / "runs")
    assert cfg.replace(epochs=2).save_dir == cfg.save_dir  # re-validated, still one place
    lt.build_trainer(cfg, enable_progress_bar=False)
    assert cfg.run_dir == str(tmp_path / "scratch" / "runs" / "exp")
    assert not (tmp_path / "$RUNS_ROOT").exists() and not (tmp_path / "~").exists()


def test_save_dir_that_is_a_file_is_refused(tmp_path, capsys) -> None:
    taken = tmp_path / "runs"
    taken.write_text("a file")
    with pytest.raises(ConfigError, match=r"save_dir: .*runs exists and is not a folder"):
        config(taken)
    with pytest.raises(ConfigError, match="save_dir: cannot create the run folder"):
        create_run_dir(taken / "inner", "x")  # created meanwhile: the claim says why it cannot
    refused_by_cli(capsys, ["fit", "--config", DIGITS, "--save_dir", str(taken)])


# ------------------------------------------------------------------------------ run folders
def test_names_ending_in_digits_are_never_cut() -> None:
    assert [numbered_name("exp", n) for n in (1, 2, 3)] == ["exp", "exp2", "exp3"]
    assert [numbered_name("resnet18", n) for n in (1, 2, 10)] == ["resnet18", "resnet18-2", "resnet18-10"]
    assert run_number("resnet18", "resnet18-2") == 2 and run_number("resnet18", "resnet182") is None
    assert run_number("exp", "exp2") == 2 and run_number("exp", "exp-2") is None
    assert run_number("exp", "exp_other") is None and run_number("exp", "exp02") is None
    assert run_number("exp", "exp1") is None and run_number("exp", "exp") == 1


def test_second_run_of_a_digit_name_lands_beside_it(tmp_path) -> None:
    for expected in ("resnet18", "resnet18-2", "resnet18-3"):
        cfg = config(tmp_path, name="resnet18")
        lt.build_trainer(cfg, enable_progress_bar=False)
        assert cfg.run_dir == str(tmp_path / expected)
    (tmp_path / "pexp").mkdir()
    (tmp_path / "pexp_other").mkdir()
    (tmp_path / "pexp3").mkdir()
    assert [p.name for p in run_folders(tmp_path, "pexp")] == ["pexp", "pexp3"]  # never pexp_other
    assert [p.name for p in run_folders(tmp_path, "resnet18")] == ["resnet18", "resnet18-2", "resnet18-3"]


RACE = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    save_dir, ready, go = sys.argv[1:4]
    import lightrainer as lt
    cfg = lt.load_config(dict(save_dir=save_dir, name="race", device="cpu", num_workers=0, plots=False))
    Path(ready).write_text("ready")
    while not Path(go).exists():
        time.sleep(0.0005)
    lt.build_trainer(cfg, enable_progress_bar=False)
    print("RUN_DIR " + json.dumps(cfg.run_dir))
    """
)


def test_three_processes_that_start_together_get_three_folders(tmp_path) -> None:
    script, go, save_dir = tmp_path / "race.py", tmp_path / "go", tmp_path / "runs"
    script.write_text(RACE)
    readies = [tmp_path / f"ready{i}" for i in range(3)]
    procs = [subprocess.Popen([sys.executable, str(script), str(save_dir), str(r), str(go)], env=clean_env(),
                              cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in readies]
    try:
        end = time.monotonic() + 120
        while not all(r.exists() for r in readies):
            assert all(p.poll() is None for p in procs), [p.communicate()[0][-2000:] for p in procs if p.poll() is not None]
            assert time.monotonic() < end, "the processes never got ready"
            time.sleep(0.01)
        go.write_text("go")  # the three leave their wait within a millisecond
        outputs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    dirs = [json.loads(line.split(" ", 1)[1]) for out in outputs for line in out.splitlines() if line.startswith("RUN_DIR ")]
    assert len(dirs) == 3, outputs
    assert sorted(Path(d).name for d in dirs) == ["race", "race2", "race3"]
    assert sorted(p.name for p in save_dir.iterdir()) == ["race", "race2", "race3"]


def test_a_run_that_fails_before_writing_leaves_no_folder(tmp_path) -> None:
    class BadData(ArrayDataModule):
        def setup(self, stage=None) -> None:
            raise ConfigError("data: image folder holds a corrupt image (the data pre-check)")

    cfg = config(tmp_path, name="failed")
    train, val = make_data()
    trainer = lt.build_trainer(cfg, enable_progress_bar=False)
    assert (tmp_path / "failed" / "weights").is_dir()
    with pytest.raises(ConfigError, match="corrupt image"):
        trainer.fit(ClassificationModule(PoisonableNet(), cfg), datamodule=BadData(cfg, train=train, val=val))
    assert not (tmp_path / "failed").exists()
    # A Trainer argument Lightning refuses: the folder build_trainer made is removed too.
    with pytest.raises(Exception):
        lt.build_trainer(config(tmp_path, name="bad_args"), enable_progress_bar=False, limit_train_batches=-1)
    assert not (tmp_path / "bad_args").exists()
    # A folder holding anything is never removed.
    keep = tmp_path / "keep"
    (keep / "weights").mkdir(parents=True)
    (keep / "weights" / "best.pt").write_bytes(b"x")
    assert not remove_if_empty(keep) and (keep / "weights" / "best.pt").exists()


def test_export_engine_without_tensorrt_is_refused_before_the_folder(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    monkeypatch.setenv("PATH", str(tmp_path))  # no trtexec either
    with pytest.raises(MissingDependencyError, match="needs TensorRT"):
        lt.build_trainer(config(tmp_path, name="engine", export="engine"), enable_progress_bar=False)
    assert not (tmp_path / "engine").exists()
    line = refused_by_cli(capsys, ["fit", "--config", DIGITS, "--save_dir", str(tmp_path / "runs"),
                                   "--export", "engine"])
    assert "TensorRT" in line and not (tmp_path / "runs").exists()


# ------------------------------------------------------------------------------ images
def _png(width: int, height: int, payload: bytes = b"\x00") -> bytes:
    """A PNG whose header claims ``width`` x ``height`` (no need to hold the pixels to test a bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(payload)) + chunk(b"IEND", b"")


def test_damaged_images_and_decompression_bombs_are_refused_by_name(tmp_path) -> None:
    from PIL import Image

    good = tmp_path / "good.png"
    Image.new("L", (8, 8), 128).save(good)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:40])
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(os.urandom(256))
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png(20000, 20000))  # 400 million pixels claimed by a few bytes
    big = tmp_path / "big.png"
    big.write_bytes(_png(10000, 10000))  # above our limit, below twice Pillow's
    assert scan_image(str(good)) == ("PNG", 8, 8)

    def problem(path: Path) -> str:
        with pytest.raises(BadImage) as info:
            scan_image(str(path))
        return str(info.value)

    for path in (truncated, garbage):
        assert "not a readable image" in problem(path)
    assert "decompression bomb" in problem(big) or "too large" in problem(big)
    assert "too large" in problem(bomb) or "decompression bomb" in problem(bomb)
    assert len(check_image_files([str(good), str(good)], skip_bad=False).good) == 2
    with pytest.raises(ConfigError, match=r"4 of 5 image files cannot be read: .*truncated\.png.*Remove or replace"):
        check_image_files([str(p) for p in (good, truncated, garbage, bomb, big)], skip_bad=False)
    jpeg = tmp_path / "cut.jpg"
    Image.new("RGB", (64, 64), (200, 10, 10)).save(jpeg, quality=95)
    jpeg.write_bytes(jpeg.read_bytes()[:-200])
    assert str(jpeg) in problem(jpeg)  # refused by name without decoding the pixels


# ------------------------------------------------------------------------------ NaN
def test_non_finite_verdict_is_a_pure_decision() -> None:
    where = dict(epoch=2, batch=3, batches=6, run_dir="runs/x")
    assert non_finite_verdict(1, 1, 0, **where)[0] is True  # nan_patience 0: stop at the first
    stop, message = non_finite_verdict(10, 12, 10, **where)
    assert not stop and "skipped (10 in a row, 12 in all" in message and "epoch 2, batch 3/6" in message
    stop, message = non_finite_verdict(11, 11, 10, **where)
    assert stop and "training diverged" in message and "runs/x/weights" in message and "epoch 2, batch 3/6" in message


class PoisonBatches(L.Callback):
    """Makes the network's output NaN on the training batches ``(epoch, batch)`` listed, or on
    every training batch from ``from_epoch`` on; snapshots the weights files when an epoch starts."""

    def __init__(self, batches=(), from_epoch: int | None = None) -> None:
        self.batches, self.from_epoch = set(batches), from_epoch
        self.files: dict[str, bytes] = {}

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        weights = Path(trainer.default_root_dir) / "weights"
        self.files = {p.name: p.read_bytes() for p in weights.iterdir() if p.is_file()}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        epoch = trainer.current_epoch
        late = self.from_epoch is not None and epoch >= self.from_epoch
        pl_module.net.poisoned = late or (epoch, batch_idx) in self.batches

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        pl_module.net.poisoned = False


@pytest.mark.parametrize("optimizer", ["SGD", "RMSProp"])  # skipped on the device (fused) / on the host
def test_nan_loss_is_skipped_then_stops_the_run_and_keeps_the_last_finite_checkpoints(tmp_path, optimizer) -> None:
    # 6 batches an epoch, a step every 2 (nbs 32 / batch 16): the NaN epoch's steps are at batches 2, 4, 6.
    cfg = config(tmp_path, name="nan", warmup_epochs=0, nan_patience=1, optimizer=optimizer, lr0=0.01)
    poison = PoisonBatches(from_epoch=1)
    with pytest.raises(TrainingDiverged, match=r"2 optimizer step\(s\) in a row .* epoch 2, batch 4/6"):
        fit_run(cfg, callbacks=[poison])
    weights = tmp_path / "nan" / "weights"
    assert {p.name: p.read_bytes() for p in weights.iterdir()} == poison.files  # untouched since epoch 1
    for path in weights.iterdir():
        assert all_finite(torch.load(path, weights_only=True)), path
    assert torch.load(weights / "last.pt", weights_only=True)["epoch"] == 0


@pytest.mark.parametrize(("optimizer", "window"), [("SGD", 1), ("SGD", 0), ("Adam", 0), ("RMSProp", 1)])
def test_an_isolated_nan_batch_is_skipped_and_training_goes_on(tmp_path, optimizer, window) -> None:
    # Window 0 is the very first optimizer step (batches 0-1): nothing trained yet, no optimizer state.
    cfg = config(tmp_path, name="blip", warmup_epochs=0, epochs=2, optimizer=optimizer, lr0=0.01)
    first, last = 2 * window, 2 * window + 1
    before: dict = {}

    class Watch(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if (trainer.current_epoch, batch_idx) == (0, first):
                before.update({k: v.clone() for k, v in pl_module.net.state_dict().items()})

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if (trainer.current_epoch, batch_idx) == (0, last):  # the step of this window: skipped
                assert_same_tensors(pl_module.net.state_dict(), before)
                assert all(p.grad is None for p in pl_module.net.parameters())  # dropped, not carried
                state = trainer.optimizers[0].state_dict()["state"]
                assert all_finite(state)
                if window == 0:  # a skipped first step leaves no state but zeros
                    assert all(float(t.abs().sum()) == 0 for s in state.values() for t in s.values()
                               if isinstance(t, torch.Tensor) and t.dim())

    trainer, module = fit_run(cfg, callbacks=[PoisonBatches(batches=[(0, first)]), Watch()])
    assert module.non_finite_steps == 1 and trainer.current_epoch == 2
    for path in (tmp_path / "blip" / "weights").iterdir():
        assert all_finite(torch.load(path, weights_only=True)), path


def test_a_state_holding_nan_is_never_written(tmp_path, caplog) -> None:
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(2)}, "epoch": 0}, path)
    good = path.read_bytes()
    with caplog.at_level(logging.ERROR):
        AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.tensor([1.0, float("nan")])}}, path)
    assert path.read_bytes() == good and "is not written: the state holds NaN (state_dict.w)" in caplog.text
    assert nan_entries({"loops": {"metric": torch.tensor(float("nan"))}, "x": [torch.zeros(1)]}) == ["loops.metric"]

    class Break(L.Callback):  # a buffer goes NaN in epoch 2 (as a NaN batch does to BatchNorm's statistics)
        def on_train_epoch_end(self, trainer, pl_module) -> None:
            if trainer.current_epoch == 1:
                pl_module.net.register_buffer("stat", torch.tensor([float("nan")]))

    cfg = config(tmp_path, name="state")
    with pytest.raises(TrainingDiverged, match=r"epoch 2: the model's state is not finite \(net.stat\)"):
        fit_run(cfg, callbacks=[Break()])
    saved = torch.load(tmp_path / "state" / "weights" / "last.pt", weights_only=True)
    assert saved["epoch"] == 0 and all_finite(saved)


# The NaN network for the command line: its output turns NaN after a few training batches.
NAN_NET = textwrap.dedent(
    """
    import torch
    from torch import nn

    class NaNAfter(nn.Module):
        def __init__(self, batches: int = 2):
            super().__init__()
            self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
            self.batches, self.seen = batches, 0

        def forward(self, x):
            self.seen += int(self.training)
            out = self.body(x)
            return out * float("nan") if self.training and self.seen > self.batches else out
    """
)


def test_a_diverged_run_exits_1_from_the_command_line(tmp_path) -> None:
    import yaml

    (tmp_path / "nan_net.py").write_text(NAN_NET)  # beside the config: importable by its class_path
    values = yaml.safe_load(Path(DIGITS).read_text())
    values["model"]["init_args"]["net"] = {"class_path": "nan_net.NaNAfter", "init_args": {"batches": 5}}
    (tmp_path / "nan.yaml").write_text(yaml.safe_dump(values))
    # 4 batches an epoch, a step each: the second epoch's second step is the first non-finite one.
    code = cli_exit_code(["fit", "--config", str(tmp_path / "nan.yaml"), "--save_dir", str(tmp_path / "runs"),
                          "--epochs", "3", "--nan_patience", "0", FEW[0], "4", *FEW[2:]])
    assert code == 1
    weights = tmp_path / "runs" / "digits" / "weights"
    assert torch.load(weights / "last.pt", weights_only=True)["epoch"] == 0
    for path in weights.iterdir():
        assert all_finite(torch.load(path, weights_only=True)), path


# ------------------------------------------------------------------------------ signals
def test_resume_command_and_exit_codes() -> None:
    ckpt = Path("runs/x/weights/last.ckpt")
    assert exit_code(signal.SIGTERM) == 143 and exit_code(signal.SIGINT) == 130
    assert resume_command(["/usr/bin/lightrainer", "fit", "--config", "a b.yaml", "--resume"], ckpt) == (
        "lightrainer fit --config 'a b.yaml' --ckpt_path runs/x/weights/last.ckpt")
    assert resume_command(["/x/lightrainer/__main__.py", "fit", "--ckpt_path", "old.ckpt", "--epochs", "3"], ckpt) == (
        "lightrainer fit --epochs 3 --ckpt_path runs/x/weights/last.ckpt")
    assert resume_command(["train.py"], ckpt) is None and resume_command(["lightrainer", "export"], ckpt) is None


@pytest.mark.parametrize("loader", ["in-memory", "dataloader"])
def test_stopped_mid_epoch_and_resumed_equals_the_run_never_stopped(tmp_path, loader) -> None:
    sigint = signal.getsignal(signal.SIGINT)
    _, full = fit_run(config(tmp_path, name="full"), loader)
    with pytest.raises(SystemExit) as stopped:
        fit_run(config(tmp_path, name="cut"), loader, callbacks=[SignalAt(signal.SIGINT, epoch=1, batch=2)])
    assert stopped.value.code == 130
    ckpt = tmp_path / "cut" / "weights" / "last.ckpt"
    state = torch.load(ckpt, weights_only=True)
    assert state["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"epoch": 1, "batches": 3}]
    _, resumed = fit_run(config(tmp_path, name="cut"), loader, ckpt_path=ckpt, run_dir=tmp_path / "cut")
    assert_same_tensors(resumed.net.state_dict(), full.net.state_dict())
    cut_files, full_files = tmp_path / "cut", tmp_path / "full"
    for name in ("last.pt", "best.pt"):
        assert_same_tensors(torch.load(cut_files / "weights" / name, weights_only=True)["model"],
                            torch.load(full_files / "weights" / name, weights_only=True)["model"])
    assert results(cut_files) == results(full_files)  # every column but the wall-clock time
    assert signal.getsignal(signal.SIGINT) is sigint  # restored after the fit


PARKED_RUN = textwrap.dedent(
    """
    import logging, sys, time
    from pathlib import Path
    import lightning as L
    import torch
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    save_dir, marker, tests = sys.argv[1:4]
    sys.path.insert(0, tests)
    from test_hostile import config, fit_run

    class Park(L.Callback):
        # Waits at batch 3 of the second epoch until the test's SIGTERM arrives.
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if (trainer.current_epoch, batch_idx) == (1, 3):
                Path(marker).write_text("parked")
                end = time.monotonic() + 120
                while not trainer.received_sigterm and time.monotonic() < end:
                    time.sleep(0.02)

    fit_run(config(Path(save_dir), name="cut"), callbacks=[Park()])
    """
)


def test_sigterm_saves_the_interrupted_state_exits_143_and_the_run_resumes(tmp_path) -> None:
    script, marker = tmp_path / "parked.py", tmp_path / "parked"
    script.write_text(PARKED_RUN)
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path), str(marker), str(TESTS)], env=clean_env(),
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        end = time.monotonic() + 120
        while not marker.exists():
            assert proc.poll() is None, proc.communicate()[0][-3000:]
            assert time.monotonic() < end, "the run never reached the signal"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, out[-3000:]
    ckpt = tmp_path / "cut" / "weights" / "last.ckpt"
    assert f"SIGTERM: stopped in epoch 2" in out and f"saved in {ckpt}" in out and "Resume with: trainer.fit(" in out
    state = load_checkpoint(ckpt, ClassificationModule)
    assert state["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"epoch": 1, "batches": 4}]
    assert newest_complete_checkpoint(tmp_path / "cut") == ckpt
    _, resumed = fit_run(config(tmp_path, name="cut"), ckpt_path=ckpt, run_dir=tmp_path / "cut")
    _, full = fit_run(config(tmp_path, name="full"))
    for key, want in full.net.state_dict().items():  # another process: equal to float rounding
        torch.testing.assert_close(resumed.net.state_dict()[key], want, rtol=1e-5, atol=1e-6, msg=key)
    assert (tmp_path / "cut" / "results.csv").read_text().splitlines()[0] == \
        (tmp_path / "full" / "results.csv").read_text().splitlines()[0]


def test_slurm_requeue_is_lightnings_and_a_requeued_job_continues_in_its_folder(tmp_path, monkeypatch) -> None:
    from lightning.fabric.plugins.environments import SLURMEnvironment

    for key, value in dict(SLURM_NTASKS="1", SLURM_NTASKS_PER_NODE="1", SLURM_NNODES="1", SLURM_PROCID="0",
                           SLURM_LOCALID="0", SLURM_NODEID="0", SLURM_JOB_NAME="train", SLURM_JOB_ID="4242",
                           SLURM_NODELIST="localhost").items():
        monkeypatch.setenv(key, value)
    for requeue in (False, True):
        (environment,) = with_slurm_requeue([], requeue)
        assert isinstance(environment, SLURMEnvironment) and environment.auto_requeue is requeue
        lt.build_trainer(config(tmp_path, name="job", requeue=requeue), enable_progress_bar=False)
    mine = SLURMEnvironment(auto_requeue=False)
    assert with_slurm_requeue([mine], True) == [mine]  # a cluster environment given is kept
    first = tmp_path / "job2"
    (first / "slurm_job").write_text("4242")  # what RunSetup writes when the job starts training
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    cfg = config(tmp_path, name="job", requeue=True)
    lt.build_trainer(cfg, enable_progress_bar=False)
    assert cfg.run_dir == str(first)  # the requeued job continues in its folder (Lightning loads its hpc_ckpt)
    monkeypatch.setenv("SLURM_JOB_ID", "777")  # another job: a new folder
    cfg = config(tmp_path, name="job", requeue=True)
    lt.build_trainer(cfg, enable_progress_bar=False)
    assert cfg.run_dir == str(tmp_path / "job3")
    monkeypatch.delenv("SLURM_NTASKS")
    assert with_slurm_requeue([], True) == []  # not under SLURM


# ------------------------------------------------------------------------------ temporary files, checkpoints
def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_temporary_files_of_killed_runs_are_removed_at_the_next_start(tmp_path, caplog) -> None:
    run = tmp_path / "run"
    (run / "weights").mkdir(parents=True)
    pid = dead_pid()
    stale = [run / f".results.csv.tmp{pid}", run / "weights" / f".best.pt.tmp{pid}",
             run / "weights" / f".last.ckpt.tmp{pid}"]
    for path in stale:
        path.write_bytes(b"")
    live = [temp_path_for(run / "weights" / "last.pt"), run / f".plot.png.tmp{os.getppid()}", run / "notes.tmp1"]
    for path in live:
        path.write_bytes(b"x")
    assert sorted(stale_temp_files(run / "weights")) == sorted(stale[1:])
    with caplog.at_level(logging.INFO):
        lt.build_trainer(config(tmp_path), run_dir=run, enable_progress_bar=False)  # a resume's start
    assert not any(p.exists() for p in stale) and all(p.exists() for p in live)
    assert "removed 3 temporary file(s) that a killed run left" in caplog.text


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A finished two-epoch run's folder."""
    save_dir = tmp_path_factory.mktemp("finished")
    fit_run(config(save_dir, name="done", epochs=2))
    return save_dir / "done"


def test_resume_takes_the_newest_complete_checkpoint(tmp_path, finished_run) -> None:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    weights = run / "weights"
    assert newest_complete_checkpoint(run) == weights / "last.ckpt"
    data = (weights / "last.ckpt").read_bytes()
    (weights / "last.ckpt").write_bytes(data[: len(data) // 2])  # killed while the first last.ckpt was written
    assert newest_complete_checkpoint(run) == weights / "best.ckpt"
    (weights / "best.ckpt").unlink()
    assert newest_complete_checkpoint(run) is None
    assert newest_complete_checkpoint(tmp_path / "nowhere") is None


def test_checkpoints_are_checked_as_data_before_anything_is_built(tmp_path, finished_run) -> None:
    from lightrainer.modules import VQVAEModule

    ckpt = load_checkpoint(finished_run / "weights" / "last.ckpt", ClassificationModule)
    check_checkpoint_payload(ckpt, ClassificationModule)
    with pytest.raises(ConfigError, match=r"is a checkpoint of task lightrainer\.modules\..*ClassificationModule, "
                                          r"not of lightrainer\.modules\..*VQVAEModule"):
        check_checkpoint_payload(ckpt, VQVAEModule, "last.ckpt")
    lacking = {k: v for k, v in ckpt.items() if k != "pytorch-lightning_version"}
    with pytest.raises(ConfigError, match=r"not a complete Lightning checkpoint \(no 'pytorch-lightning_version'"):
        check_checkpoint_payload(lacking, ClassificationModule)
    for foreign in ([1, 2], {"state_dict": {}}, {"lightrainer": "x"}):
        with pytest.raises(ConfigError, match="is not a lightrainer checkpoint, or it is damaged"):
            check_checkpoint_payload(foreign)
    # A file that runs code when unpickled without weights_only: refused as data, never run.
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.ckpt"
    torch.save({"lightrainer": {}, "x": Exploit()}, evil)
    with pytest.raises(ConfigError) as refused:
        load_checkpoint(evil)
    assert "not a lightrainer checkpoint, or it is damaged" in str(refused.value)
    assert "weights_only" not in str(refused.value) and not marker.exists()
    (tmp_path / "cut.ckpt").write_bytes((finished_run / "weights" / "last.ckpt").read_bytes()[:1000])
    with pytest.raises(ConfigError, match=r"cannot be read .*truncated or corrupt"):
        load_checkpoint(tmp_path / "cut.ckpt")
