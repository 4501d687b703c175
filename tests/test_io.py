"""lightrainer.io: a write that fails midway leaves the previous file and no temporary file; every
write is fsynced (the file, and on POSIX the folder that holds the new name)."""

from __future__ import annotations

import errno
import os
import re

import pytest
import torch

from lightrainer.errors import WriteError
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
    with pytest.raises(WriteError, match="No space left"):
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


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_a_full_disk_or_read_only_folder_names_the_folder_not_a_temp_file(tmp_path, monkeypatch, code) -> None:
    from lightrainer.errors import WriteError
    from lightrainer.io import atomic_write

    target = tmp_path / "weights" / "last.pt"
    target.parent.mkdir()
    target.write_text("before")

    def refuse(src, dst):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(WriteError, match=rf"cannot write last.pt in {re.escape(str(target.parent))}: .* is intact") as info:
        atomic_write(target, "after")
    assert ".tmp" not in str(info.value)
    assert target.read_text() == "before" and sorted(p.name for p in target.parent.iterdir()) == ["last.pt"]


def test_a_disk_that_fills_up_mid_run_ends_with_one_line_naming_the_folder(tmp_path, monkeypatch, capsys) -> None:
    import lightrainer.io as io
    from lightrainer.cli import main

    real = io.replace_durably

    def full_at_checkpoints(tmp, path):
        if str(path).endswith(".ckpt"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(tmp, path)

    monkeypatch.setattr(io, "replace_durably", full_at_checkpoints)
    config = os.path.join(os.path.dirname(__file__), "..", "configs", "digits.yaml")
    code = main(["fit", "--config", config, "--save_dir", str(tmp_path), "--epochs", "1",
                 "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "2", "--plots", "False"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("lightrainer: error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert f"in {tmp_path / 'digits' / 'weights'}: No space left on device" in errors[0] and ".tmp" not in errors[0]
    assert errors[0].endswith("(see README.md#crash-safety-and-resume)")
