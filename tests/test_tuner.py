"""The Tuner: an lr range test for lr0 (`lightrainer tune-lr`) and AutoBatch (`batch: -1`)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

import lightrainer as lt
from lightrainer.build import build_from_config
from lightrainer.cli import main
from lightrainer.tuner import autobatch_size, lr_find, suggest_lr

REPO = Path(__file__).resolve().parents[1]
DIGITS = str(REPO / "configs" / "digits.yaml")


def test_suggestion_is_the_steepest_descent_of_the_loss() -> None:
    lrs = np.logspace(-6, 0, 61)
    # A loss that falls fastest at lr = 1e-3 (a tanh step in log lr), then rises.
    losses = 2.0 - np.tanh(np.log10(lrs) + 3) + np.where(lrs > 0.1, 10 * (lrs - 0.1), 0.0)
    assert suggest_lr(lrs, losses) == pytest.approx(1e-3, rel=0.26)  # the grid's step is 10**0.1
    assert suggest_lr(lrs[:6], losses[:6]) is None


def test_autobatch_sizes_on_the_fitted_line() -> None:
    mib = 2**20
    points = [(1, 110 * mib), (2, 120 * mib), (4, 140 * mib), (8, 180 * mib)]  # 100 MiB + 10 MiB a sample
    assert autobatch_size(points, free_bytes=1000 * mib, fraction=0.6) == 50  # (600 - 100) / 10
    assert autobatch_size(points, free_bytes=10 * mib * 10**4, fraction=0.6) == 1024
    with pytest.raises(lt.ConfigError, match="memory did not grow"):
        autobatch_size([(1, 5.0), (2, 5.0)], free_bytes=100.0)


def test_lr_find_leaves_the_module_as_it_was(tmp_path) -> None:
    cfg = lt.load_config(DIGITS, save_dir=str(tmp_path), num_workers=0)
    module, data = build_from_config(cfg)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    result = lr_find(cfg, module, data, num_steps=20, out_dir=tmp_path / "sweep")
    assert len(result.lrs) == 20 and result.lrs[0] == pytest.approx(1e-6) and result.lrs[-1] == pytest.approx(1.0)
    ratios = np.diff(np.log(result.lrs))
    assert np.allclose(ratios, ratios[0])  # exponential sweep
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())
    assert module.cfg is cfg and cfg.warmup_epochs == 1.0
    assert (tmp_path / "sweep" / "lr_find.png").is_file() and (tmp_path / "sweep" / "lr_find.csv").is_file()
    assert result.suggestion is not None and 1e-6 < result.suggestion < 1
    with pytest.raises(lt.ConfigError, match="qat: True"):
        lr_find(cfg.replace(qat=True), module, data)
    with pytest.raises(lt.ConfigError, match="devices: 1"):
        lr_find(cfg.replace(devices=2), module, data)


def test_tune_lr_command_and_autobatch_on_the_cpu(tmp_path, capsys) -> None:
    assert main(["tune-lr", "--config", DIGITS, "--save_dir", str(tmp_path), "--num_steps", "15"]) == 0
    rows = (tmp_path / "digits_lr_find" / "lr_find.csv").read_text().splitlines()
    assert rows[0] == "lr,smoothed_loss" and len(rows) == 16 and all(math.isfinite(float(r.split(",")[1])) for r in rows[1:])
    if torch.cuda.is_available():
        pytest.skip("AutoBatch runs on this machine's GPU")
    assert main(["fit", "--config", DIGITS, "--save_dir", str(tmp_path / "auto"), "--batch", "-1"]) == 2
    assert "batch: -1 (AutoBatch) sizes the batch to a CUDA GPU's memory" in capsys.readouterr().err
    assert not (tmp_path / "auto").exists()
