"""lightrainer.io: a write that fails midway leaves the previous file and no temporary file; every
write is fsynced (the file, and on POSIX the folder that holds the new name)."""

from __future__ import annotations

import os

import pytest
import torch

from lightrainer.io import atomic_path, atomic_torch_save, atomic_write, temp_path_for


class FailsToPickle:
    """Pickling raises: torch.save has written part of the file by then."""

    def __reduce__(self):
        raise RuntimeError("cannot pickle this")


class FailsToEncode(str):
    """A text whose encoding raises, after the temporary file was opened."""

    def encode(self, *args, **kwargs):
        raise UnicodeError("cannot encode this")


def folder_names(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture
def fsyncs(monkeypatch) -> list[int]:
    """Every os.fsync call (its file descriptor), still fsyncing."""
    calls: list[int] = []
    real = os.fsync

    def counting(fd: int) -> None:
        calls.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fsync", counting)
    return calls


def test_temp_name_is_hidden_beside_the_file_and_names_the_process(tmp_path) -> None:
    assert temp_path_for(tmp_path / "last.pt") == tmp_path / f".last.pt.tmp{os.getpid()}"


def test_atomic_torch_save_that_raises_midway_keeps_the_old_file(tmp_path) -> None:
    path = tmp_path / "last.pt"
    atomic_torch_save({"epoch": 1, "w": torch.ones(3)}, path)
    with pytest.raises(RuntimeError, match="cannot pickle this"):
        atomic_torch_save({"epoch": 2, "w": torch.zeros(10_000), "bad": FailsToPickle()}, path)
    old = torch.load(path, weights_only=True)
    assert old["epoch"] == 1 and torch.equal(old["w"], torch.ones(3))
    assert folder_names(tmp_path) == ["last.pt"]


def test_atomic_write_that_raises_midway_keeps_the_old_file(tmp_path) -> None:
    path = tmp_path / "results.csv"
    atomic_write(path, "epoch,loss\n1,0.9\n")
    with pytest.raises(UnicodeError, match="cannot encode this"):
        atomic_write(path, FailsToEncode("epoch,loss\n2,0.5\n"))
    assert path.read_text() == "epoch,loss\n1,0.9\n"
    assert folder_names(tmp_path) == ["results.csv"]


def test_a_failed_fsync_keeps_the_old_file(tmp_path, monkeypatch) -> None:
    path = tmp_path / "args.yaml"
    atomic_write(path, b"old: 1\n")

    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        atomic_write(path, b"new: 2\n")
    assert path.read_bytes() == b"old: 1\n"
    assert folder_names(tmp_path) == ["args.yaml"]


def test_atomic_path_removes_a_partial_file_when_the_block_raises(tmp_path) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(b"complete")
    with pytest.raises(ValueError, match="checker"):
        with atomic_path(path) as tmp:
            assert tmp == temp_path_for(path)
            tmp.write_bytes(b"part")
            raise ValueError("checker rejected the model")
    assert path.read_bytes() == b"complete"
    assert folder_names(tmp_path) == ["model.onnx"]


@pytest.mark.parametrize(
    "write",
    [
        lambda p: atomic_write(p, "text\n"),
        lambda p: atomic_write(p, b"bytes"),
        lambda p: atomic_torch_save({"a": 1}, p),
    ],
    ids=["text", "bytes", "torch"],
)
def test_every_write_is_fsynced(tmp_path, fsyncs, write) -> None:
    path = tmp_path / "file"
    assert write(path) == path
    # The file's content, then (POSIX) the folder, so the rename survives a power loss too.
    assert len(fsyncs) == (2 if os.name == "posix" else 1)
    assert folder_names(tmp_path) == ["file"]
