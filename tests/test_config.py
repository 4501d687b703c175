"""The config boundary: seed keys and defaults, the None string, types, ranges, choices, derived values."""

from __future__ import annotations

import os

import pytest
import yaml

import lightrainer as lt
from lightrainer.config import ConfigError, derived_values, dump_config

SEED_DEFAULTS = {  # the original lightrainer's README, key by key
    "batch": 32, "nbs": 64, "num_workers": 4, "patience": 100, "epochs": 200, "amp": False,
    "ptq": False, "num_batches": None, "method": "entropy", "qat": False, "trt_quant": False,
    "optimizer": "Adam", "scheduler": "Cosine", "lr0": 0.01, "lrf": 0.01, "gamma": 0.9, "power": 2.0,
    "momentum": 0.937, "weight_decay": 0.0005, "warmup_epochs": 3.0, "warmup_momentum": 0.8,
    "warmup_bias_lr": 0.1,
}


def test_defaults_are_the_seeds() -> None:
    cfg = lt.load_config()
    for key, value in SEED_DEFAULTS.items():
        assert getattr(cfg, key) == value, key


@pytest.mark.parametrize("name", ["trainer_cls_cfg.yml", "trainer_imgen_cfg.yml"])
def test_seed_files_load_unchanged(repo_path: str, name: str) -> None:
    path = os.path.join(repo_path, "configs", name)
    raw = yaml.safe_load(open(path))
    cfg = lt.load_config(path)
    assert cfg.num_batches is None and raw["num_batches"] == "None"  # YAML's None string is null
    for key, value in raw.items():
        if key in SEED_DEFAULTS and value != "None":
            assert getattr(cfg, key) == value, key
        elif key in ("recon_weight", "lpips_weight", "vq_weight"):
            assert cfg.extra(key) == value


def test_derived_values() -> None:
    cfg = lt.load_config({"batch": 16, "nbs": 64, "weight_decay": 0.001})
    assert cfg.accumulate == 4  # max(round(64 / 16), 1)
    assert cfg.weight_decay_scaled == pytest.approx(0.001 * 16 * 4 / 64)
    cfg = lt.load_config({"batch": 100, "nbs": 64})
    assert cfg.accumulate == 1
    assert cfg.weight_decay_scaled == pytest.approx(0.0005 * 100 / 64)
    assert cfg.warmup_iters(10) == 100  # max(round(3 * 10), 100)
    assert cfg.warmup_iters(50) == 150
    assert lt.load_config({"warmup_epochs": 0}).warmup_iters(50) == -1


def test_overrides_and_case_insensitive_choices() -> None:
    cfg = lt.load_config({"optimizer": "sgd", "epochs": 3}, epochs="7", scheduler="linear")
    assert (cfg.optimizer, cfg.epochs, cfg.scheduler) == ("SGD", 7, "Linear")


@pytest.mark.parametrize(
    "device, expected",
    [(0, [0]), ("0", [0]), ("0,1", [0, 1]), ([0, 1], [0, 1]), ("cpu", "cpu"), ("", None), (None, None), ("None", None)],
)
def test_device_forms(device: object, expected: object) -> None:
    assert lt.load_config({"device": device}).device == expected


@pytest.mark.parametrize(
    "values, message",
    [
        ({"lr00": 0.1}, r"unknown key 'lr00' \(did you mean 'lr0'\?\)"),
        ({"bacth": 8}, r"did you mean 'batch'"),
        ({"batch": 0}, r"batch: must be >= 1"),
        ({"nbs": 0}, r"nbs: must be >= 1"),
        ({"epochs": 0}, r"epochs: must be >= 1"),
        ({"lr0": 0}, r"lr0: must be in \(0, 10\]"),
        ({"lrf": -0.1}, r"lrf: must be >= 0"),
        ({"momentum": 1.0}, r"momentum: must be in \[0, 1\)"),
        ({"momentum": -0.1}, r"momentum: must be in \[0, 1\)"),
        ({"optimizer": "Adamm"}, r"optimizer: 'Adamm' is not one of SGD, Adam.*did you mean 'Adam'"),
        ({"scheduler": "cos"}, r"scheduler: 'cos' is not one of Cosine"),
        ({"method": "minmax"}, r"method: 'minmax' is not one of entropy, max, percentile, mse"),
        ({"batch": "big"}, r"batch: expected an integer, got 'big'"),
        ({"batch": 8.5}, r"batch: expected an integer"),
        ({"amp": "yes"}, r"amp: 'yes' is not one of False, True, fp16, bf16"),
        ({"lr0": "fast"}, r"lr0: expected a number"),
        ({"num_batches": 0}, r"num_batches: must be >= 1"),
        ({"ptq": True, "qat": True}, r"ptq and qat are both True"),
        ({"device": "gpu0"}, r"device: expected GPU ids"),
        ({"vq_weight": -1}, r"vq_weight"),
    ],
)
def test_bad_values_name_the_key(values: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        lt.load_config(values)


def test_missing_and_malformed_files(tmp_path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        lt.load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("batch: [1, 2\nepochs: 3\n")
    with pytest.raises(ConfigError, match="malformed YAML"):
        lt.load_config(bad)
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        lt.load_config(listing)


def test_args_yaml_round_trip(tmp_path) -> None:
    cfg = lt.load_config({"batch": 16, "num_batches": "None", "vq_weight": 0.25})
    dump_config(cfg, tmp_path / "args.yaml", {"warmup_iters": 100})
    text = (tmp_path / "args.yaml").read_text()
    derived = derived_values(text)
    assert derived["accumulate"] == 4 and derived["warmup_iters"] == 100
    data = yaml.safe_load(text)
    assert "derived" not in data  # comments: the file is a config as it is
    again = lt.load_config(data)
    assert again.to_dict() == cfg.to_dict()
