"""Multimodal node classification on Zachary's karate club, as a user's own lightrainer task.

The original lightrainer's third worked example trained MMGCN (a multimodal graph convolution
network) from a notebook. This is the same kind of job on a real graph that ships with networkx:
which of the two clubs each of the 34 members joined after the split. Each node has two feature
"modalities" computed from the graph, each with its own encoder, fused inside a two-layer GCN:

- ``structural``: degree, clustering, PageRank, betweenness, closeness and core number;
- ``positional``: the first non-trivial eigenvectors of the normalised graph Laplacian.

The whole graph is one batch. Run it from the repository root:

    lightrainer fit --config examples/graph_nodes/graph.yaml
    lightrainer export --weights runs/graph/weights/best.pt
"""

from __future__ import annotations

from typing import Any

import lightning as L
import networkx as nx
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

import lightrainer as lt
from lightrainer.config import at_least
from lightrainer.datamodules.base import stratified_split
from lightrainer.task import ExportOutput, ExportPart, ExportSpec

#: Eigenvectors of the normalised Laplacian in the positional modality.
POSITIONAL_DIMS = 4


def normalized_adjacency(adjacency: np.ndarray) -> np.ndarray:
    """The GCN propagation matrix D^-1/2 (A + I) D^-1/2 (Kipf & Welling), D the degrees of A + I."""
    a_hat = adjacency + np.eye(len(adjacency))
    d_inv_sqrt = 1.0 / np.sqrt(a_hat.sum(axis=1))
    return d_inv_sqrt[:, None] * a_hat * d_inv_sqrt[None, :]


def standardize(columns: np.ndarray) -> np.ndarray:
    """Each column to zero mean and unit variance over the nodes."""
    return (columns - columns.mean(axis=0)) / columns.std(axis=0)


def structural_features(graph: nx.Graph) -> np.ndarray:
    """(N, 6): degree, clustering, PageRank, betweenness, closeness, core number, standardised."""
    nodes = sorted(graph)
    # The karate club's edges carry interaction counts; the features describe the topology only.
    measures = [
        dict(graph.degree()),
        nx.clustering(graph),
        nx.pagerank(graph, weight=None),
        nx.betweenness_centrality(graph),
        nx.closeness_centrality(graph),
        nx.core_number(graph),
    ]
    return standardize(np.array([[m[n] for m in measures] for n in nodes], dtype=np.float64))


def laplacian_eigenvectors(adjacency: np.ndarray, k: int) -> np.ndarray:
    """(N, k): eigenvectors 1..k of I - D^-1/2 A D^-1/2, scaled by sqrt(N) to unit mean square.

    An eigenvector's sign is arbitrary; each is flipped so that its largest entry is positive,
    so the features do not depend on the LAPACK build.
    """
    d_inv_sqrt = 1.0 / np.sqrt(adjacency.sum(axis=1))
    laplacian = np.eye(len(adjacency)) - d_inv_sqrt[:, None] * adjacency * d_inv_sqrt[None, :]
    _, vectors = np.linalg.eigh(laplacian)
    vectors = vectors[:, 1:k + 1]  # the first is the trivial one (proportional to sqrt(degree))
    signs = np.sign(vectors[np.abs(vectors).argmax(axis=0), np.arange(k)])
    return vectors * signs * np.sqrt(len(adjacency))


