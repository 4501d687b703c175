"""Augmentation keys: every registered key validated (exit 2 naming it), off by default, each one
checked against a formula written out here (float64 warps, colorsys), the same on 1 and 2 ranks."""

from __future__ import annotations

import colorsys
import math

import numpy as np
import pytest
import torch

import lightrainer as lt
from lightrainer.cli import main
from lightrainer.config import ConfigError
from lightrainer.datamodules import (
    AUGMENTATIONS,
    ArrayDataModule,
    BatchAugment,
    InMemoryBatchLoader,
    MNIST5kDataModule,
)
from lightrainer.datamodules.augment import BETA32_ROWS, batch_augment
from lightrainer.datamodules.memory import RandomShift
from lightrainer.modules import ClassificationModule

#: A moderate value of every key (all on at once).
ALL_ON = {"fliplr": 0.5, "flipud": 0.3, "degrees": 15.0, "translate": 0.1, "scale": 0.4, "hsv_h": 0.05,
          "hsv_s": 0.5, "hsv_v": 0.4, "erasing": 0.5, "mixup": 0.5, "cutmix": 0.5}


def cfg_with(**keys):
    return lt.load_config({"batch": 8, "num_workers": 0, **keys}, task_class=ClassificationModule)


def draw(aug: BatchAugment, n: int, seed: int = 0) -> torch.Tensor:
    return aug.draw(n, torch.Generator().manual_seed(seed))


# --- the registry and the keys ----------------------------------------------------------------
def test_all_on_names_every_registered_key():
    assert set(ALL_ON) == set(AUGMENTATIONS), "give the new key a value in ALL_ON"


@pytest.mark.parametrize("key", list(AUGMENTATIONS))
def test_every_key_is_a_classification_key_off_by_default(key):
    cfg = cfg_with()
    assert key in cfg.task_specs and cfg.extra(key) == 0.0
    assert batch_augment(cfg) is None  # nothing on: no transform, today's training
    assert isinstance(batch_augment(cfg.replace(shift=2)), RandomShift)  # shift alone: as before


@pytest.mark.parametrize("bad", [-0.1, 1000.0, "abc", "nan"])
@pytest.mark.parametrize("key", list(AUGMENTATIONS))
def test_bad_values_are_refused_naming_the_key(key, bad):
    with pytest.raises(ConfigError, match=rf"^{key}: "):
        cfg_with(**{key: bad})


@pytest.mark.parametrize("key", list(AUGMENTATIONS))
def test_bad_value_on_the_command_line_exits_2_naming_the_key(tmp_path, capsys, key):
    code = main(["fit", "--config", _yaml(tmp_path), f"--{key}", "-1"])
    assert code == 2
    err = capsys.readouterr().err
    assert f"{key}: must be >= 0" in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()


def _yaml(tmp_path) -> str:
    path = tmp_path / "aug.yaml"
    path.write_text(f"save_dir: {tmp_path / 'runs'}\nepochs: 1\n")
    return str(path)


def test_every_key_changes_a_batch():
    x = torch.rand(16, 3, 12, 10)
    y = torch.arange(16) % 4
    for key, value in ALL_ON.items():
        aug = BatchAugment({key: 1.0 if key not in ("degrees",) else value}, num_classes=4)
        params = draw(aug, 16)
        partners = None
        wanted = aug.partner_indices(params, 16)
        if wanted is not None:
            partners = (x[wanted], y[wanted])
        out = aug.apply_batch((x, y), params, partners)
        assert out[0].shape == x.shape and not torch.equal(out[0], x), key


# --- each key against a formula ---------------------------------------------------------------
def reference_warp(image: np.ndarray, forward: np.ndarray, fill: float) -> np.ndarray:
    """Bilinear sampling of ``image`` (C, H, W) at ``inverse(forward) @ (col, row, 1)`` for every
    output pixel, pixel centres at integer coordinates, neighbours outside the image worth
    ``fill`` (float64, written out pixel by pixel)."""
    c, h, w = image.shape
    inverse = np.linalg.inv(forward)
    out = np.empty_like(image, dtype=np.float64)
    for row in range(h):
        for col in range(w):
            sx, sy, _ = inverse @ np.array([col, row, 1.0])
            x0, y0 = math.floor(sx), math.floor(sy)
            value = np.zeros(c)
            for yy, wy in ((y0, 1 - (sy - y0)), (y0 + 1, sy - y0)):
                for xx, wx in ((x0, 1 - (sx - x0)), (x0 + 1, sx - x0)):
                    inside = 0 <= yy < h and 0 <= xx < w
                    value += wy * wx * (image[:, yy, xx] if inside else fill)
            out[:, row, col] = value
    return out


def rotation(angle_deg: float, h: int, w: int) -> np.ndarray:
    a = math.radians(angle_deg)
    cx, cy = (w - 1) / 2, (h - 1) / 2
    to_centre = np.array([[1, 0, -cx], [0, 1, -cy], [0, 0, 1.0]])
    rotate = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1.0]])
    return np.linalg.inv(to_centre) @ rotate @ to_centre


