"""VQ-VAE image reconstruction on the shared base: the original lightrainer's ImGenTrainer.

loss = ``vq_weight * vq + recon_weight * mse + lpips_weight * lpips``. Logged for train and val:
``loss``, ``vq``, ``recon`` (MSE), ``lpips`` (when ``lpips_weight > 0``), ``perplexity``,
``usage`` (fraction of the codebook used: over the whole epoch for val/test, by each batch for
train, averaged), ``psnr`` and ``ssim`` (kornia, on the
reconstruction clamped to [0, 1]; PSNR of the batch's mean squared error, as the seed computed
it; the training SSIM on every ``train_ssim_every``-th batch, since it costs 3% of a step).
Fitness is ``val/psnr`` (max); the ``fitness`` key selects any other logged metric, e.g.
``fitness: ssim`` or ``fitness: lpips`` (lower is better for names containing loss/lpips).
A test adds ``reconstruction_test.png`` (test inputs above their reconstructions); predict saves
each reconstruction as a PNG, with its PSNR and MSE in ``predictions.csv``.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
import torchmetrics
from torch import Tensor, nn

from lightrainer.callbacks.recon import ReconstructionGrid, metrics_note, reconstruction_grid, save_grid
from lightrainer.config import Config, ConfigError, TaskKey, at_least, choice, fraction
from lightrainer.datamodules.photos import PhotoPatchesDataModule
from lightrainer.module import LightrainerModule, StepOutput
from lightrainer.modules.vqvae_net import VQVAE, code_histogram, usage_of
from lightrainer.task import ExportOutput, ExportPart, ExportSpec, TestReport

log = logging.getLogger(__name__)

LPIPS_NETS = ("alex", "vgg", "squeeze")
LPIPS_BACKBONES = ("pretrained", "random")
# torchvision weight files the lpips package loads for its backbone (in $TORCH_HOME/hub/checkpoints).
LPIPS_BACKBONE_FILES = {
    "alex": "alexnet-owt-7be5be79.pth",
    "vgg": "vgg16-397923af.pth",
    "squeeze": "squeezenet1_1-b8a52dc0.pth",
}
# The random backbone's fixed seed: every rank and every run gets the same "random" LPIPS.
_RANDOM_LPIPS_SEED = 0


def _non_negative(key: str, value: float) -> float:
    if value < 0:
        raise ConfigError(f"{key}: must be >= 0, got {value!r}; set 0 to switch the term off")
    return value


def _power_of_two(key: str, value: int) -> int:
    if value < 1 or value & (value - 1):
        raise ConfigError(f"{key}: must be a power of 2 (1, 2, 4, 8, ...), got {value!r}")
    return value


VQVAE_KEYS = {
        # the seed's loss weights (trainer_imgen_cfg.yml)
        "vq_weight": TaskKey(float, 0.5, _non_negative, "weight of the vector-quantisation loss"),
        "recon_weight": TaskKey(float, 10.0, _non_negative, "weight of the MSE reconstruction loss"),
        "lpips_weight": TaskKey(float, 1.0, _non_negative, "weight of the LPIPS loss (0 = LPIPS off)"),
        "lpips_backbone": TaskKey(
            str, "pretrained", choice(LPIPS_BACKBONES),
            "LPIPS backbone: pretrained (ImageNet weights from the torch hub cache) | random (no download)",
        ),
        "lpips_net": TaskKey(str, "alex", choice(LPIPS_NETS), "LPIPS backbone network: alex | vgg | squeeze"),
        # the network
        "channels": TaskKey(int, 64, at_least(1), "VQ-VAE trunk width (not the image channels)"),
        "res_blocks": TaskKey(int, 2, at_least(0), "residual blocks in the encoder and in the decoder"),
        "downsample": TaskKey(int, 4, _power_of_two, "code grid downsampling factor (power of 2)"),
        "codebook_size": TaskKey(int, 512, at_least(2), "number of codes"),
        "code_dim": TaskKey(int, 32, at_least(1), "dimension of each code"),
        "commitment": TaskKey(float, 0.25, _non_negative, "commitment loss weight (beta)"),
        "codebook_ema": TaskKey(bool, False, None, "update the codebook by EMA instead of the gradient"),
        "codebook_decay": TaskKey(float, 0.99, fraction, "EMA decay of the codebook (codebook_ema: True)"),
        "restart_unused": TaskKey(bool, True, None, "re-initialise codes unused for restart_every steps"),
        "restart_every": TaskKey(int, 50, at_least(1), "training steps between dead-code restarts"),
        # the metrics
        "train_ssim_every": TaskKey(
            int, 4, at_least(1),
            "training SSIM on every Nth batch (train/ssim: their mean; 1 = every batch; val: always every batch)",
        ),
        # the photo patches
        "patch_size": TaskKey(int, 32, at_least(1), "training/validation crop size (divisible by downsample)"),
        "patches_per_epoch": TaskKey(int, 4096, at_least(1), "random training crops per epoch"),
        "channel_shuffle": TaskKey(bool, False, None, "permute the colour channels of training crops at random"),
}  # fmt: skip


def _kornia() -> Any:
    try:
        import kornia
    except ImportError:
        raise ImportError('VQ-VAE metrics (PSNR, SSIM) need kornia: pip install "lightrainer[vqvae]"') from None
    return kornia


def build_vqvae(cfg: Config, in_channels: int = 3) -> VQVAE:
    """The :class:`VQVAE` the config's network keys describe.

    Args:
        cfg: the validated config.
        in_channels: image channels.

    Raises:
        ConfigError: ``patch_size`` not divisible by ``downsample``.
    """
    check_patch_size(cfg.extra("patch_size"), cfg.extra("downsample"))
    return VQVAE(
        in_channels=in_channels,
        channels=cfg.extra("channels"),
        num_res_blocks=cfg.extra("res_blocks"),
        downsample=cfg.extra("downsample"),
        codebook_size=cfg.extra("codebook_size"),
        code_dim=cfg.extra("code_dim"),
        beta=cfg.extra("commitment"),
        ema=cfg.extra("codebook_ema"),
        ema_decay=cfg.extra("codebook_decay"),
        restart_unused=cfg.extra("restart_unused"),
        restart_every=cfg.extra("restart_every"),
    )


def check_patch_size(patch_size: int, downsample: int) -> None:
    """Raise a ConfigError unless the patches divide into whole codes."""
    if patch_size % downsample:
        lower = max(patch_size - patch_size % downsample, downsample)
        raise ConfigError(
            f"patch_size: {patch_size} is not divisible by downsample={downsample}; "
            f"use patch_size {lower} or {lower + downsample}"
        )


def build_lpips(net: str = "alex", backbone: str = "pretrained") -> nn.Module:
    """A frozen, eval-mode LPIPS network (the ``lpips`` package).

    Args:
        net: alex | vgg | squeeze.
        backbone: "pretrained" loads the ImageNet backbone from the torch hub cache (downloading
            it where the network allows); "random" uses a randomly initialised backbone (seeded,
            so it is the same on every rank and run) with LPIPS's shipped linear heads, and logs a
            warning: its values are not the perceptual metric of the LPIPS paper.

    Raises:
        ConfigError: the pretrained backbone is neither cached nor downloadable, or a bad name.
        ImportError: the ``lpips`` package is missing.
    """
    if net not in LPIPS_NETS:
        raise ConfigError(f"lpips_net: {net!r} is not one of {', '.join(LPIPS_NETS)}")
    if backbone not in LPIPS_BACKBONES:
        raise ConfigError(f"lpips_backbone: {backbone!r} is not one of {', '.join(LPIPS_BACKBONES)}")
    try:
        import lpips
    except ImportError:
        raise ImportError('LPIPS (lpips_weight > 0) needs the lpips package: pip install "lightrainer[vqvae]"') from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torchvision's `pretrained=` deprecation notice
        if backbone == "random":
            log.warning(
                "LPIPS uses a RANDOM %s backbone (lpips_backbone: random): a random-feature distance, "
                "not the perceptual metric of the LPIPS paper", net,
            )
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(_RANDOM_LPIPS_SEED)
                model = lpips.LPIPS(net=net, pnet_rand=True, verbose=False)
        else:
            try:
                model = lpips.LPIPS(net=net, verbose=False)
            except (OSError, RuntimeError) as err:  # URLError is an OSError
                target = Path(torch.hub.get_dir()) / "checkpoints" / LPIPS_BACKBONE_FILES[net]
                raise ConfigError(
                    f"lpips_backbone: pretrained needs the {net} ImageNet weights, which are not in the "
                    f"torch hub cache and could not be downloaded ({type(err).__name__}: {err}). Either "
                    f"place {LPIPS_BACKBONE_FILES[net]} at {target} ($TORCH_HOME/hub/checkpoints/), or set "
                    "lpips_backbone: random (a random-feature LPIPS), or lpips_weight: 0 (no LPIPS)"
                ) from None
    model.eval().requires_grad_(False)
    return model


class CodebookUsage(torchmetrics.Metric):
    """Fraction of the codebook used at least once over all updates (all processes)."""

    full_state_update = False

    def __init__(self, codebook_size: int) -> None:
        super().__init__()
        self.codebook_size = codebook_size
        self.add_state("counts", torch.zeros(codebook_size), dist_reduce_fx="sum")

    def update(self, codes: Tensor) -> None:
        self.counts += code_histogram(codes, self.codebook_size)

    def compute(self) -> Tensor:
        return (self.counts > 0).float().mean()


class VQVAEModule(LightrainerModule):
    """Train a VQ-VAE whose ``forward(x)`` returns ``(reconstruction, vq_loss, perplexity)``.

    Any network with that forward plugs in (the seed's contract); codebook usage is logged when
    the network also exposes ``last_codes`` (code indices of its latest forward) and
    ``codebook_size``, as :class:`~lightrainer.modules.VQVAE` does. Batches are ``(x,)`` or
    ``(x, ...)`` with x in [0, 1].

    The LPIPS network is built at ``setup`` (only when ``lpips_weight > 0``), frozen and kept off
    the module's state: it is not optimised, not saved in checkpoints, and follows the batch's
    device.

    Args:
        net: the VQ-VAE.
        cfg: the validated config (loss weights, LPIPS keys, fitness).
    """

    task_name = "vqvae"
    task_keys = VQVAE_KEYS
    metric_modes = {
        "loss": "min", "vq": "min", "recon": "min", "lpips": "min",
        "perplexity": "max", "usage": "max", "psnr": "max", "ssim": "max",
    }  # fmt: skip
    fitness_key = "val/psnr"
    fitness_mode = "max"
    default_datamodule = PhotoPatchesDataModule
    #: The whole network (images -> reconstruction), and images -> codes -> images.
    export_spec = ExportSpec(
        parts=(
            ExportPart(input_name="images", outputs=(ExportOutput("reconstruction"),), select=(0,)),
            ExportPart(".encoder", "encode_codes", "images", (ExportOutput("codes", "equal"),)),
            ExportPart(".decoder", "decode_codes", "codes", (ExportOutput("reconstruction"),), input_from=".encoder"),
        )
    )

    def __init__(self, net: nn.Module | None = None, cfg: Config | None = None) -> None:
        super().__init__(net, cfg)
        self.vq_weight = float(cfg.extra("vq_weight"))
        self.recon_weight = float(cfg.extra("recon_weight"))
        self.lpips_weight = float(cfg.extra("lpips_weight"))
        # SSIM costs 3% of a training step on the CPU (kornia's ten depthwise convolutions).
        self.train_ssim_every = int(cfg.extra("train_ssim_every"))
        self._train_batches = 0
        for key in ("vq_weight", "recon_weight", "lpips_weight"):
            _non_negative(key, getattr(self, key))
        self._lpips: Optional[nn.Module] = None  # plain attribute: not a submodule, not in state_dict
        self._test_samples: Optional[Tensor] = None  # the first test inputs, for reconstruction_test.png
        size = getattr(net, "codebook_size", None)
        self.usage_metrics = nn.ModuleDict(
            {stage: CodebookUsage(size) for stage in ("val", "test")} if isinstance(size, int) else {}
        )

    @classmethod
    def default_net(cls, cfg: Config, datamodule: Any = None) -> VQVAE:
        """The network the CLI trains when the YAML names none: :func:`build_vqvae` sized to the data."""
        in_channels = (getattr(datamodule, "input_shape", None) or (3,))[0]
        return build_vqvae(cfg, in_channels=in_channels)

    @classmethod
    def from_config(cls, cfg: Config, in_channels: int = 3) -> "VQVAEModule":
        """The module with the network the config's keys describe."""
        return cls(build_vqvae(cfg, in_channels), cfg)

    def configure_callbacks(self) -> list:
        """The reconstruction grid and codebook histogram (``plots: True``)."""
        if not self.cfg.plots:
            return []
        return [ReconstructionGrid(self.cfg)]

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        self._train_batches = 0  # the SSIM batches: 0, N, 2N, ... of every epoch, the same on every rank

    # ------------------------------------------------------------------ set-up checks
    def setup(self, stage: str) -> None:
        self._check_data()
        if self.lpips_weight > 0:
            self._lpips_net()

    def _check_data(self) -> None:
        """Fail before training when the data's channels or patch size do not fit the network."""
        datamodule = getattr(self.attached_trainer(), "datamodule", None)
        shape = getattr(datamodule, "input_shape", None)
        if shape is None:
            return
        in_channels = getattr(self.net, "in_channels", None)
        if in_channels is not None and shape[0] != in_channels:
            raise ConfigError(
                f"the data has {shape[0]}-channel images but the network takes {in_channels}: build the "
                f"network with in_channels={shape[0]} (or give the datamodule channels={in_channels})"
            )
        downsample = getattr(self.net, "downsample", None)
        if downsample is not None:
            for size in shape[1:]:
                check_patch_size(int(size), int(downsample))

    def config_notes(self) -> dict[str, Any]:
        """Entries for args.yaml's ``derived`` section: which LPIPS the run really used."""
        if self.lpips_weight <= 0:
            return {"lpips": "off (lpips_weight: 0)"}
        backbone = self.cfg.extra("lpips_backbone")
        note = "ImageNet-pretrained" if backbone == "pretrained" else "RANDOM (not the perceptual metric)"
        return {"lpips": f"{self.cfg.extra('lpips_net')} backbone, {note}"}

    # ------------------------------------------------------------------ the task
    def lpips(self, x: Tensor, recon: Tensor) -> Tensor:
        """Mean LPIPS distance between images in [0, 1] (grayscale repeated to RGB)."""
        net = self._lpips_net()
        if next(net.parameters()).device != x.device:
            net.to(x.device)
        if x.shape[1] == 1:
            x, recon = x.expand(-1, 3, -1, -1), recon.expand(-1, 3, -1, -1)
        return net(x * 2 - 1, recon * 2 - 1).mean()

    def _lpips_net(self) -> nn.Module:
        if self._lpips is None:
            # object.__setattr__: nn.Module would register it as a submodule, putting it in the
            # state_dict, the checkpoints, the model summary and train()/eval() switches.
            object.__setattr__(self, "_lpips", build_lpips(self.cfg.extra("lpips_net"), self.cfg.extra("lpips_backbone")))
        return self._lpips

    def step(self, batch: Any, stage: str) -> StepOutput:
        kornia = _kornia()
        x = self.example_input(batch)
        recon, vq_loss, perplexity = self.net(x)
        mse = F.mse_loss(recon, x)
        terms: dict[str, Tensor] = {"vq": vq_loss, "recon": mse}
        loss = self.vq_weight * vq_loss + self.recon_weight * mse
        if self.lpips_weight > 0:
            terms["lpips"] = self.lpips(x, recon)
            loss = loss + self.lpips_weight * terms["lpips"]
        with torch.no_grad():
            clamped = recon.detach().clamp(0, 1)
            terms["perplexity"] = perplexity.detach()
            terms["psnr"] = kornia.metrics.psnr(clamped, x, max_val=1.0)
            if stage != "train" or self._train_batches % self.train_ssim_every == 0:
                terms["ssim"] = kornia.metrics.ssim(clamped, x, window_size=11).mean()
            if stage == "train":
                self._train_batches += 1
            codes = getattr(self.net, "last_codes", None)
            if stage == "test" and self._test_samples is None:
                self._test_samples = x[:12].detach().cpu().clone()
            if codes is not None and stage in self.usage_metrics:
                self.usage_metrics[stage].update(codes)
                terms["usage"] = self.usage_metrics[stage]
            elif codes is not None and self.usage_metrics:
                terms["usage"] = usage_of(codes, self.net.codebook_size)
        return loss, terms

    def on_test_epoch_start(self) -> None:
        self._test_samples = None  # the grid shows this test's first inputs

    def test_report(self, run_dir: Path) -> TestReport:
        """``reconstruction_test.png``: the first test inputs above their reconstructions, with the
        test PSNR and SSIM (``plots``; rank 0). The table is the logged test metrics."""
        samples, self._test_samples = self._test_samples, None
        trainer = self.attached_trainer()
        if samples is None or not self.cfg.plots or (trainer is not None and not trainer.is_global_zero):
            return TestReport()
        with torch.no_grad():
            recon = self.net(samples.to(self.device))[0].float().cpu()
        note = metrics_note(trainer, "test") if trainer is not None else ""
        path = save_grid(reconstruction_grid(samples.float(), recon), Path(run_dir) / "reconstruction_test.png",
                         "top = test input, bottom = reconstruction" + note)
        return TestReport(pictures=[str(path)])

    def prediction_columns(self, output: Any, batch: Any) -> dict[str, Any]:
        """Per image: ``psnr`` (dB) and ``mse`` of its reconstruction (clamped to [0, 1])."""
        x = self.example_input(batch).float()
        recon = output[0].detach().float().clamp(0, 1)
        mse = (recon - x).pow(2).flatten(1).mean(1)
        return {"psnr": (10 * torch.log10(1.0 / mse.clamp(min=1e-10))).cpu(), "mse": mse.cpu()}

    def prediction_images(self, output: Any, batch: Any) -> Optional[Tensor]:
        """The reconstructions, clamped to [0, 1]."""
        return output[0].detach().float().clamp(0, 1)

    @property
    def code_counts(self) -> Optional[Tensor]:
        """How often each code was chosen in this process's current validation epoch."""
        metric = self.usage_metrics["val"] if "val" in self.usage_metrics else None
        return None if metric is None else metric.counts
