"""Serve whole batches from tensors held in memory: no per-sample ``__getitem__``, no collate.

Order and sharding are defined so that a run is reproducible and independent of the number of
devices:

* epoch ``e`` shuffles with ``torch.randperm(N, generator=torch.Generator().manual_seed(seed + e))``
  (no shuffling: ``arange(N)``; shuffled once, as validation and test are: the order of epoch 0
  every epoch, so the first batches, all ``limit_val_batches`` scores, are a fair sample);
* the permutation is cut into *global* batches of ``batch_size * world_size`` samples;
* rank ``r`` takes the ``r``-th contiguous chunk of ``batch_size`` samples of each global batch.

So the batches of one process with batch ``B`` are exactly the union of what ``W`` ranks see with
``B / W`` each. The last, partial global batch of ``rem`` samples is split as evenly as possible
(the first ``rem % W`` ranks take one sample more). Where ``rem < W`` some rank would get nothing:

* ``equal_batches=True`` (training): that partial global batch is dropped on every rank (at most
  ``W - 1`` samples an epoch, a different set each epoch), because under DDP all ranks must run the
  same number of steps or the gradient all-reduce hangs;
* ``equal_batches=False`` (validation): the ranks that would get nothing yield one batch fewer, so
  every sample is seen exactly once (no padding, no duplicates). Metrics that synchronise once at
  epoch end (torchmetrics, epoch-level ``self.log``) are fine with that; a per-step collective is not.

The epoch advances by itself each time a new iteration starts (Lightning calls ``set_epoch`` only
on ``loader.sampler``, which this loader also provides), and ``state_dict``/``load_state_dict``
carry the epoch and the batches of it already served, so a resumed run continues the epoch sequence
and a run stopped mid-epoch (Lightning restores the loader's state) resumes at the next batch.

Augmentation does not depend on the device count either: a transform with ``draw``/``apply`` (such
as :class:`RandomShift`) draws its parameters for a whole global batch from a generator seeded by
(seed, epoch, global batch index), and each rank applies its slice (:func:`apply_shard`; a transform
that mixes samples fetches its partners from the whole training set by index).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch
from torch import Tensor
from torch.utils.data import Sampler

log = logging.getLogger(__name__)

BatchTransform = Callable[[Tensor, torch.Generator], Tensor]
"""A training-batch augmentation: ``transform(x, generator) -> x`` drawing all randomness from
``generator`` (a generator on ``x``'s device), so runs are reproducible."""


def _mix_seed(seed: int, epoch: int, stream: int) -> int:
    # A distinct, deterministic stream per (seed, epoch, stream) for batch augmentation.
    return (seed * 1_000_003 + epoch * 10_007 + stream * 101 + 12_345) % (2**63 - 1)


class EpochSampler(Sampler[int]):
    """The per-epoch order of ``range(n)``: ``torch.randperm(n)`` seeded with ``seed + epoch``.

    Args:
        n: number of samples.
        shuffle: permute (else ``0..n-1``).
        seed: base seed; epoch ``e`` uses ``seed + e``.
        reshuffle: a new order each epoch (False: every epoch takes epoch 0's order).
    """

    def __init__(self, n: int, shuffle: bool = True, seed: int = 0, reshuffle: bool = True) -> None:
        self.n = n
        self.shuffle = shuffle
        self.seed = seed
        self.reshuffle = reshuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order the next iteration uses."""
        self.epoch = int(epoch)

    def permutation(self, epoch: Optional[int] = None) -> Tensor:
        """The order of ``epoch`` (default: the current one), a CPU int64 tensor."""
        epoch = self.epoch if epoch is None else epoch
        if not self.shuffle:
            return torch.arange(self.n)
        generator = torch.Generator().manual_seed(self.seed + (epoch if self.reshuffle else 0))
        return torch.randperm(self.n, generator=generator)

    def __iter__(self) -> Iterator[int]:
        return iter(self.permutation().tolist())

    def __len__(self) -> int:
        return self.n


def shard_ranges(
    n: int, batch_size: int, rank: int = 0, world_size: int = 1, drop_last: bool = False, equal_batches: bool = True
) -> list[tuple[int, int]]:
    """Positions ``[start, end)`` in the epoch order that rank ``rank`` serves, one per batch.

    Args:
        n: samples in the epoch.
        batch_size: per-rank batch.
        rank: this rank.
        world_size: number of ranks.
        drop_last: drop the last partial global batch.
        equal_batches: where the last partial global batch has fewer samples than ranks, drop it
            (True) or let the ranks without a sample yield one batch fewer (False).

    Returns:
        The ranges, in order.
    """
    global_batch = batch_size * world_size
    full, rem = divmod(n, global_batch)
    ranges = [(g * global_batch + rank * batch_size, g * global_batch + (rank + 1) * batch_size) for g in range(full)]
    if rem and not drop_last and (rem >= world_size or not equal_batches):
        base, extra = divmod(rem, world_size)
        size = base + (1 if rank < extra else 0)
        if size:
            start = full * global_batch + rank * base + min(rank, extra)
            ranges.append((start, start + size))
    return ranges


class InMemoryBatchLoader:
    """Batches of in-memory tensors by indexing, sharded across ranks (see the module docstring).

    Iterating yields tuples ``(x, y)`` (or ``(x,)`` for image-only data), like a DataLoader over a
    TensorDataset. Tensors stay on their device; indices are moved there once an epoch.

    Args:
        tensors: ``(x, y)``, ``(x,)``, ``(x, None)`` or a single tensor; equal first dimensions.
        batch_size: the per-device batch; the global batch is ``batch_size * world_size``.
        shuffle: a new seeded permutation each epoch.
        seed: base seed of the epoch permutations and of the transform's generator.
        reshuffle: with ``shuffle``, False keeps one seeded order for every epoch (validation:
            any ``limit_val_batches`` is a fair sample, the same one each epoch).
        drop_last: drop the last partial global batch.
        rank: this process's rank.
        world_size: number of processes.
        transform: optional :data:`BatchTransform` applied to each x batch (training only).
        equal_batches: every rank yields the same number of batches (True for training under DDP).

    Raises:
        ValueError: empty or mismatched tensors, a batch size below 1, a rank out of range.
    """

    def __init__(
        self,
        tensors: Union[Tensor, Sequence[Optional[Tensor]]],
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        transform: Optional[BatchTransform] = None,
        equal_batches: bool = True,
        reshuffle: bool = True,
    ) -> None:
        if isinstance(tensors, Tensor):
            tensors = (tensors,)
        tensors = tuple(t for t in tensors if t is not None)
        if not tensors or not all(isinstance(t, Tensor) for t in tensors):
            raise ValueError("InMemoryBatchLoader: tensors must be a tensor or a sequence (x, y) of tensors")
        lengths = [len(t) for t in tensors]
        if len(set(lengths)) != 1:
            raise ValueError(f"InMemoryBatchLoader: tensors have different lengths {lengths}; x and y must match")
        if lengths[0] == 0:
            raise ValueError("InMemoryBatchLoader: no samples (the tensors are empty)")
        if batch_size < 1:
            raise ValueError(f"InMemoryBatchLoader: batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"InMemoryBatchLoader: need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.tensors = tensors
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.transform = transform
        self.equal_batches = equal_batches
        self.sampler = EpochSampler(lengths[0], shuffle=shuffle, seed=seed, reshuffle=reshuffle)
        self.batch_sampler = None  # Lightning inspects both attributes, as on a DataLoader
        self._ranges = shard_ranges(lengths[0], batch_size, rank, world_size, drop_last, equal_batches)
        # [epoch, batches served] while an epoch is served; where a resumed epoch starts.
        self._position: Optional[list[int]] = None
        self._resume_at: Optional[tuple[int, int]] = None

    @property
    def epoch(self) -> int:
        """The epoch the next iteration serves."""
        return self.sampler.epoch

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch the next iteration serves (Lightning calls ``sampler.set_epoch``)."""
        self.sampler.set_epoch(epoch)

    def state_dict(self) -> dict[str, int]:
        """Where the loader stands, for resuming (saved by Lightning in its checkpoints): the epoch
        being served and how many of its batches were served; between epochs, the next epoch and 0."""
        if self._position is not None:
            return {"epoch": self._position[0], "batches": self._position[1]}
        return {"epoch": self.sampler.epoch, "batches": 0}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restore :meth:`state_dict`: the next iteration of that epoch starts after the batches
        already served (Lightning calls this when it resumes a run stopped mid-epoch)."""
        epoch = int(state["epoch"])
        self.sampler.set_epoch(epoch)
        self._resume_at = (epoch, int(state.get("batches", 0)))

    def global_batch_samples(self, batch_idx: int) -> int:
        """Samples in global batch ``batch_idx`` over all ranks: ``batch_size * world_size``
        except the last, partial one, which the ranks share unevenly (the training step weights
        each rank's loss by its share: :meth:`lightrainer.LightrainerModule._shard_weighted`)."""
        global_batch = self.batch_size * self.world_size
        return min(global_batch, len(self.sampler) - batch_idx * global_batch)

    def __len__(self) -> int:
        return len(self._ranges)

    def sample_indices(self, batch_idx: int, epoch: int = 0) -> Tensor:
        """Positions in the data of the samples in this rank's batch ``batch_idx`` of ``epoch``
        (predictions name each sample by it, under DDP too)."""
        start, end = self._ranges[batch_idx]
        if not self.sampler.shuffle:
            return torch.arange(start, end)
        return self.sampler.permutation(epoch)[start:end]

    def __iter__(self) -> Iterator[tuple[Tensor, ...]]:
        # A generator: `iter(loader)` alone (Lightning probes it) does not consume an epoch.
        return self._served_batches()

    def _served_batches(self) -> Iterator[tuple[Tensor, ...]]:
        """The batches of :meth:`_epoch_batches`, counted for :meth:`state_dict`."""
        for batch in self._epoch_batches():
            if self._position is not None:
                self._position[1] += 1
            yield batch
        self._position = None

    def _begin_epoch(self) -> tuple[int, list[tuple[int, int]]]:
        """Start serving an epoch: its number and the batch ranges still to serve.

        Advances the epoch counter (a plain loop that iterates again gets the next epoch). An epoch
        restored by :meth:`load_state_dict` skips the batches served before the interruption; a
        subclass that serves batches its own way calls this to resume the same way.
        """
        epoch = self.sampler.epoch
        self.sampler.set_epoch(epoch + 1)
        resume, self._resume_at = self._resume_at, None
        skip = resume[1] if resume is not None and resume[0] == epoch else 0
        self._position = [epoch, skip]
        return epoch, self._ranges[skip:]

    def _epoch_batches(self) -> Iterator[tuple[Tensor, ...]]:
        epoch, ranges = self._begin_epoch()
        device = self.tensors[0].device
        order = self.sampler.permutation(epoch).to(device) if self.sampler.shuffle else None
        for start, end in ranges:
            if order is None:
                batch = tuple(t[start:end] for t in self.tensors)
            else:
                index = order[start:end]
                batch = tuple(t[index] for t in self.tensors)
            if self.transform is not None:
                batch = self._augment(batch, epoch, start, end)
            yield batch

    def _augment(self, batch: tuple[Tensor, ...], epoch: int, start: int, end: int) -> tuple[Tensor, ...]:
        """Apply the transform so that a sample's randomness does not depend on the device count.

        Randomness is drawn for the whole global batch from a generator seeded by (seed, epoch,
        global batch index), and each rank applies its slice: one process and W processes augment
        every sample identically. A plain callable transform gets a generator per rank instead.
        """
        x = batch[0]
        global_batch = self.batch_size * self.world_size
        index, first = divmod(start, global_batch)
        if not (hasattr(self.transform, "draw") and hasattr(self.transform, "apply")):
            generator = torch.Generator(device=x.device)
            generator.manual_seed(_mix_seed(self.sampler.seed, epoch * 1_000 + index, self.rank))
            return (self.transform(x, generator),) + batch[1:]
        global_size = min(global_batch, self.sampler.n - index * global_batch)
        params = global_batch_params(self.transform, self.sampler.seed, epoch, index, global_size, x.device)
        return apply_shard(self.transform, batch, params[..., first:first + (end - start)], self._fetch, self.sampler.n)

    def _fetch(self, rows: Tensor) -> tuple[Tensor, ...]:
        """The samples at dataset indices ``rows`` (the partners a mixing transform asks for)."""
        return tuple(t[rows.to(t.device)] for t in self.tensors)


def global_batch_params(transform: Any, seed: int, epoch: int, index: int, size: int, device: torch.device) -> Tensor:
    """``transform.draw`` for global batch ``index`` of ``epoch`` (``size`` samples), from a generator
    on ``device`` seeded by (seed, epoch, index): the same on every rank and device count."""
    generator = torch.Generator(device=device).manual_seed(_mix_seed(seed, epoch, index))
    return transform.draw(size, generator)


def apply_shard(
    transform: Any, batch: tuple[Tensor, ...], params: Tensor, fetch: Callable[[Tensor], tuple[Tensor, ...]],
    population: int,
) -> tuple[Tensor, ...]:
    """Apply a ``draw``/``apply`` transform to this rank's ``batch`` with its columns of ``params``.

    A transform that mixes samples (``apply_batch`` and ``partner_indices``, such as
    :class:`lightrainer.datamodules.augment.BatchAugment` with mixup) gets the whole batch and the
    partner samples it asks for, fetched by dataset index (of ``population`` samples) with ``fetch``.
    """
    if not hasattr(transform, "apply_batch"):
        return (transform.apply(batch[0], params),) + batch[1:]
    wanted = transform.partner_indices(params, population)
    return transform.apply_batch(batch, params, None if wanted is None else fetch(wanted))


class RandomShift:
    """Random integer translation of each image by up to ``+-shift`` pixels, both axes.

    Pixels shifted in take ``fill`` (the background value in the data's normalised units).

    Args:
        shift: largest shift in pixels (0 = identity).
        fill: value of the pixels that enter the image.
    """

    def __init__(self, shift: int, fill: float = 0.0) -> None:
        if shift < 0:
            raise ValueError(f"RandomShift: shift must be >= 0, got {shift}")
        self.shift = int(shift)
        self.fill = float(fill)

    def draw(self, n: int, generator: torch.Generator) -> Tensor:
        """Offsets for ``n`` images: a (2, n) tensor of row/column offsets in [0, 2 * shift]."""
        return torch.randint(0, 2 * self.shift + 1, (2, n), generator=generator, device=generator.device)

    def apply(self, x: Tensor, offsets: Tensor) -> Tensor:
        """Translate each image of ``x`` by its column of ``offsets`` (from :meth:`draw`)."""
        if self.shift == 0:
            return x
        if x.dim() != 4:
            raise ValueError(f"RandomShift: expects images N,C,H,W, got shape {tuple(x.shape)}")
        _, _, h, w = x.shape
        s = self.shift
        padded = torch.nn.functional.pad(x, (s, s, s, s), value=self.fill)
        offsets = offsets.to(x.device)
        rows = offsets[0, :, None] + torch.arange(h, device=x.device)  # (n, h)
        cols = offsets[1, :, None] + torch.arange(w, device=x.device)  # (n, w)
        batch = torch.arange(len(x), device=x.device)[:, None, None]
        # Advanced indices around a slice put the indexed dims first: (n, h, w, c).
        out = padded[batch, :, rows[:, :, None], cols[:, None, :]]
        return out.permute(0, 3, 1, 2).contiguous()

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        if self.shift == 0:
            return x
        return self.apply(x, self.draw(len(x), generator))

    def __repr__(self) -> str:
        return f"RandomShift(shift={self.shift}, fill={self.fill})"
