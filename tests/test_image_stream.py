"""The image folder streamed from disk: the same batches as in memory, decoders checked against
Pillow, workers, automatic streaming, corrupt files refused by name or skipped, 1 vs 2 processes."""

from __future__ import annotations

import json
import logging

import lightning
import numpy as np
import pytest
import torch
from torch import nn

import lightrainer as lt
from lightrainer.cli import main
from lightrainer.config import ConfigError
from lightrainer.datamodules import ImageFolderDataModule, InMemoryBatchLoader, StreamBatchLoader
from lightrainer.datamodules.stream import (
    PIL,
    PIL_DRAFT,
    TORCHVISION,
    ImageFiles,
    choose_decoder,
    decode_image,
    scan_image,
)
from lightrainer.modules import ClassificationModule

Image = pytest.importorskip("PIL.Image")
CLASSES = ("cat", "dog", "owl")


def write_folder(root, per_class: int = 20, size=(14, 10)) -> None:
    """JPEGs and PNGs of smooth random colour fields, ``size`` = (width, height), not square."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            small = rng.integers(0, 256, (3, 4, 3), dtype=np.uint8)
            image = Image.fromarray(small).resize(size, Image.Resampling.BILINEAR)
            image.save(root / name / (f"{i}.png" if i % 5 == 0 else f"{i}.jpg"), quality=90)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    write_folder(root)
    return root


def datamodule(root, stream, **keys) -> ImageFolderDataModule:
    cfg = lt.load_config({"batch": 8, "seed": 5, "num_workers": keys.pop("num_workers", 0), **keys},
                         task_class=ClassificationModule)
    return ImageFolderDataModule(cfg, root, image_size=(6, 8), channels=3, mean=(0.5, 0.4, 0.3),
                                 std=(0.2, 0.25, 0.3), stream=stream)


def batches(loader, epochs: int = 2) -> list[tuple[torch.Tensor, ...]]:
    return [tuple(t.clone() for t in b) for _ in range(epochs) for b in loader]


def assert_same(a, b) -> None:
    assert len(a) == len(b)
    for p, q in zip(a, b):
        assert len(p) == len(q)
        for s, t in zip(p, q):
            assert torch.equal(s, t)


# --- streamed == in memory --------------------------------------------------------------------
@pytest.mark.parametrize("keys", [{}, {"shift": 1, "fliplr": 0.5, "degrees": 10.0, "hsv_v": 0.3, "erasing": 0.5,
                                       "mixup": 0.5, "cutmix": 0.5}], ids=["plain", "augmented"])
def test_streaming_gives_the_batches_of_the_in_memory_path(folder, keys):
    if keys:
        pytest.importorskip("kornia")
    memory, streamed = datamodule(folder, False, **keys), datamodule(folder, True, **keys)
    memory.setup()
    streamed.setup()
    assert isinstance(memory.train_data, tuple) and isinstance(streamed.train_data, ImageFiles)
    assert isinstance(streamed.train_dataloader(), StreamBatchLoader)
    assert isinstance(memory.train_dataloader(), InMemoryBatchLoader)
    # The same seeded, stratified split of the same files, in the same order.
    assert len(streamed.train_data) == len(memory.train_data[0]) == 48
    assert streamed.train_data.targets.tolist() == memory.train_data[1].tolist()
    assert_same(batches(streamed.train_dataloader()), batches(memory.train_dataloader()))
    assert_same(batches(streamed.val_dataloader(), 1), batches(memory.val_dataloader(), 1))


def test_workers_give_the_same_batches(folder):
    plain = datamodule(folder, True)
    workers = datamodule(folder, True, num_workers=2)
    plain.setup()
    workers.setup()
    loader = workers.train_dataloader()
    assert loader._loader.persistent_workers
    assert_same(batches(loader, 3), batches(plain.train_dataloader(), 3))


def test_ranks_shard_the_single_process_batches(folder):
    """Two ranks of 4 == one process of 8, every sample and its augmentation (loader level)."""
    pytest.importorskip("kornia")
    dm = datamodule(folder, True, fliplr=0.5, scale=0.3, mixup=0.5)
    dm.setup()
    aug = dm.train_transform()

    def loader(batch, rank=0, world=1):
        return StreamBatchLoader(dm.train_data, batch, mean=dm.mean, std=dm.std, shuffle=True, seed=5, rank=rank,
                                 world_size=world, transform=aug)

    one = batches(loader(8))
    shards = [batches(loader(4, r, 2)) for r in range(2)]
    for b, (x, y) in enumerate(one):
        torch.testing.assert_close(torch.cat([s[b][0] for s in shards]), x, rtol=0, atol=1e-6)
        torch.testing.assert_close(torch.cat([s[b][1] for s in shards]), y)


class _RecordBatches(lightning.LightningModule):
    """Writes each training batch's per-sample pixel sums and targets, per rank."""

    def __init__(self, out):
        super().__init__()
        self.layer = nn.Linear(1, 1)
        self.out = out
        self.seen: list = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.seen.append([x.double().sum(dim=(1, 2, 3)).tolist(), y.tolist()])
        return self.layer(x.mean(dim=(1, 2, 3)).unsqueeze(1)).sum()

    def on_train_end(self):
        (self.out / f"rank{self.global_rank}.json").write_text(json.dumps(self.seen))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_two_processes_augment_each_sample_as_one_process(folder, tmp_path):
    """A real 2-process run (gloo, forked) with every kind of key on: rank 0 and rank 1 together
    see exactly the one-process batches, augmentation and mixing partners included."""
    pytest.importorskip("kornia")
    keys = {"fliplr": 0.5, "degrees": 20.0, "translate": 0.1, "scale": 0.3, "hsv_h": 0.1, "hsv_s": 0.3,
            "hsv_v": 0.3, "erasing": 0.5, "mixup": 0.4, "cutmix": 0.4}
    runs = {}
    for devices, strategy in ((1, "auto"), (2, "ddp_fork")):
        out = tmp_path / str(devices)
        out.mkdir()
        trainer = lightning.Trainer(max_epochs=2, accelerator="cpu", devices=devices, strategy=strategy, logger=False,
                                    enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                                    enable_checkpointing=False, limit_val_batches=0, default_root_dir=out)
        trainer.fit(_RecordBatches(out), datamodule=datamodule(folder, True, **keys))
        runs[devices] = [json.loads((out / f"rank{r}.json").read_text()) for r in range(devices)]
    single, (r0, r1) = runs[1][0], runs[2]
    assert len(single) == len(r0) == len(r1) == 12  # 48 samples, global batch 8, 2 epochs
    for one, a, b in zip(single, r0, r1):
        np.testing.assert_allclose(a[0] + b[0], one[0], rtol=1e-6)
        np.testing.assert_allclose(np.array(a[1] + b[1]), np.array(one[1]), rtol=1e-6)


