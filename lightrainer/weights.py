"""Weights files: read a run's ``weights/*.pt`` safely and load it into a network exactly.

Export, PTQ and benchmarking all start from a weights file, so reading and checking one lives
here, below them (the core layer: imports nothing of lightrainer but the error types).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Union

import torch
from torch import Tensor, nn

from lightrainer.errors import WeightsError

PathLike = Union[str, os.PathLike]


def load_weights(path: PathLike) -> dict[str, Any]:
    """Read a lightrainer weights file (``weights/best.pt``) safely (``weights_only=True``).

    Raises:
        WeightsError: the file is missing, unreadable, or not a dict holding a "model" state_dict.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}: pass a run's weights/best.pt (e.g. runs/train/weights/best.pt)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - pickle, zip and torch errors all mean "not ours"
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise WeightsError(
            f"{path} is not a lightrainer weights file (torch.load failed: {reason[:200]}): "
            "pass the weights/best.pt a lightrainer run wrote"
        ) from None
    model = ckpt.get("model") if isinstance(ckpt, dict) else None
    if not isinstance(model, Mapping) or not all(isinstance(v, Tensor) for v in model.values()):
        held = type(ckpt).__name__ if not isinstance(ckpt, dict) else f"a dict with keys {sorted(map(str, ckpt))[:6]}"
        raise WeightsError(
            f"{path} is not a lightrainer checkpoint: expected a dict whose 'model' entry is a state_dict, "
            f"found {held}; pass the weights/best.pt a lightrainer run wrote"
        )
    return ckpt


def apply_weights(net: nn.Module, state: Mapping[str, Tensor], source: PathLike = "the weights file") -> None:
    """Load ``state`` into ``net`` exactly (same keys, same shapes), or explain the mismatch.

    Raises:
        WeightsError: missing/unexpected keys or shape mismatches (the first few of each).
    """
    own = net.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = [f"{label} ({len(items)}): {', '.join(items[:4])}{' ...' if len(items) > 4 else ''}"
                 for label, items in (("missing keys", missing), ("unexpected keys", unexpected),
                                      ("shape mismatches (file vs network)", shapes)) if items]
        raise WeightsError(
            f"{source} was saved by a different model than {type(net).__name__}: " + "; ".join(parts)
            + ". Build the network with the config the run used (its args.yaml) or pass that run's weights"
        )
    net.load_state_dict(state, strict=True)
