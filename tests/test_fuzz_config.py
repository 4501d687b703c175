"""A few hundred generated bad configs through `lightrainer fit`, in-process: each one ends with
exit 2, one line on stderr, no traceback and no folder."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import yaml

from lightrainer.cli import main
from lightrainer.config import _FIELDS

NUMERIC = [k for k, f in _FIELDS.items() if str(f.type).startswith(("int", "float", "Union[int")) and k not in ("device", "epochs")]
BOOLEAN = [k for k, f in _FIELDS.items() if str(f.type) == "bool"]
CHOICE = ["optimizer", "scheduler", "method", "quant_backend", "export", "task", "fitness"]
BAD_NUMBERS = ["abc", [1, 2], {"a": 1}, "1e400", -1e30, 1e30, "nan", "inf", True]
BAD_BOOLEANS = ["maybe", 2, [True], {"x": 1}, "yes please"]
BAD_CHOICES = ["Adamm", "cosine2", 3, [1], "None-ish", "entropyy", "val/nothing"]


def generated() -> list[tuple[str, bytes | str]]:
    """(label, file content) of every bad config."""
    rng = random.Random(0)
    cases: list[tuple[str, bytes | str]] = []
    for key in NUMERIC:
        for value in rng.sample(BAD_NUMBERS, 4):
            if key in ("lrf", "weight_decay", "warmup_epochs", "warmup_bias_lr", "grad_clip", "shift", "ema_tau") and value in (1e30,):
                continue  # large but legal for an unbounded float
            cases.append((f"{key}={value!r}", yaml.safe_dump({key: value})))
    for key in BOOLEAN:
        for value in rng.sample(BAD_BOOLEANS, 3):
            cases.append((f"{key}={value!r}", yaml.safe_dump({key: value})))
    for key in CHOICE:
        for value in rng.sample(BAD_CHOICES, 3):
            cases.append((f"{key}={value!r}", yaml.safe_dump({key: value})))
    for key in rng.sample(sorted(_FIELDS), 25):  # misspelt keys
        typo = key[:-1] + ("x" if key[-1] != "x" else "y")
        cases.append((f"typo {typo}", f"{typo}: 1\n"))
    for value in ("-1", "0", "1e30", "[1, 2]", "{a: 1}", "abc", "1.5"):
        cases.append((f"batch={value}", f"batch: {value}\n"))
    cases += [
        ("binary", bytes(range(256)) * 4),
        ("invalid utf-8", b"epochs: 3\nname: \xff\xfe\n"),
        ("top-level list", "- epochs\n- 3\n"),
        ("top-level scalar", "just text\n"),
        ("unclosed list", "batch: [1, 2\n"),
        ("tab indent", "model:\n\tclass_path: x\n"),
        ("duplicate key", "epochs: 3\nepochs: 4\n"),
        ("alias bomb", "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
                       "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]\n"
                       "e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]\nf: [*e, *e, *e, *e, *e, *e, *e, *e, *e]\n"),
        ("model scalar", "model: 3\n"),
        ("model not a class", "model:\n  class_path: os.system\n"),
        ("data not a datamodule", "data:\n  class_path: collections.OrderedDict\n"),
        ("model unknown module", "model:\n  class_path: nowhere.Task\n"),
        ("trainer scalar", "trainer: 5\n"),
        ("trainer unknown", "trainer:\n  bogus: 1\n"),
        ("trainer owned", "trainer:\n  accumulate_grad_batches: 4\n"),
        ("name escapes", "name: ../outside\n"),
        ("name absolute", "name: /tmp/abs\n"),
        ("seed huge", "seed: 99999999999\n"),
        ("ptq and qat", "ptq: True\nqat: True\n"),
        ("device garbage", "device: gpu-please\n"),
        ("device negative", "device: -3\n"),
    ]
    return cases


CASES = generated()


def test_there_are_a_few_hundred_cases() -> None:
    assert len(CASES) >= 200


@pytest.mark.parametrize("label, content", CASES, ids=[c[0] for c in CASES])
def test_bad_config_is_exit_2_with_one_line_and_no_folder(tmp_path, capsys, label, content) -> None:
    config = tmp_path / "bad.yaml"
    if isinstance(content, bytes):
        config.write_bytes(content)
    else:
        config.write_text(content)
    save_dir = tmp_path / "runs"
    code = main(["fit", "--config", str(config), "--save_dir", str(save_dir), "--epochs", "1"])
    err = capsys.readouterr().err
    assert code == 2, (label, err)
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, (label, err)
    assert err.startswith("lightrainer: error: "), err
    assert not save_dir.exists(), label
    assert not Path("outside").exists() and not Path("/tmp/abs").exists()