def crop_resize(u: np.ndarray, scale: float, h: int, w: int) -> np.ndarray:
    """The crop box of torchvision's RandomResizedCrop rule, mapped onto the whole image."""
    area = (1 - scale + scale * u[0]) * h * w
    ratio = math.exp(math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * u[1])
    cw, ch = min(math.sqrt(area * ratio), w), min(math.sqrt(area / ratio), h)
    left, top = u[2] * (w - cw), u[3] * (h - ch)
    # The box [left, left + cw] (pixel edges) onto [0, w]: pixel centres move with it.
    edges = np.array([[w / cw, 0, -left * w / cw], [0, h / ch, -top * h / ch], [0, 0, 1.0]])
    centres = np.array([[1, 0, 0.5], [0, 1, 0.5], [0, 0, 1.0]])
    return np.linalg.inv(centres) @ edges @ centres


@pytest.mark.parametrize("fill", [0.0, -1.5])
def test_geometry_is_one_warp_of_crop_then_rotation_then_translation(fill):
    pytest.importorskip("kornia")
    x = torch.rand(3, 2, 9, 11, dtype=torch.float32)
    values = {"scale": 0.5, "degrees": 30.0, "translate": 0.2}
    aug = BatchAugment(values, fill=fill)
    params = draw(aug, 3, seed=4)
    out = aug.apply(x, params).double().numpy()
    u = params.double().numpy()
    h, w = 9, 11
    for i in range(3):
        crop = crop_resize(u[0:4, i], 0.5, h, w)
        turn = rotation(30.0 * (2 * u[4, i] - 1), h, w)
        shift = np.array([[1, 0, 0.2 * (2 * u[5, i] - 1) * w], [0, 1, 0.2 * (2 * u[6, i] - 1) * h], [0, 0, 1.0]])
        expected = reference_warp(x[i].double().numpy(), shift @ turn @ crop, fill)
        np.testing.assert_allclose(out[i], expected, atol=2e-4)


def test_flips_are_exact():
    x = torch.randn(64, 2, 5, 6)
    for key, dim in (("fliplr", -1), ("flipud", -2)):
        aug = BatchAugment({key: 0.5})
        params = draw(aug, 64, seed=1)
        out = aug.apply(x, params)
        flipped = params[0] < 0.5
        assert 10 < int(flipped.sum()) < 54
        assert torch.equal(out[flipped], x[flipped].flip(dim)) and torch.equal(out[~flipped], x[~flipped])