# --- decoding ---------------------------------------------------------------------------------
def test_decoders_agree_with_pillow(tmp_path):
    rng = np.random.default_rng(1)
    pixels = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize((64, 48))
    pixels.save(tmp_path / "a.jpg", quality=85)
    pixels.save(tmp_path / "a.png")
    pillow = torch.from_numpy(np.array(Image.open(tmp_path / "a.jpg").convert("RGB"))).permute(2, 0, 1)
    assert torch.equal(decode_image(str(tmp_path / "a.jpg"), (48, 64), 3, TORCHVISION), pillow)
    assert torch.equal(decode_image(str(tmp_path / "a.jpg"), (48, 64), 3, PIL), pillow)
    png = torch.from_numpy(np.array(pixels)).permute(2, 0, 1)
    assert torch.equal(decode_image(str(tmp_path / "a.png"), (48, 64), 3, TORCHVISION), png)
    # Pillow's draft decodes a large JPEG already scaled down: close to decoding it whole (a
    # smooth photo; the two low-pass filters differ on pixel noise).
    Image.fromarray(rng.integers(0, 256, (3, 4, 3), dtype=np.uint8)).resize((256, 192)).save(tmp_path / "b.jpg")
    whole = decode_image(str(tmp_path / "b.jpg"), (24, 32), 3, TORCHVISION).float()
    draft = decode_image(str(tmp_path / "b.jpg"), (24, 32), 3, PIL_DRAFT).float()
    assert (whole - draft).abs().mean() < 3
    assert choose_decoder("JPEG", 64, 48, (12, 16)) == PIL_DRAFT
    assert choose_decoder("JPEG", 64, 48, (32, 40)) == TORCHVISION
    assert choose_decoder("BMP", 64, 48, (12, 16)) == PIL


