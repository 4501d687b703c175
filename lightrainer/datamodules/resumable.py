"""A torch DataLoader for training that a run interrupted mid-epoch resumes exactly.

Two things make a resumed run train on the same batches as one that never stopped:

* the order of epoch ``e`` depends only on ``(seed, e)`` (:class:`EpochRandomSampler`, the order of
  :class:`~lightrainer.datamodules.memory.EpochSampler`), not on how many epochs a generator
  has already drawn since the process started;
* the loader is *stateful*: Lightning saves ``state_dict()`` (the epoch and the batches served) in
  its checkpoints and, when it restarts in the middle of an epoch, calls ``load_state_dict`` so
  the loader starts at the next batch (:class:`ResumableBatchSampler` skips the index lists of the
  batches already trained on; nothing is loaded for them).

The loader has a generator of its own, so making an iterator (each epoch, each validation) never
draws from the global torch generator, which a checkpoint restores for dropout and augmentation.
Under DDP Lightning swaps the sampler for its ``DistributedSampler`` (seeded by epoch too) and
keeps the batch sampler's class, so the skip works per rank. Not covered: randomness drawn inside
DataLoader worker processes (``num_workers > 0``) continues from the workers' own seeds, which a
resumed run does not replay.
"""

from __future__ import annotations

import itertools
from typing import Any, Iterator, Optional, Sized

from torch.utils.data import BatchSampler, DataLoader, RandomSampler

from lightrainer.datamodules.memory import EpochSampler


class EpochRandomSampler(RandomSampler):
    """A ``RandomSampler`` (so Lightning's DDP replaces it as it replaces any random sampler) whose
    order of epoch ``e`` is ``randperm(n)`` seeded with ``seed + e``.

    The epoch advances by itself each time an iteration starts, as the in-memory loader's does;
    Lightning sets it with :meth:`set_epoch` before each epoch.

    Args:
        data_source: the dataset (its length is used).
        seed: base seed; epoch ``e`` uses ``seed + e``.
    """

    def __init__(self, data_source: Sized, seed: int = 0) -> None:
        super().__init__(data_source)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order the next iteration uses."""
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        epoch, self.epoch = self.epoch, self.epoch + 1
        yield from EpochSampler(len(self.data_source), shuffle=True, seed=self.seed).permutation(epoch).tolist()


class ResumableBatchSampler(BatchSampler):
    """A ``BatchSampler`` whose next iteration can start ``skip`` batches into the epoch."""

    skip: int = 0

    def __iter__(self) -> Iterator[list[int]]:
        skip, self.skip = self.skip, 0
        return itertools.islice(super().__iter__(), skip, None)


class ResumableDataLoader(DataLoader):
    """A training ``DataLoader`` with Lightning's stateful-loader interface (``state_dict`` /
    ``load_state_dict``), built on a :class:`ResumableBatchSampler` (see the module docstring).

    Iterating is lazy: the epoch is read from the sampler when the first batch is asked for, after
    Lightning's ``set_epoch``.
    """

    _position: Optional[list[int]] = None
    _resume_at: Optional[tuple[int, int]] = None

    def state_dict(self) -> dict[str, int]:
        """The epoch being served and how many of its batches were served (between epochs: the
        next epoch and 0); Lightning saves it in its checkpoints."""
        if self._position is not None:
            return {"epoch": self._position[0], "batches": self._position[1]}
        return {"epoch": self._sampler_epoch(), "batches": 0}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`: the next iteration of that epoch starts after the batches
        already served."""
        epoch = int(state["epoch"])
        set_epoch = getattr(self._sampler(), "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)
        self._resume_at = (epoch, int(state.get("batches", 0)))

    def __iter__(self) -> Iterator[Any]:
        return self._served_batches()

    def _served_batches(self) -> Iterator[Any]:
        epoch = self._sampler_epoch()
        resume, self._resume_at = self._resume_at, None
        skip = resume[1] if resume is not None and resume[0] == epoch else 0
        if isinstance(self.batch_sampler, ResumableBatchSampler):
            self.batch_sampler.skip = skip
        else:
            skip = 0
        position = [epoch, skip]
        self._position = position
        for batch in super().__iter__():
            position[1] += 1
            yield batch
        if self._position is position:
            self._position = None

    def _sampler(self) -> Any:
        inner = getattr(self.batch_sampler, "sampler", None)
        return self.sampler if inner is None else inner

    def _sampler_epoch(self) -> int:
        return int(getattr(self._sampler(), "epoch", 0))
