"""A VQ-VAE network: convolutional encoder, vector quantiser, convolutional decoder.

The network's ``forward(x)`` returns ``(reconstruction, vq_loss, perplexity)``, as the original
lightrainer's models did, so a user's own VQ-VAE plugs into :class:`~lightrainer.modules.VQVAEModule`
the same way. :meth:`VQVAE.encode_codes` / :meth:`VQVAE.decode_codes` (and the wrappers
:class:`VQVAEEncoder` / :class:`VQVAEDecoder`) split it for separate ONNX export.
"""

from __future__ import annotations

import logging
import math
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

log = logging.getLogger(__name__)


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sum a tensor over processes (in place); a no-op in a single process."""
    if _world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def _broadcast(tensor: Tensor) -> Tensor:
    """Rank 0's tensor on every process (in place), so all replicas keep the same codebook."""
    if _world_size() > 1:
        dist.broadcast(tensor, src=0)
    return tensor


def code_histogram(codes: Tensor, codebook_size: int) -> Tensor:
    """How often each code occurs in ``codes`` (float, length K).

    A scatter-add rather than ``torch.bincount``: it exports to ONNX with either exporter.
    """
    flat = codes.reshape(-1)
    return torch.zeros(codebook_size, device=codes.device).scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.float))


def perplexity_of(codes: Tensor, codebook_size: int) -> Tensor:
    """exp(entropy) of the code histogram: 1 when one code is used, K when all K are used equally."""
    counts = code_histogram(codes, codebook_size)
    probs = counts / counts.sum().clamp(min=1)
    return torch.exp(-(probs * torch.log(probs + 1e-10)).sum())


def usage_of(codes: Tensor, codebook_size: int) -> Tensor:
    """Fraction of the codebook's codes that occur at least once in ``codes``."""
    return (code_histogram(codes, codebook_size) > 0).float().mean()


class QuantizerOutput(NamedTuple):
    """What :class:`VectorQuantizer` returns."""

    quantized: Tensor  # straight-through quantized vectors, same shape as the input
    loss: Tensor  # codebook + commitment loss (commitment only with EMA updates)
    perplexity: Tensor
    codes: Tensor  # code index per vector, input shape without the channel dim


