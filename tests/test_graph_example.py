"""The graph-nodes example (examples/graph_nodes): a user's own task, network and datamodule in a
module beside its YAML, trained and exported through the command line, shrunk to a few epochs."""

from __future__ import annotations

import csv
import importlib
import re
from pathlib import Path

import networkx as nx
import numpy as np
import pytest
import torch

import lightrainer as lt
from lightrainer.cli import main

YAML = Path(__file__).resolve().parent.parent / "examples" / "graph_nodes" / "graph.yaml"
EPOCHS = 30


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    save_dir = tmp_path_factory.mktemp("runs")
    assert main(["fit", "--config", str(YAML), "--epochs", str(EPOCHS), "--save_dir", str(save_dir)]) == 0
    return save_dir / "graph"


@pytest.fixture(scope="module")
def graph_task(run_dir: Path):
    # Imported as the command line made it importable (the YAML's folder), not by this test.
    return importlib.import_module("graph_task")


def karate_club(graph_task, **overrides):
    """The example's datamodule for the example's config (with ``overrides``), set up."""
    datamodule = graph_task.KarateClubDataModule(lt.load_config(YAML, save_dir="unused", **overrides))
    datamodule.setup()
    return datamodule


def propagation_matrix() -> np.ndarray:
    """D^-1/2 (A + I) D^-1/2 of the karate club, written out in float64."""
    a = nx.to_numpy_array(nx.karate_club_graph(), nodelist=range(34), weight=None) + np.eye(34)
    d = a.sum(axis=1)
    return a / np.sqrt(np.outer(d, d))


def forward_float64(
    state: dict[str, torch.Tensor], x: np.ndarray, dims: list[int], adjacency: np.ndarray
) -> np.ndarray:
    """The network's eval-mode forward pass from its weights: a GCN layer per modality, the mean,
    then a GCN layer to the class scores."""
    w = {k: v.double().numpy() for k, v in state.items()}
    starts = np.cumsum([0, *dims])
    hidden = [
        np.maximum(adjacency @ (x[:, a:b] @ w[f"encoders.{i}.weight"].T + w[f"encoders.{i}.bias"]), 0)
        for i, (a, b) in enumerate(zip(starts[:-1], starts[1:]))
    ]
    return adjacency @ (np.mean(hidden, axis=0) @ w["classifier.weight"].T + w["classifier.bias"])


def test_split_is_seeded_stratified_and_covers_every_node(graph_task) -> None:
    datamodule = karate_club(graph_task)
    train, val = datamodule.graph_batch("train"), datamodule.graph_batch("val")
    train_mask, val_mask, y = train["mask"][0], val["mask"][0], train["y"][0]
    assert int(val_mask.sum()) == 17 and not (train_mask & val_mask).any() and (train_mask | val_mask).all()
    assert abs(int(y[val_mask].sum()) - int((1 - y[val_mask]).sum())) <= 1  # both clubs, 17 members each
    assert torch.equal(karate_club(graph_task).graph_batch("val")["mask"], val["mask"])
    assert not torch.equal(karate_club(graph_task, seed=1).graph_batch("val")["mask"], val["mask"])


def test_fit_saves_the_val_accuracy_its_weights_give(graph_task, run_dir: Path) -> None:
    ckpt = torch.load(run_dir / "weights" / "best.pt", weights_only=True)
    datamodule = karate_club(graph_task)
    val = datamodule.graph_batch("val")
    adjacency = propagation_matrix()
    np.testing.assert_allclose(ckpt["model"]["adjacency"].double().numpy(), adjacency, atol=1e-6)

    logits = forward_float64(ckpt["model"], val["x"][0].double().numpy(), list(datamodule.modality_dims.values()),
                             adjacency)
    mask, y = val["mask"][0].numpy(), val["y"][0].numpy()
    accuracy = float((logits.argmax(axis=1)[mask] == y[mask]).mean())

    with open(run_dir / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == EPOCHS
    best_row = rows[ckpt["epoch"]]  # results.csv counts epochs from 1, the weights file from 0
    assert int(best_row["epoch"]) == ckpt["epoch"] + 1
    assert accuracy == pytest.approx(ckpt["best_fitness"], abs=1e-6)
    assert accuracy == pytest.approx(float(best_row["val/acc"]), abs=1e-5)
    assert accuracy == pytest.approx(max(float(r["val/acc"]) for r in rows), abs=1e-5)
    assert accuracy >= 0.8  # it learns: a single club for everyone scores 9/17 at best


@pytest.mark.parametrize(("key", "value", "message"), [
    ("hidden", "0", "hidden: must be >= 1"),
    ("modality_dropout", "1.5", r"modality_dropout: must be in \[0, 1\)"),
])
def test_a_bad_task_key_exits_2_naming_it(tmp_path: Path, capsys: pytest.CaptureFixture, key: str, value: str,
                                          message: str) -> None:
    assert main(["fit", "--config", str(YAML), f"--{key}", value, "--save_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert "Traceback" not in err and not any(tmp_path.iterdir())


def test_export_without_config_matches_pytorch_in_onnxruntime(graph_task, run_dir: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    weights = run_dir / "weights" / "best.pt"
    assert main(["export", "--weights", str(weights)]) == 0

    datamodule = karate_club(graph_task)
    val = datamodule.graph_batch("val")
    net = graph_task.NodeClassifier.default_net(datamodule.cfg, datamodule).eval()
    net.load_state_dict(torch.load(weights, weights_only=True)["model"])
    session = ort.InferenceSession(str(run_dir / "weights" / "best.onnx"), providers=["CPUExecutionProvider"])
    # Two feature sets on the same graph: the exported batch axis is free.
    x = torch.cat([val["x"], val["x"] * 0.5])
    (onnx_logits,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(onnx_logits, net(x).numpy(), atol=1e-4, rtol=0)