def test_shorter_side_resized_then_centre_cropped(tmp_path):
    # 30 x 10: red | green | blue thirds; 10 x 10 keeps the green middle only.
    image = np.zeros((10, 30, 3), np.uint8)
    image[:, :10, 0], image[:, 10:20, 1], image[:, 20:, 2] = 255, 255, 255
    Image.fromarray(image).save(tmp_path / "wide.png")
    x = decode_image(str(tmp_path / "wide.png"), (5, 5), 3)
    assert x.shape == (3, 5, 5)
    assert (x[1] > 200).all() and (x[0] < 60).all() and (x[2] < 60).all()
    assert decode_image(str(tmp_path / "wide.png"), (5, 5), 1).shape == (1, 5, 5)


# --- size, bad files --------------------------------------------------------------------------
def test_streams_when_the_set_does_not_fit_max_memory(folder):
    cfg = lt.load_config({"batch": 8, "num_workers": 0})
    auto = ImageFolderDataModule(cfg, folder, image_size=6, max_memory_gb=1e-6)
    auto.setup()
    assert isinstance(auto.train_data, ImageFiles)
    with pytest.raises(ConfigError, match="stream them"):
        ImageFolderDataModule(cfg, folder, image_size=6, max_memory_gb=1e-6, stream=False).setup()
    unlabeled = ImageFolderDataModule(cfg, folder, image_size=6, labels=False, stream=True)
    x, = next(iter(unlabeled.val_dataloader()))
    assert x.shape == (8, 3, 6, 6) and x.dtype == torch.float32


@pytest.fixture
def broken_folder(tmp_path):
    root = tmp_path / "broken"
    write_folder(root, per_class=6)
    good = (root / "cat" / "1.jpg").read_bytes()
    (root / "cat" / "1.jpg").write_bytes(good[:-40])  # cut short: the header reads, the end is missing
    (root / "dog" / "2.jpg").write_text("not an image")
    return root


def test_bad_files_are_named_before_training(broken_folder):
    cfg = lt.load_config({"batch": 4, "num_workers": 0})
    dm = ImageFolderDataModule(cfg, broken_folder, image_size=6, stream=True)
    with pytest.raises(ConfigError, match=r"2 of 18 image files cannot be read: .*cat/1.jpg: the JPEG file is "
                                          r"truncated.*dog/2.jpg: not a readable image.*skip_bad_images"):
        dm.setup()