class VectorQuantizer(nn.Module):
    """Nearest-neighbour vector quantiser with a straight-through gradient.

    Loss: ``mse(sg[z], e) + beta * mse(z, sg[e])`` (van den Oord et al. 2017); with ``ema=True``
    the codebook follows exponential moving averages of its assigned vectors instead of a gradient
    and the loss is the commitment term alone. Dead-code restart: during training, codes chosen by
    no vector for ``restart_every`` steps are re-initialised from random encoder outputs of the
    current batch; the very first training batch initialises the whole codebook the same way.

    Args:
        codebook_size: number of codes K (>= 2).
        code_dim: dimension D of each code.
        beta: commitment loss weight.
        ema: update the codebook by EMA instead of the gradient.
        ema_decay: EMA decay.
        restart_unused: re-initialise codes unused for ``restart_every`` training steps.
        restart_every: training steps between dead-code checks.
    """

    def __init__(
        self,
        codebook_size: int,
        code_dim: int,
        beta: float = 0.25,
        ema: bool = False,
        ema_decay: float = 0.99,
        restart_unused: bool = True,
        restart_every: int = 50,
    ) -> None:
        super().__init__()
        if codebook_size < 2:
            raise ValueError(f"codebook_size: must be >= 2, got {codebook_size}")
        if code_dim < 1:
            raise ValueError(f"code_dim: must be >= 1, got {code_dim}")
        if not 0 < ema_decay < 1:
            raise ValueError(f"ema_decay: must be in (0, 1), got {ema_decay}")
        if restart_every < 1:
            raise ValueError(f"restart_every: must be >= 1, got {restart_every}")
        self.codebook_size = codebook_size
        self.code_dim = code_dim
        self.beta = beta
        self.ema = ema
        self.ema_decay = ema_decay
        self.restart_unused = restart_unused
        self.restart_every = restart_every
        # An nn.Embedding so the shared base puts the codebook in its low-decay embedding group.
        self.embedding = nn.Embedding(codebook_size, code_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / codebook_size, 1.0 / codebook_size)
        if ema:
            self.embedding.weight.requires_grad_(False)
            self.register_buffer("ema_cluster_size", torch.ones(codebook_size))
            self.register_buffer("ema_embed_sum", self.embedding.weight.detach().clone())
        self.register_buffer("initialized", torch.tensor(not restart_unused))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("hits_since_restart", torch.zeros(codebook_size))
        self.last_codes: Tensor | None = None
        # Host-side mirrors of `initialized` / `steps`, so a training step does not sync with the
        # device to read them; None = read from the buffers (after construction or a state load).
        self._host_steps: int | None = None
        self._host_initialized: bool | None = None

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        super()._load_from_state_dict(*args, **kwargs)
        self._host_steps = None
        self._host_initialized = None

    @property
    def codebook(self) -> Tensor:
        """The (K, D) code vectors."""
        return self.embedding.weight

    def nearest(self, flat: Tensor) -> Tensor:
        """Index of the nearest code (squared Euclidean distance) for each row of ``flat`` (N, D)."""
        book = self.codebook
        distances = (
            flat.pow(2).sum(1, keepdim=True) - 2 * flat @ book.t() + book.pow(2).sum(1)[None, :]
        )
        return distances.argmin(1)

    def forward(self, z: Tensor) -> QuantizerOutput:
        """Quantise ``z`` of shape (B, D, H, W) (or (N, D)) along dim 1."""
        channels_first = z.dim() == 4
        flat = z.permute(0, 2, 3, 1).reshape(-1, self.code_dim) if channels_first else z
        if self.training and not self._is_initialized():
            self._restart(flat.detach(), torch.ones(self.codebook_size, dtype=torch.bool, device=z.device))
            self.initialized.fill_(True)
            self._host_initialized = True
        codes = self.nearest(flat.detach())
        quantized = self.codebook[codes]

        if self.training:
            counts = _all_reduce_sum(code_histogram(codes, self.codebook_size))
            if self.ema:
                self._ema_update(flat.detach(), codes, counts)
                quantized = self.codebook[codes]
            self._track_and_restart(flat.detach(), counts)

        commitment = F.mse_loss(flat, quantized.detach())
        if self.ema:
            loss = self.beta * commitment
        else:
            loss = F.mse_loss(quantized, flat.detach()) + self.beta * commitment
        quantized = flat + (quantized - flat).detach()  # straight-through estimator
        perplexity = perplexity_of(codes, self.codebook_size)

        if channels_first:
            b, _, h, w = z.shape
            quantized = quantized.reshape(b, h, w, self.code_dim).permute(0, 3, 1, 2).contiguous()
            codes = codes.reshape(b, h, w)
        self.last_codes = codes.detach()
        return QuantizerOutput(quantized, loss, perplexity, codes)

    @torch.compiler.disable  # host-side bookkeeping: keep it out of compiled graphs
    @torch.no_grad()
    def _ema_update(self, flat: Tensor, codes: Tensor, counts: Tensor) -> None:
        # Only codes that received vectors move: e_k <- (d*S_k + (1-d)*sum_k) / (d*N_k + (1-d)*n_k).
        decay = self.ema_decay
        sums = torch.zeros_like(self.ema_embed_sum).index_add_(0, codes, flat.to(self.ema_embed_sum.dtype))
        _all_reduce_sum(sums)
        self.ema_cluster_size.mul_(decay).add_(counts, alpha=1 - decay)
        self.ema_embed_sum.mul_(decay).add_(sums, alpha=1 - decay)
        used = counts > 0
        updated = self.ema_embed_sum / self.ema_cluster_size.clamp(min=1e-12)[:, None]
        self.embedding.weight.data.copy_(torch.where(used[:, None], updated, self.embedding.weight.data))

    def _is_initialized(self) -> bool:
        if self._host_initialized is None:
            self._host_initialized = bool(self.initialized)
        return self._host_initialized

    @torch.compiler.disable
    @torch.no_grad()
    def _track_and_restart(self, flat: Tensor, counts: Tensor) -> None:
        if self._host_steps is None:
            self._host_steps = int(self.steps)
        self._host_steps += 1
        self.steps.add_(1)
        self.hits_since_restart.add_(counts)
        if not self.restart_unused or self._host_steps % self.restart_every != 0:
            return
        dead = self.hits_since_restart == 0
        if bool(dead.any()):
            self._restart(flat, dead)
            if log.isEnabledFor(logging.DEBUG):  # int() syncs with the device: only when asked
                log.debug("restarted %d unused codes at step %d", int(dead.sum()), int(self.steps))
        self.hits_since_restart.zero_()

    @torch.compiler.disable
    @torch.no_grad()
    def _restart(self, flat: Tensor, dead: Tensor) -> None:
        """Re-initialise the codes where ``dead`` is True from random rows of ``flat`` (N, D)."""
        num_dead = int(dead.sum())
        if num_dead <= flat.shape[0]:
            rows = flat[torch.randperm(flat.shape[0], device=flat.device)[:num_dead]]
        else:  # fewer vectors than dead codes: reuse rows, jittered so the codes differ
            rows = flat[torch.randint(flat.shape[0], (num_dead,), device=flat.device)]
            rows = rows + 0.01 * rows.std() * torch.randn_like(rows)
        rows = _broadcast(rows.contiguous().to(self.codebook.dtype))
        self.embedding.weight.data[dead] = rows
        if self.ema:
            self.ema_embed_sum[dead] = rows
            self.ema_cluster_size[dead] = 1.0


