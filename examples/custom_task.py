"""A custom task in about 20 lines: regress the digit's ink coverage on MNIST-5k.

The task writes only its loss and metrics (`step`) and names its fitness; warmup, accumulation,
schedules, checkpoints, results.csv and the pictures come from the base. Run it:

    python examples/custom_task.py
"""

from __future__ import annotations

import torch.nn.functional as F

import lightrainer as lt
from lightrainer.datamodules import MNIST5kDataModule
from lightrainer.modules import SmallCNN


class InkRegression(lt.LightrainerModule):
    """Predict the fraction of bright pixels of a digit (a scalar) from the image."""

    fitness_key, fitness_mode = "val/mae", "min"

    def step(self, batch, stage):
        x, _ = batch
        target = (x > 0.5).float().mean(dim=(1, 2, 3))  # computed from the image itself
        pred = self.net(x).squeeze(1)
        return F.mse_loss(pred, target), {"mae": (pred - target).abs().mean()}


def main(save_dir: str = "runs", epochs: int = 3, **trainer_kwargs) -> lt.Config:
    cfg = lt.load_config({"epochs": epochs, "batch": 64, "lr0": 0.002, "optimizer": "AdamW",
                          "warmup_epochs": 0.5, "save_dir": save_dir, "name": "ink", "num_workers": 0})
    model = InkRegression(SmallCNN(num_classes=1), cfg)
    trainer = lt.build_trainer(cfg, **trainer_kwargs)
    trainer.fit(model, datamodule=MNIST5kDataModule(cfg))
    print(f"val/mae {float(trainer.callback_metrics['val/mae']):.4f} -> {cfg.run_dir}")
    return cfg


if __name__ == "__main__":
    main()