def test_hsv_matches_colorsys():
    pytest.importorskip("kornia")
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    rgb = torch.rand(4, 3, 3, 5, dtype=torch.float32)
    x = (rgb - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    aug = BatchAugment({"hsv_h": 0.2, "hsv_s": 0.6, "hsv_v": 0.5}, mean=mean, std=std)
    params = draw(aug, 4, seed=2)
    out = aug.apply(x, params) * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
    u = params.double().numpy()
    for i in range(4):
        dh, gs, gv = 0.2 * (2 * u[0, i] - 1), 1 + 0.6 * (2 * u[1, i] - 1), 1 + 0.5 * (2 * u[2, i] - 1)
        for r in range(3):
            for c in range(5):
                h, s, v = colorsys.rgb_to_hsv(*rgb[i, :, r, c].double().tolist())
                want = colorsys.hsv_to_rgb((h + dh) % 1.0, min(s * gs, 1.0), min(v * gv, 1.0))
                np.testing.assert_allclose(out[i, :, r, c].double().numpy(), want, atol=1e-4)


def test_hsv_value_on_grey_images_is_a_gain():
    pytest.importorskip("kornia")
    x = torch.rand(8, 1, 4, 4)
    aug = BatchAugment({"hsv_v": 0.5, "hsv_h": 0.3})
    params = draw(aug, 8)
    gain = 1 + 0.5 * (2 * params[1] - 1)  # rows: hsv_h then hsv_v (registration order)
    torch.testing.assert_close(aug.apply(x, params), (x * gain.view(-1, 1, 1, 1)).clamp(0, 1), atol=1e-5, rtol=0)


def test_erasing_zeroes_one_rectangle_of_2_to_33_percent():
    x = torch.rand(200, 1, 20, 20) + 1.0  # nothing is 0 before
    aug = BatchAugment({"erasing": 0.5})
    params = draw(aug, 200, seed=3)
    out = aug.apply(x, params)
    erased = out == 0
    assert torch.equal(erased.any(dim=(1, 2, 3)), params[0] < 0.5)
    for i in torch.nonzero(params[0] < 0.5).flatten().tolist():
        rows, cols = torch.nonzero(erased[i, 0], as_tuple=True)
        box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        assert box == len(rows), "one rectangle"
        assert 0.015 * 400 <= len(rows) <= 0.35 * 400
        torch.testing.assert_close(out[i][~erased[i]], x[i][~erased[i]])


def test_mixup_blends_with_the_drawn_partner_by_beta_32_32():
    n, classes = 4000, 3
    x = torch.rand(n, 1, 2, 2)
    y = torch.arange(n) % classes
    aug = BatchAugment({"mixup": 1.0}, num_classes=classes)
    params = draw(aug, n, seed=5)
    wanted = aug.partner_indices(params, n)
    assert len(wanted) == n  # probability 1: every sample mixes
    out, targets = aug.apply_batch((x, y), params, (x[wanted], y[wanted]))
    ok = y != y[wanted]  # where the partner is of another class, the own class's share is lam
    lam = targets[torch.arange(n), y]
    torch.testing.assert_close(out[ok], lam[ok].view(-1, 1, 1, 1) * x[ok] + (1 - lam[ok]).view(-1, 1, 1, 1) * x[wanted][ok])
    torch.testing.assert_close(targets.sum(1), torch.ones(n))
    # Beta(32, 32): mean 1/2, std sqrt(32 * 32 / (64**2 * 65)).
    assert lam[ok].mean().item() == pytest.approx(0.5, abs=0.005)
    assert lam[ok].std().item() == pytest.approx(math.sqrt(32 * 32 / (64**2 * 65)), rel=0.08)
    assert aug.rows == 1 + 1 + BETA32_ROWS  # partner draw + mixup's own rows, no per-sample rows


def test_cutmix_pastes_a_box_and_weighs_labels_by_its_area():
    n = 64
    x, partner = torch.zeros(n, 1, 10, 10), torch.ones(n, 1, 10, 10)
    y = torch.zeros(n, dtype=torch.long)
    aug = BatchAugment({"cutmix": 1.0}, num_classes=2)
    params = draw(aug, n, seed=6)
    wanted = aug.partner_indices(params, n)
    out, targets = aug.apply_batch((x, y), params, (partner[wanted], torch.ones(n, dtype=torch.long)))
    area = out.mean(dim=(1, 2, 3))  # the pasted fraction of each image
    torch.testing.assert_close(targets[:, 1], area)
    for i in range(n):
        rows, cols = torch.nonzero(out[i, 0], as_tuple=True)
        if len(rows):
            assert (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1) == len(rows)


def test_mixing_needs_class_labels():
    with pytest.raises(ConfigError, match="^mixup: mixing images needs class labels"):
        BatchAugment({"mixup": 0.5}, num_classes=None)


# --- the loaders ------------------------------------------------------------------------------
def test_augmentation_is_the_same_on_1_and_2_ranks_for_every_key():
    """One process with batch 8 and two ranks with 4 each: every sample's augmentation (mixing
    partners included) is the same; the last global batch of 5 is split 3 + 2."""
    pytest.importorskip("kornia")
    n = 37
    x = torch.rand(n, 3, 8, 8)
    y = torch.arange(n) % 5
    aug = BatchAugment(ALL_ON, shift=1, num_classes=5)
    single = InMemoryBatchLoader((x, y), 8, shuffle=True, seed=3, transform=aug)
    ranks = [InMemoryBatchLoader((x, y), 4, shuffle=True, seed=3, rank=r, world_size=2, transform=aug) for r in range(2)]
    for _ in range(2):
        one = list(single)
        shards = [list(r) for r in ranks]
        for b, (bx, by) in enumerate(one):
            torch.testing.assert_close(torch.cat([s[b][0] for s in shards]), bx, rtol=0, atol=1e-6)
            torch.testing.assert_close(torch.cat([s[b][1] for s in shards]), by)
        assert by.shape == (5, 5) and by.dtype == torch.float32  # mixing on: class probabilities


def test_in_memory_datamodules_apply_the_keys_to_training_only():
    cfg = lt.load_config({"batch": 50, "fliplr": 0.5, "erasing": 0.5, "shift": 2})
    dm = MNIST5kDataModule(cfg)
    dm.setup()
    loader = dm.train_dataloader()
    assert isinstance(loader.transform, BatchAugment) and loader.transform.shift == 2
    assert dm.val_dataloader().transform is None
    x, y = next(iter(loader))
    assert x.shape == (50, 1, 28, 28) and y.dtype == torch.int64  # no mixing: labels stay labels


def test_fit_with_mixing_trains_on_probability_targets(tmp_path):
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(64, 1, 8, 8, generator=g), torch.arange(64) % 4
    cfg = lt.load_config({"batch": 16, "epochs": 1, "save_dir": str(tmp_path), "num_workers": 0, "mixup": 0.5,
                          "cutmix": 0.5, "fliplr": 0.5, "device": "cpu"})
    data = ArrayDataModule(cfg, train=(x, y))
    module = ClassificationModule(ClassificationModule.default_net(cfg, data), cfg)
    trainer = lt.build_trainer(cfg, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=data)
    assert (tmp_path / "train" / "aug_preview.png").is_file()
    assert np.isfinite(float(trainer.callback_metrics["val/loss"]))