class ResidualBlock(nn.Module):
    """ReLU -> 3x3 conv -> ReLU -> 1x1 conv, added to the input."""

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(channels, hidden, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(hidden, channels, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.block(x)


def _res_stack(channels: int, num_blocks: int) -> list[nn.Module]:
    return [ResidualBlock(channels, max(channels // 2, 1)) for _ in range(num_blocks)] + [nn.ReLU()]


class VQVAE(nn.Module):
    """VQ-VAE (van den Oord et al. 2017) with a configurable downsampling factor.

    Images are expected in [0, 1] (the encoder centres them to [-1, 1]; the decoder maps back).

    Args:
        in_channels: image channels.
        channels: width of the convolutional trunk.
        num_res_blocks: residual blocks in the encoder and in the decoder.
        downsample: spatial reduction of the code grid, a power of 2 (1, 2, 4, 8, ...).
        codebook_size: number of codes (>= 2).
        code_dim: dimension of each code.
        beta: commitment loss weight.
        ema: EMA codebook updates instead of gradient updates.
        ema_decay: EMA decay.
        restart_unused: re-initialise codes unused for ``restart_every`` training steps.
        restart_every: training steps between dead-code checks.

    Raises:
        ValueError: a bad size (downsample not a power of 2, codebook_size < 2, ...).
    """

    def __init__(
        self,
        in_channels: int = 3,
        channels: int = 64,
        num_res_blocks: int = 2,
        downsample: int = 4,
        codebook_size: int = 512,
        code_dim: int = 32,
        beta: float = 0.25,
        ema: bool = False,
        ema_decay: float = 0.99,
        restart_unused: bool = True,
        restart_every: int = 50,
    ) -> None:
        super().__init__()
        if downsample < 1 or downsample & (downsample - 1):
            raise ValueError(f"downsample: must be a power of 2 (1, 2, 4, 8, ...), got {downsample}")
        for name, value in (("in_channels", in_channels), ("channels", channels)):
            if value < 1:
                raise ValueError(f"{name}: must be >= 1, got {value}")
        if num_res_blocks < 0:
            raise ValueError(f"num_res_blocks: must be >= 0, got {num_res_blocks}")
        self.in_channels = in_channels
        self.downsample = downsample
        stages = int(math.log2(downsample))

        enc: list[nn.Module] = []
        width = in_channels
        for _ in range(stages):
            enc += [nn.Conv2d(width, channels, 4, stride=2, padding=1), nn.ReLU()]
            width = channels
        enc += [nn.Conv2d(width, channels, 3, padding=1), *_res_stack(channels, num_res_blocks)]
        enc += [nn.Conv2d(channels, code_dim, 1)]
        self.encoder = nn.Sequential(*enc)

        self.quantizer = VectorQuantizer(
            codebook_size, code_dim, beta, ema, ema_decay, restart_unused, restart_every
        )

        dec: list[nn.Module] = [nn.Conv2d(code_dim, channels, 3, padding=1), *_res_stack(channels, num_res_blocks)]
        for i in range(stages):
            last = i == stages - 1
            dec += [nn.ConvTranspose2d(channels, in_channels if last else channels, 4, stride=2, padding=1)]
            if not last:
                dec += [nn.ReLU()]
        if stages == 0:
            dec += [nn.Conv2d(channels, in_channels, 3, padding=1)]
        self.decoder = nn.Sequential(*dec)

    @property
    def codebook_size(self) -> int:
        return self.quantizer.codebook_size

    @property
    def last_codes(self) -> Tensor | None:
        """Code indices (B, h, w) of the latest forward pass, for usage statistics."""
        return self.quantizer.last_codes

    def encode(self, x: Tensor) -> Tensor:
        """Continuous encoder output (B, code_dim, H/downsample, W/downsample)."""
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"VQVAE expects images of shape (B, {self.in_channels}, H, W), got {tuple(x.shape)}: "
                "set in_channels to the images' channel count"
            )
        if x.shape[-1] % self.downsample or x.shape[-2] % self.downsample:
            raise ValueError(
                f"image size {tuple(x.shape[-2:])} is not divisible by downsample={self.downsample}"
            )
        return self.encoder(x * 2 - 1)  # centred inputs train faster

    def decode(self, quantized: Tensor) -> Tensor:
        """Image in [0, 1] (not clamped) from quantized vectors (B, code_dim, h, w)."""
        return self.decoder(quantized) * 0.5 + 0.5

    def encode_codes(self, x: Tensor) -> Tensor:
        """Code indices (B, h, w) of images ``x``."""
        z = self.encode(x)
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        return self.quantizer.nearest(flat).reshape(z.shape[0], z.shape[2], z.shape[3])

    def decode_codes(self, codes: Tensor) -> Tensor:
        """Images from code indices (B, h, w)."""
        return self.decode(self.quantizer.codebook[codes].permute(0, 3, 1, 2))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Returns ``(reconstruction, vq_loss, perplexity)``."""
        out = self.quantizer(self.encode(x))
        return self.decode(out.quantized), out.loss, out.perplexity


class VQVAEEncoder(nn.Module):
    """Images -> code indices, for exporting the encoder alone."""

    def __init__(self, net: VQVAE) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net.encode_codes(x)


class VQVAEDecoder(nn.Module):
    """Code indices -> images, for exporting the decoder alone."""

    def __init__(self, net: VQVAE) -> None:
        super().__init__()
        self.net = net

    def forward(self, codes: Tensor) -> Tensor:
        return self.net.decode_codes(codes)
