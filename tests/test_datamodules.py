"""In-memory batch loader, splits and datamodules: checked against independent computations."""

from __future__ import annotations

import json
from collections import Counter

import lightning
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

import lightrainer as lt
from lightrainer.config import ConfigError
from lightrainer.datamodules import (
    ArrayDataModule,
    DigitsDataModule,
    ImageFolderDataModule,
    InMemoryBatchLoader,
    MNIST5kDataModule,
)
from lightrainer.datamodules.base import once_shuffled, stratified_split
from lightrainer.datamodules.memory import RandomShift


def expected_order(n: int, seed: int, epoch: int) -> list[int]:
    """The documented epoch order, computed independently of the loader."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()


def epoch_batches(loader) -> list[list[int]]:
    return [batch[0].tolist() for batch in loader]


# --- InMemoryBatchLoader --------------------------------------------------------------------
@pytest.mark.parametrize("n,batch", [(100, 8), (96, 8), (7, 16)])
def test_loader_order_is_seeded_randperm_and_covers_each_sample_once(n, batch):
    x = torch.arange(n)
    loader = InMemoryBatchLoader((x, x * 10), batch, shuffle=True, seed=3)
    assert len(loader) == -(-n // batch)
    for epoch in range(3):
        batches = [(bx.tolist(), by.tolist()) for bx, by in loader]
        flat = [i for bx, _ in batches for i in bx]
        assert flat == expected_order(n, 3, epoch)
        assert sorted(flat) == list(range(n))
        assert all(by == [10 * i for i in bx] for bx, by in batches)
        assert [len(bx) for bx, _ in batches] == [batch] * (n // batch) + ([n % batch] if n % batch else [])


def test_single_process_order_equals_torch_distributed_sampler():
    # torch's DistributedSampler (one replica) is an independent implementation of the same rule.
    from torch.utils.data.distributed import DistributedSampler

    data = list(range(45))
    loader = InMemoryBatchLoader(torch.arange(45), 45, shuffle=True, seed=9)
    sampler = DistributedSampler(data, num_replicas=1, rank=0, shuffle=True, seed=9)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        assert epoch_batches(loader) == [list(sampler)]


def test_epochs_differ_and_unshuffled_is_in_order():
    x = torch.arange(50)
    loader = InMemoryBatchLoader(x, 10, shuffle=True, seed=0)
    first, second = epoch_batches(loader), epoch_batches(loader)
    assert first != second
    plain = InMemoryBatchLoader(x, 10)
    assert [i for b in epoch_batches(plain) for i in b] == list(range(50))


def test_probing_iter_does_not_consume_an_epoch():
    loader = InMemoryBatchLoader(torch.arange(20), 4, shuffle=True, seed=1)
    iter(loader)  # Lightning probes loaders like this before the first epoch
    iter(loader)
    assert loader.epoch == 0
    assert [i for b in epoch_batches(loader) for i in b] == expected_order(20, 1, 0)
    assert loader.epoch == 1


@pytest.mark.parametrize("n", [100, 97, 91])  # remainders 4, 1 and 11 of a global batch of 16
@pytest.mark.parametrize("world", [2, 4])
def test_union_of_ranks_equals_single_process(n, world):
    per_device, seed = 16 // world, 5
    x = torch.arange(n)
    single = InMemoryBatchLoader(x, 16, shuffle=True, seed=seed)
    ranks = [InMemoryBatchLoader(x, per_device, shuffle=True, seed=seed, rank=r, world_size=world) for r in range(world)]
    lengths = {len(r) for r in ranks}
    assert len(lengths) == 1, "every rank must run the same number of steps under DDP"
    for _ in range(2):
        one = epoch_batches(single)
        shards = [epoch_batches(r) for r in ranks]
        assert all(len(s) == len(ranks[0]) for s in shards)
        for b, batch in enumerate(one):
            if b < len(shards[0]):
                assert [i for s in shards for i in s[b]] == batch
            else:  # the last partial global batch has fewer samples than ranks: dropped on all
                assert len(batch) == n % 16 < world


def test_last_partial_global_batch_is_split_evenly():
    ranks = [InMemoryBatchLoader(torch.arange(37), 8, rank=r, world_size=2) for r in range(2)]
    # 37 = 2 global batches of 16 + 5: rank 0 gets 3, rank 1 gets 2, contiguous.
    assert epoch_batches(ranks[0])[-1] == [32, 33, 34]
    assert epoch_batches(ranks[1])[-1] == [35, 36]


def test_validation_sharding_sees_each_sample_once():
    n, world = 33, 4  # 33 = 4 global batches of 8 + 1: only rank 0 gets the last sample
    ranks = [InMemoryBatchLoader(torch.arange(n), 2, rank=r, world_size=world, equal_batches=False) for r in range(world)]
    seen = [i for r in ranks for b in epoch_batches(r) for i in b]
    assert sorted(seen) == list(range(n))
    assert [len(r) for r in ranks] == [5, 4, 4, 4]


def test_drop_last():
    loader = InMemoryBatchLoader(torch.arange(21), 4, shuffle=True, drop_last=True)
    assert len(loader) == 5
    assert all(len(b) == 4 for b in epoch_batches(loader))


def test_state_dict_resumes_the_epoch_sequence():
    x = torch.arange(30)
    loader = InMemoryBatchLoader(x, 7, shuffle=True, seed=11)
    for _ in range(2):
        epoch_batches(loader)
    state = loader.state_dict()
    resumed = InMemoryBatchLoader(x, 7, shuffle=True, seed=11)
    resumed.load_state_dict(state)
    assert [i for b in epoch_batches(resumed) for i in b] == expected_order(30, 11, 2)
    third = expected_order(30, 11, 3)
    assert epoch_batches(resumed) == [third[i:i + 7] for i in range(0, 30, 7)]


def test_set_epoch_selects_the_order():
    loader = InMemoryBatchLoader(torch.arange(12), 12, shuffle=True, seed=2)
    loader.sampler.set_epoch(7)  # what Lightning calls each epoch
    assert epoch_batches(loader) == [expected_order(12, 2, 7)]


def test_transform_is_seeded_and_training_only():
    x = torch.randn(40, 1, 6, 6)
    shift = RandomShift(1)
    a = InMemoryBatchLoader((x,), 8, shuffle=True, seed=4, transform=shift)
    b = InMemoryBatchLoader((x,), 8, shuffle=True, seed=4, transform=shift)
    first_a, first_b = [t[0] for t in a], [t[0] for t in b]
    assert all(torch.equal(p, q) for p, q in zip(first_a, first_b))
    second_a = [t[0] for t in a]
    assert not all(torch.equal(p, q) for p, q in zip(first_a, second_a))


def test_random_shift_matches_explicit_translation():
    x = torch.randn(16, 2, 5, 7)
    shift, fill = 2, -0.5
    out = RandomShift(shift, fill=fill)(x, torch.Generator().manual_seed(0))
    # Replay the offsets the transform draws, then translate each image by hand.
    offsets = torch.randint(0, 2 * shift + 1, (2, 16), generator=torch.Generator().manual_seed(0))
    for i in range(16):
        dy, dx = offsets[0, i].item() - shift, offsets[1, i].item() - shift
        expected = torch.full_like(x[i], fill)
        for r in range(5):
            for c in range(7):
                sr, sc = r + dy, c + dx
                if 0 <= sr < 5 and 0 <= sc < 7:
                    expected[:, r, c] = x[i, :, sr, sc]
        assert torch.equal(out[i], expected)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(tensors=(torch.zeros(5), torch.zeros(4)), batch_size=2), "different lengths"),
        (dict(tensors=(torch.zeros(0),), batch_size=2), "no samples"),
        (dict(tensors=torch.zeros(5), batch_size=0), "batch_size must be >= 1"),
        (dict(tensors=torch.zeros(5), batch_size=2, rank=2, world_size=2), "rank < world_size"),
        (dict(tensors=[[1, 2]], batch_size=2), "must be a tensor"),
    ],
)
def test_loader_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        InMemoryBatchLoader(**kwargs)


# --- split ----------------------------------------------------------------------------------
def test_stratified_split_is_stratified_and_seeded():
    labels = np.repeat(np.arange(5), [40, 40, 20, 60, 40])
    train, val = stratified_split(len(labels), labels, 0.25, seed=0)
    assert len(val) == 50 and len(train) == 150
    assert sorted(np.concatenate([train, val]).tolist()) == list(range(200))
    assert Counter(labels[val].tolist()) == {0: 10, 1: 10, 2: 5, 3: 15, 4: 10}
    again, _ = stratified_split(len(labels), labels, 0.25, seed=0)
    other, _ = stratified_split(len(labels), labels, 0.25, seed=1)
    assert np.array_equal(train, again) and not np.array_equal(train, other)


def test_split_errors():
    with pytest.raises(ConfigError, match="cannot stratify"):
        stratified_split(6, [0, 0, 0, 0, 0, 1], 0.5, seed=0)
    with pytest.raises(ConfigError, match="val_split"):
        stratified_split(1, None, 0.5, seed=0)


# --- datamodules ----------------------------------------------------------------------------
def test_mnist5k():
    cfg = lt.load_config({"batch": 50, "shift": 2, "seed": 0})
    dm = MNIST5kDataModule(cfg)
    dm.setup()
    (xt, yt), (xv, yv) = dm.train_data, dm.val_data
    assert xt.shape == (4000, 1, 28, 28) and xv.shape == (1000, 1, 28, 28)
    assert Counter(yv.tolist()) == {c: 100 for c in range(10)}
    # Background pixels are 0/255 before normalisation.
    assert xt.min().item() == pytest.approx((0 - 0.1307) / 0.3081, abs=1e-5)
    assert xt.max().item() == pytest.approx((1 - 0.1307) / 0.3081, abs=1e-5)
    loader = dm.train_dataloader()
    assert isinstance(loader, InMemoryBatchLoader) and len(loader) == 80
    assert isinstance(loader.transform, RandomShift) and loader.transform.fill == pytest.approx(dm.fill_value)
    assert dm.val_dataloader().transform is None
    assert (dm.num_classes, dm.input_shape, dm.mean, dm.std) == (10, (1, 28, 28), (0.1307,), (0.3081,))


def test_digits():
    dm = DigitsDataModule(lt.load_config({"batch": 32}))
    dm.setup()
    (xt, yt), (xv, yv) = dm.train_data, dm.val_data
    assert xt.shape[1:] == (1, 8, 8) and len(xt) + len(xv) == 1797
    assert 0.0 <= xt.min() and xt.max() <= 1.0
    x, y = next(iter(dm.val_dataloader()))
    assert x.shape == (32, 1, 8, 8) and y.dtype == torch.int64
    assert dm.train_dataloader().transform is None  # shift: 0 by default


def test_array_datamodule_numpy_and_split():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (60, 5, 5), dtype=np.uint8)
    y = np.repeat(np.arange(3), 20)
    dm = ArrayDataModule(lt.load_config({"batch": 8, "val_split": 0.25}), train=(x, y))
    dm.setup()
    (xt, yt), (xv, yv) = dm.train_data, dm.val_data
    assert xt.shape == (45, 1, 5, 5) and xt.dtype == torch.float32 and xt.max() <= 1.0
    assert Counter(yv.tolist()) == {0: 5, 1: 5, 2: 5}
    assert dm.num_classes == 3 and dm.input_shape == (1, 5, 5)
    # Each split row is an original row, with its own label.
    originals = {tuple((x[i] / 255.0).astype(np.float32).ravel()): y[i] for i in range(60)}
    assert all(originals[tuple(r.ravel().tolist())] == lab for r, lab in zip(xt.numpy(), yt.tolist()))


def test_array_datamodule_images_only_and_explicit_val():
    x = torch.randn(20, 3, 4, 4)
    dm = ArrayDataModule(lt.load_config({"batch": 4}), train=x, val=(torch.randn(6, 3, 4, 4),))
    dm.setup()
    assert dm.num_classes is None
    batch = next(iter(dm.val_dataloader()))
    assert len(batch) == 1 and batch[0].shape == (4, 3, 4, 4)


@pytest.mark.parametrize(
    "train,val,error,match",
    [
        ((torch.zeros(5, 4, 4), torch.zeros(4)), None, ValueError, "4 targets for 5 images"),
        ((torch.zeros(5),), None, ValueError, r"N,C,H,W or N,H,W, got shape \(5,\)"),
        ((torch.zeros(5, 1, 1, 4, 4),), None, ValueError, "N,C,H,W"),
        (([1, 2, 3],), None, TypeError, "torch.Tensor or numpy array"),
        ((torch.zeros(5, 4, 4), torch.zeros(5)), (torch.zeros(3, 5, 5), torch.zeros(3)), ValueError, "image shape"),
        ((torch.zeros(5, 4, 4), torch.zeros(5)), (torch.zeros(3, 4, 4),), ValueError, "targets for both"),
    ],
)
def test_array_datamodule_bad_input(train, val, error, match):
    with pytest.raises(error, match=match):
        ArrayDataModule(lt.load_config({}), train=train, val=val)


def test_collate_fn_uses_a_dataloader():
    calls = []

    def collate(samples):
        calls.append(len(samples))
        return torch.stack([s[0] for s in samples]), torch.stack([s[1] for s in samples])

    x, y = torch.randn(20, 1, 4, 4), torch.arange(20) % 2
    dm = ArrayDataModule(lt.load_config({"batch": 5, "num_workers": 0}), train=(x, y), collate_fn=collate)
    loader = dm.train_dataloader()
    assert isinstance(loader, DataLoader)
    assert sum(len(b[0]) for b in loader) == 16 and calls == [5, 5, 5, 1]


def _write_png(path, value, size=(6, 4), mode="L"):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0]) if mode == "L" else (size[1], size[0], 3), value, np.uint8), mode).save(path)


def test_image_folder_labeled(tmp_path):
    for cls, value in (("cat", 0), ("dog", 255)):
        for i in range(5):
            _write_png(tmp_path / cls / f"{i}.png", value)
    dm = ImageFolderDataModule(lt.load_config({"batch": 4, "val_split": 0.2}), tmp_path, image_size=(3, 5), channels=1)
    dm.setup()
    (xt, yt), (xv, yv) = dm.train_data, dm.val_data
    assert dm.class_names == ["cat", "dog"] and dm.num_classes == 2
    assert xt.shape == (8, 1, 3, 5) and Counter(yv.tolist()) == {0: 1, 1: 1}
    # Pixel value follows the class folder: 0 for cat, 1 for dog.
    assert torch.equal(xt.amax(dim=(1, 2, 3)), yt.float())


def test_image_folder_unlabeled_rgb(tmp_path):
    for i in range(10):
        _write_png(tmp_path / "sub" / f"{i}.jpg" if i % 2 else tmp_path / f"{i}.png", 51 * (i % 5), mode="RGB")
    dm = ImageFolderDataModule(lt.load_config({"batch": 4}), tmp_path, image_size=4, labels=False,
                               mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    dm.setup()
    (xt, yt), (xv, _) = dm.train_data, dm.val_data
    assert yt is None and xt.shape == (8, 3, 4, 4) and len(xv) == 2
    assert -1.0 - 1e-6 <= xt.min() and xt.max() <= 1.0 + 1e-6


def test_image_folder_errors(tmp_path):
    cfg = lt.load_config({})
    with pytest.raises(ConfigError, match="image folder not found"):
        ImageFolderDataModule(cfg, tmp_path / "missing")
    with pytest.raises(ConfigError, match="no class subfolders with images"):
        ImageFolderDataModule(cfg, tmp_path)
    with pytest.raises(ConfigError, match="no images"):
        ImageFolderDataModule(cfg, tmp_path, labels=False)
    with pytest.raises(ConfigError, match="channels"):
        ImageFolderDataModule(cfg, tmp_path, channels=2)


# --- inside Lightning -----------------------------------------------------------------------
class _RecordOrder(lightning.LightningModule):
    """Records the sample ids of each training batch (x holds the id in its first pixel)."""

    def __init__(self, out=None):
        super().__init__()
        self.layer = nn.Linear(4, 2)
        self.seen: dict[int, list[int]] = {}
        self.out = out

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.seen.setdefault(self.current_epoch, []).extend(x[:, 0, 0, 0].long().tolist())
        return nn.functional.cross_entropy(self.layer(x.flatten(1)), y)

    def validation_step(self, batch, batch_idx):
        self.seen.setdefault(f"val{self.current_epoch}", []).extend(batch[0][:, 0, 0, 0].long().tolist())

    def on_train_end(self):
        if self.out is not None:
            (self.out / f"rank{self.global_rank}.json").write_text(json.dumps(self.seen))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _id_data(n: int):
    x = torch.zeros(n, 1, 2, 2)
    x[:, 0, 0, 0] = torch.arange(n, dtype=torch.float32)
    return x, torch.arange(n) % 2


def _trainer(tmp_path, epochs, **kw):
    return lightning.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_progress_bar=False,
                             enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=tmp_path, **kw)


def test_lightning_sees_the_documented_order_and_resumes(tmp_path):
    cfg = lt.load_config({"batch": 8, "seed": 7, "val_split": 0.2})
    dm = ArrayDataModule(cfg, train=_id_data(40), val=_id_data(8))
    model = _RecordOrder()
    _trainer(tmp_path, 2).fit(model, datamodule=dm)
    for epoch in range(2):
        assert model.seen[epoch] == expected_order(40, 7, epoch)
    ckpt = next((tmp_path / "checkpoints").glob("*.ckpt"))
    resumed = _RecordOrder()
    dm2 = ArrayDataModule(cfg, train=_id_data(40), val=_id_data(8))
    _trainer(tmp_path, 3).fit(resumed, datamodule=dm2, ckpt_path=ckpt)
    assert resumed.seen[2] == expected_order(40, 7, 2) and 1 not in resumed.seen
    assert sorted(resumed.seen["val2"]) == list(range(8))


def test_ddp_two_processes_shard_the_single_process_order(tmp_path):
    n, seed = 37, 3
    cfg = lt.load_config({"batch": 8, "seed": seed})
    model = _RecordOrder(out=tmp_path)
    dm = ArrayDataModule(cfg, train=_id_data(n), val=_id_data(9))
    # Fork: starts in about a second where spawn re-imports everything (about 25 s here).
    trainer = _trainer(tmp_path, 2, devices=2, strategy="ddp_fork", enable_checkpointing=False)
    trainer.fit(model, datamodule=dm)
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    # Validation: global batches of 8 in one seeded order (the same every epoch), the 9th sample
    # only on rank 0 (one batch more).
    once = once_shuffled(9, seed)
    assert seen[0]["val0"] == once[0:4] + once[8:] and seen[1]["val0"] == once[4:8] == seen[1]["val1"]
    for epoch in range(2):
        order = expected_order(n, seed, epoch)
        # Global batches of 8; rank r takes samples [4r, 4r+4) of each; 37 = 4*8 + 5 -> 3 + 2.
        expected = [[], []]
        for start in range(0, 32, 8):
            expected[0] += order[start:start + 4]
            expected[1] += order[start + 4:start + 8]
        expected[0] += order[32:35]
        expected[1] += order[35:37]
        assert [s[str(epoch)] for s in seen] == expected


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_loader_on_gpu_tensors_matches_cpu_order():
    x = torch.arange(50, dtype=torch.float32).view(50, 1, 1, 1).expand(50, 1, 4, 4).contiguous()
    loader = InMemoryBatchLoader((x.cuda(), torch.arange(50).cuda()), 8, shuffle=True, seed=2, transform=RandomShift(1))
    batches = list(loader)
    assert all(b[0].is_cuda and b[1].is_cuda for b in batches)
    assert torch.cat([b[1] for b in batches]).cpu().tolist() == expected_order(50, 2, 0)


def test_augmentation_does_not_depend_on_the_device_count():
    """One process with batch 8 and two ranks with 4 each augment every sample identically."""
    x = torch.randn(37, 1, 6, 6)
    y = torch.arange(37)
    single = InMemoryBatchLoader((x, y), 8, shuffle=True, seed=3, transform=RandomShift(2))
    ranks = [InMemoryBatchLoader((x, y), 4, shuffle=True, seed=3, rank=r, world_size=2, transform=RandomShift(2))
             for r in range(2)]
    for _ in range(2):  # two epochs
        one = list(single)
        two = list(zip(*ranks))
        for (bx, by), ((x0, y0), (x1, y1)) in zip(one, two):
            torch.testing.assert_close(bx, torch.cat([x0, x1]))
            assert torch.equal(by, torch.cat([y0, y1]))