def test_bad_files_exit_2_on_the_command_line(broken_folder, tmp_path, capsys):
    config = tmp_path / "folder.yaml"
    config.write_text(f"save_dir: {tmp_path / 'runs'}\nepochs: 1\nbatch: 4\nnum_workers: 0\n"
                      f"data:\n  class_path: lightrainer.datamodules.ImageFolderDataModule\n"
                      f"  init_args: {{root: {broken_folder}, image_size: 6}}\n")
    assert main(["fit", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "cat/1.jpg" in err and "dog/2.jpg" in err and "Traceback" not in err


def test_skip_bad_images_counts_them_and_trains_on_the_rest(broken_folder, caplog):
    cfg = lt.load_config({"batch": 4, "num_workers": 0})
    dm = ImageFolderDataModule(cfg, broken_folder, image_size=6, stream=True, skip_bad_images=True)
    with caplog.at_level(logging.WARNING):
        dm.setup()
    assert "skipped 2 unreadable image file(s) of 18" in caplog.text
    assert len(dm.train_data) + len(dm.val_data) == 16
    assert sum(len(b[0]) for b in dm.train_dataloader()) == len(dm.train_data)


def test_a_file_broken_mid_run_never_crashes_the_epoch(folder, tmp_path, caplog):
    root = tmp_path / "copy"
    write_folder(root, per_class=4)
    dm = ImageFolderDataModule(lt.load_config({"batch": 4, "num_workers": 0}), root, image_size=6, stream=True)
    dm.setup()
    victim = dm.train_data.files[0]
    with open(victim, "r+b") as f:  # keep the header and the end, break the middle
        data = bytearray(f.read())
        data[len(data) // 3: 2 * len(data) // 3] = b"\x00" * (len(data) // 3)
        f.seek(0)
        f.write(bytes(data))
    (root / "cat" / "3.jpg").write_bytes(b"")  # emptied after the scan
    with caplog.at_level(logging.WARNING):
        seen = sum(len(b[0]) for b in dm.train_dataloader()) + sum(len(b[0]) for b in dm.val_dataloader())
    assert seen == 12
    assert "3.jpg" in caplog.text and "a blank image stands in" in caplog.text


def test_scan_reads_headers(tmp_path):
    Image.fromarray(np.zeros((7, 9, 3), np.uint8)).save(tmp_path / "ok.jpg")
    assert scan_image(str(tmp_path / "ok.jpg")) == ("JPEG", 9, 7)


def test_a_streamed_epoch_stopped_midway_resumes_at_the_next_batch(folder):
    dm = datamodule(folder, True, fliplr=0.5, mixup=0.5)
    dm.setup()
    whole = batches(dm.train_dataloader(), 1)
    loader = dm.train_dataloader()
    served = iter(loader)
    for _ in range(2):
        next(served)
    state = loader.state_dict()
    assert state == {"epoch": 0, "batches": 2}
    resumed = dm.train_dataloader()
    resumed.load_state_dict(state)
    assert_same(batches(resumed, 1), whole[2:])


def test_a_notebook_run_on_a_streamed_folder_rebuilds_from_its_weights_file(folder, tmp_path):
    """The datamodule's arguments are plain attributes: `export --weights` rebuilds it (and the
    backbone) from the run record alone."""
    pytest.importorskip("timm")
    from lightrainer.build import rebuild

    cfg = lt.load_config({"save_dir": str(tmp_path), "epochs": 1, "batch": 8, "num_workers": 0, "device": "cpu",
                          "net": "timm/test_resnet", "fliplr": 0.5, "plots": False}, task_class=ClassificationModule)
    data = ImageFolderDataModule(cfg, folder, image_size=(16, 16), stream=True, skip_bad_images=True)
    module = ClassificationModule(ClassificationModule.default_net(cfg, data), cfg)
    lt.build_trainer(cfg, enable_progress_bar=False, enable_model_summary=False, limit_train_batches=2,
                     limit_val_batches=1).fit(module, datamodule=data)
    payload = torch.load(tmp_path / "train" / "weights" / "best.pt", weights_only=True)
    again, again_data, again_cfg = rebuild(payload)
    assert isinstance(again_data, ImageFolderDataModule)
    assert (again_data.root, again_data.image_size, again_data.stream, again_data.skip_bad_images) == (
        str(folder), (16, 16), True, True)
    assert again.net.lightrainer_backbone == "timm/test_resnet" and again_cfg.fliplr == 0.5
    again.net.load_state_dict(payload["model"])


def test_a_loader_dropped_mid_epoch_is_freed_at_once(folder):
    """No reference cycle through the DataLoader's batch sampler: a loader left mid-epoch (as
    Lightning leaves one at limit_train_batches) is freed by reference counting, which shuts its
    worker processes down at once (the cycle collector took 5 s a worker)."""
    import gc
    import weakref

    dm = datamodule(folder, True, num_workers=1)
    loader = dm.train_dataloader()
    served = iter(loader)
    next(served)
    ref = weakref.ref(loader)
    gc.disable()
    try:
        del served, loader
        assert ref() is None
    finally:
        gc.enable()
