"""The VQ-VAE walkthrough (the original's VQ-VAE notebook, as a script of cells): train on photo
patches shipped offline, look at the reconstructions, look at the codebook.

    python examples/vqvae_walkthrough.py

Writes, in the run folder: the training's results.png and recon_epochN.png grids, plus
codebook.png: a whole held-out photo, its reconstruction through the codes, the map of code indices
the encoder chose, and how often each code is used.
"""

from __future__ import annotations

from pathlib import Path

import torch

import lightrainer as lt
from lightrainer.build import build_from_config
from lightrainer.plots import _pyplot, save_figure

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "vqvae.yaml"


# %% 1. Train: the same YAML as `lightrainer fit --config configs/vqvae.yaml`
def train(save_dir: str, epochs: int, **trainer_kwargs) -> tuple[lt.Config, torch.nn.Module]:
    cfg = lt.load_config(CONFIG, save_dir=save_dir, name="vqvae_walkthrough", epochs=epochs)
    module, data = build_from_config(cfg)
    trainer = lt.build_trainer(cfg, **trainer_kwargs)
    trainer.fit(module, datamodule=data)
    print({k: round(float(v), 3) for k, v in trainer.callback_metrics.items() if k.startswith("val/")})
    best = torch.load(Path(cfg.run_dir) / "weights" / "best.pt", weights_only=True)["model"]
    module.net.load_state_dict(best)
    return cfg, module.net.eval()


# %% 2. Look at a whole held-out photo through the codebook
@torch.no_grad()
def look_at_the_codebook(cfg: lt.Config, net: torch.nn.Module) -> Path:
    from sklearn.datasets import load_sample_image

    photo = torch.from_numpy(load_sample_image("flower.jpg")).permute(2, 0, 1).float() / 255
    photo = photo[:, :256, 128:384].unsqueeze(0)  # a 256x256 crop, not seen in training
    codes = net.encode_codes(photo)  # (1, h, w) code indices
    recon = net.decode_codes(codes).clamp(0, 1)
    counts = torch.bincount(codes.flatten(), minlength=net.codebook_size)
    psnr = -10 * torch.log10(torch.mean((recon - photo) ** 2))

    plt = _pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(17, 4.4))
    axes[0].imshow(photo[0].permute(1, 2, 0).numpy())
    axes[0].set_title("held-out photo")
    axes[1].imshow(recon[0].permute(1, 2, 0).numpy())
    axes[1].set_title(f"through the codes (PSNR {psnr:.1f} dB)")
    image = axes[2].imshow(codes[0].numpy(), cmap="nipy_spectral", interpolation="nearest")
    axes[2].set_title(f"code index per {256 // codes.shape[1]}x{256 // codes.shape[2]} block")
    fig.colorbar(image, ax=axes[2], fraction=0.046)
    for ax in axes[:3]:
        ax.axis("off")
    used = counts[counts > 0].sort(descending=True).values
    axes[3].bar(range(len(used)), used.numpy(), width=1.0)
    axes[3].set_yscale("log")
    axes[3].set_title(f"{len(used)} of {net.codebook_size} codes used in this photo")
    axes[3].set_xlabel("codes, most used first")
    axes[3].set_ylabel("blocks")
    fig.tight_layout()
    return save_figure(fig, Path(cfg.run_dir) / "codebook.png")


def main(save_dir: str = "runs", epochs: int = 12, **trainer_kwargs) -> Path:
    cfg, net = train(save_dir, epochs, **trainer_kwargs)
    path = look_at_the_codebook(cfg, net)
    print(f"reconstructions: {cfg.run_dir}/recon_epoch*.png, codebook: {path}")
    return path


if __name__ == "__main__":
    main()