class KarateClubDataModule(L.LightningDataModule):
    """Zachary's karate club as one graph batch, with a seeded, stratified split of its nodes.

    Each loader yields the same single batch, a dict with a leading graph axis of 1:
    ``x`` (1, N, F) node features of every modality side by side (``modality_dims`` gives their
    widths, in column order), ``y`` (1, N) club labels and ``mask`` (1, N) the nodes of the stage.

    Args:
        cfg: the config (``seed`` and ``val_split`` choose the validation nodes; ``batch`` and
            ``num_workers`` do not apply: the batch is the graph, built in memory).
    """

    class_names = ["Mr. Hi", "Officer"]
    num_classes = len(class_names)

    def __init__(self, cfg: lt.Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.modality_dims: dict[str, int] = {}
        self.adjacency: Tensor | None = None  # D^-1/2 (A + I) D^-1/2, float32 (N, N)
        self._batches: dict[str, dict[str, Tensor]] = {}

    def setup(self, stage: str | None = None) -> None:
        """Compute the features, the propagation matrix and the split (once)."""
        if self._batches:
            return
        graph = nx.karate_club_graph()
        nodes = sorted(graph)
        adjacency = nx.to_numpy_array(graph, nodelist=nodes, weight=None)
        modalities = {
            "structural": structural_features(graph),
            "positional": laplacian_eigenvectors(adjacency, POSITIONAL_DIMS),
        }
        self.modality_dims = {name: block.shape[1] for name, block in modalities.items()}
        self.adjacency = torch.from_numpy(normalized_adjacency(adjacency)).float()
        x = torch.from_numpy(np.concatenate(list(modalities.values()), axis=1)).float()
        labels = torch.tensor([self.class_names.index(graph.nodes[n]["club"]) for n in nodes])
        train, val = stratified_split(len(nodes), labels, self.cfg.val_split, self.cfg.seed)
        for stage_name, index in (("train", train), ("val", val)):
            mask = torch.zeros(len(nodes), dtype=torch.bool)
            mask[torch.from_numpy(index)] = True
            self._batches[stage_name] = {"x": x[None], "y": labels[None], "mask": mask[None]}

    def graph_batch(self, stage: str) -> dict[str, Tensor]:
        """The batch of ``stage`` ("train" or "val")."""
        self.setup()
        return self._batches[stage]

    def _loader(self, stage: str) -> DataLoader:
        # batch_size=None: the one item is already the batch (no collation, no workers needed).
        return DataLoader([self.graph_batch(stage)], batch_size=None)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("val")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("val")


class MultimodalGCN(nn.Module):
    """Two-layer GCN over a fixed graph with one encoder per feature modality (MMGCN-style).

    Layer 1 is a graph convolution per modality, relu(Â X_m W_m), so each modality propagates
    over the graph with its own weights; the modalities are fused by their mean (with modality
    dropout in training) and layer 2, Â H W, gives the class scores. Â is a buffer: the graph is
    fixed, so the network's one input is the node features and it exports to ONNX as such.

    Args:
        adjacency: Â = D^-1/2 (A + I) D^-1/2, (N, N).
        modality_dims: feature width of each modality, in the order of the input's columns.
        num_classes: classes.
        hidden: width of each modality's embedding.
        dropout: dropout of the fused embedding.
        modality_dropout: in training, the chance that one node's embedding of one modality is
            dropped (the kept ones are rescaled), so no node relies on a single modality.
    """

    def __init__(
        self,
        adjacency: Tensor,
        modality_dims: list[int],
        num_classes: int,
        hidden: int = 16,
        dropout: float = 0.5,
        modality_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.register_buffer("adjacency", adjacency.float())
        self.modality_dims = list(modality_dims)
        self.encoders = nn.ModuleList(nn.Linear(d, hidden) for d in self.modality_dims)
        self.classifier = nn.Linear(hidden, num_classes)
        self.dropout = nn.Dropout(dropout)
        self.modality_dropout = modality_dropout

    def forward(self, x: Tensor) -> Tensor:
        """(B, N, F) node features (modalities side by side) -> (B, N, num_classes) logits."""
        parts = x.split(self.modality_dims, dim=-1)
        h = torch.stack([F.relu(self.adjacency @ enc(p)) for enc, p in zip(self.encoders, parts)], dim=-2)
        if self.training and self.modality_dropout > 0:
            keep = torch.rand(h.shape[:-1] + (1,), device=h.device) >= self.modality_dropout
            h = h * keep / (1 - self.modality_dropout)
        fused = self.dropout(h.mean(dim=-2))
        return self.adjacency @ self.classifier(fused)


def _probability(key: str, value: float) -> float:
    if not 0 <= value < 1:
        raise lt.ConfigError(f"{key}: must be in [0, 1), got {value!r}")
    return value


class NodeClassifier(lt.LightrainerModule):
    """Node classification on one graph: cross-entropy and accuracy over the stage's nodes."""

    task_keys = {
        "hidden": lt.TaskKey(int, 16, at_least(1), "width of each modality's embedding"),
        "dropout": lt.TaskKey(float, 0.5, _probability, "dropout of the fused node embedding"),
        "modality_dropout": lt.TaskKey(float, 0.2, _probability,
                                       "chance of dropping one modality of one node in training"),
    }
    metric_modes = {"loss": "min", "acc": "max"}
    fitness_key, fitness_mode = "val/acc", "max"
    default_datamodule = KarateClubDataModule
    export_spec = ExportSpec(parts=(ExportPart(input_name="features", outputs=(ExportOutput("logits", "argmax"),)),))

    @classmethod
    def default_net(cls, cfg: lt.Config, datamodule: Any) -> MultimodalGCN:
        datamodule.setup()
        return MultimodalGCN(
            datamodule.adjacency,
            list(datamodule.modality_dims.values()),
            datamodule.num_classes,
            hidden=cfg.hidden,
            dropout=cfg.dropout,
            modality_dropout=cfg.modality_dropout,
        )

    def example_input(self, batch: dict[str, Tensor]) -> Tensor:
        return batch["x"]

    def step(self, batch: dict[str, Tensor], stage: str) -> tuple[Tensor, dict[str, Tensor]]:
        mask = batch["mask"]
        logits, y = self.net(batch["x"])[mask], batch["y"][mask]
        return F.cross_entropy(logits, y), {"acc": (logits.argmax(dim=1) == y).float().mean()}
