"""VQ-VAE task: quantiser, loss, metrics, LPIPS offline behaviour, photo patches, a few-batch fit."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

import lightrainer.modules.vqvae as vqvae_task  # registers the VQ-VAE keys
from lightrainer import ConfigError, load_config
from lightrainer.config import derived_values
from lightrainer.datamodules.base import once_shuffled
from lightrainer.datamodules.photos import PhotoPatchesDataModule, RandomPatchLoader, grid_patches, load_photo
from lightrainer.modules.vqvae import VQVAEModule, build_lpips, build_vqvae
from lightrainer.modules.vqvae_net import VQVAE, VectorQuantizer, usage_of
from lightrainer.trainer import build_trainer

ROOT = Path(__file__).resolve().parents[1]


def _quantizer(codebook: list[list[float]], **kwargs) -> VectorQuantizer:
    vq = VectorQuantizer(len(codebook), len(codebook[0]), **kwargs)
    with torch.no_grad():
        vq.embedding.weight.copy_(torch.tensor(codebook))
        if vq.ema:
            vq.ema_embed_sum.copy_(vq.embedding.weight)
    return vq


CODEBOOK = [[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [5.0, 5.0]]


def tiny_vqvae(**overrides) -> VQVAE:
    """The suite's small VQ-VAE: 8 channels, one residual block, x2, 16 codes of dimension 4."""
    return VQVAE(**{"channels": 8, "num_res_blocks": 1, "downsample": 2, "codebook_size": 16, "code_dim": 4,
                    **overrides})


# ----------------------------------------------------------------------------- the quantiser
def test_straight_through_gradient_reaches_the_encoder() -> None:
    torch.manual_seed(0)
    vq = _quantizer(CODEBOOK, restart_unused=False)
    z = torch.tensor([[0.1, 0.2], [0.9, -0.1], [4.0, 6.0]], requires_grad=True)
    vq.eval()(z).quantized.sum().backward()
    assert torch.equal(z.grad, torch.ones_like(z))  # the identity: d quantized / d z = 1

    net = tiny_vqvae()
    x = torch.rand(2, 3, 8, 8)
    recon, vq_loss, _ = net(x)
    F.mse_loss(recon, x).backward()  # the reconstruction loss alone reaches the encoder only through the STE
    first_conv = net.encoder[0].weight
    assert first_conv.grad is not None and first_conv.grad.abs().sum() > 0


def test_perplexity_usage_and_loss_match_a_hand_computation() -> None:
    beta = 0.25
    vq = _quantizer(CODEBOOK, beta=beta, restart_unused=False).eval()
    z = torch.tensor([[0.1, 0.1], [-0.2, 0.1], [0.0, -0.3], [0.8, 0.1]])  # codes 0, 0, 0, 1
    out = vq(z)
    assert out.codes.tolist() == [0, 0, 0, 1]
    p = [0.75, 0.25]
    assert out.perplexity.item() == pytest.approx(math.exp(-sum(q * math.log(q) for q in p)), rel=1e-5)
    assert usage_of(out.codes, 4).item() == 0.5  # 2 of 4 codes
    chosen = torch.tensor([CODEBOOK[0]] * 3 + [CODEBOOK[1]])
    mse = ((z - chosen) ** 2).mean().item()
    assert out.loss.item() == pytest.approx((1 + beta) * mse, rel=1e-5)  # codebook + commitment terms
    assert torch.equal(out.quantized, chosen)


def test_ema_update_moves_exactly_the_used_codes() -> None:
    decay = 0.9
    vq = _quantizer(CODEBOOK, ema=True, ema_decay=decay, restart_unused=False).train()
    z = torch.tensor([[0.2, 0.0], [0.0, 0.4], [4.0, 6.0]])  # codes 0, 0, 3
    vq(z)
    book = vq.embedding.weight
    # e_k <- (d * S_k + (1 - d) * sum_k) / (d * N_k + (1 - d) * n_k), with S = e and N = 1 initially
    expected0 = (decay * torch.tensor(CODEBOOK[0]) + (1 - decay) * z[:2].sum(0)) / (decay + (1 - decay) * 2)
    expected3 = (decay * torch.tensor(CODEBOOK[3]) + (1 - decay) * z[2]) / (decay + (1 - decay) * 1)
    assert torch.allclose(book[0], expected0) and torch.allclose(book[3], expected3)
    assert torch.equal(book[1], torch.tensor(CODEBOOK[1])) and torch.equal(book[2], torch.tensor(CODEBOOK[2]))
    assert not book.requires_grad  # EMA codebooks are not trained by the optimizer


def test_dead_code_restart_replaces_exactly_the_unused_codes() -> None:
    torch.manual_seed(0)
    vq = _quantizer(CODEBOOK, restart_unused=True, restart_every=3).train()
    vq.initialized.fill_(True)  # skip the data-dependent initialisation of the first batch
    vq._host_initialized = None
    before = vq.embedding.weight.detach().clone()
    batches = [torch.tensor([[0.1, 0.0], [0.9, 0.1], [1.1, -0.1]]) + 0.01 * i for i in range(3)]  # codes 0, 1
    for z in batches[:2]:
        vq(z)
        assert torch.equal(vq.embedding.weight, before)  # not yet at restart_every
    vq(batches[2])
    after = vq.embedding.weight.detach()
    assert torch.equal(after[:2], before[:2])  # used codes untouched
    for k in (2, 3):  # unused for 3 steps: now rows of the latest encoder outputs
        assert not torch.equal(after[k], before[k])
        assert any(torch.equal(after[k], row) for row in batches[2])
    assert vq.hits_since_restart.sum() == 0


def test_first_training_batch_initialises_the_codebook_from_encoder_outputs() -> None:
    torch.manual_seed(0)
    vq = VectorQuantizer(4, 2, restart_unused=True).train()
    z = torch.randn(10, 2)
    vq(z)
    assert all(any(torch.equal(code, row) for row in z) for code in vq.embedding.weight.detach())
    assert bool(vq.initialized)


def test_encode_decode_codes_round_trip_equals_forward() -> None:
    torch.manual_seed(0)
    net = tiny_vqvae(downsample=4, codebook_size=8).eval()
    x = torch.rand(2, 3, 16, 16)
    codes = net.encode_codes(x)
    assert codes.shape == (2, 4, 4)
    recon, _, _ = net(x)
    assert torch.allclose(net.decode_codes(codes), recon, atol=1e-6)
    assert torch.equal(net.last_codes, codes)


# ----------------------------------------------------------------------------- config and errors
@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"vq_weight": -1.0}, "vq_weight: must be >= 0"),
        ({"lpips_weight": -0.5}, "lpips_weight: must be >= 0"),
        ({"codebook_size": 1}, "codebook_size: must be >= 2"),
        ({"downsample": 3}, "downsample: must be a power of 2"),
        ({"lpips_backbone": "imagenet"}, "lpips_backbone: 'imagenet' is not one of pretrained, random"),
    ],
)
def test_bad_keys_fail_at_load(overrides: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config(overrides)


def test_seed_keys_default_and_patch_size_must_divide() -> None:
    cfg = load_config({"batch": 8}, task_class=VQVAEModule)
    assert (cfg.extra("vq_weight"), cfg.extra("recon_weight"), cfg.extra("lpips_weight")) == (0.5, 10.0, 1.0)
    with pytest.raises(ConfigError, match="patch_size: 30 is not divisible by downsample=4; use patch_size 28 or 32"):
        build_vqvae(load_config({"patch_size": 30, "downsample": 4}))


def test_wrong_channel_count_fails_before_training(tmp_path: Path) -> None:
    cfg = load_config({"save_dir": str(tmp_path), "lpips_weight": 0.0, "patches_per_epoch": 8, "batch": 8})
    datamodule = PhotoPatchesDataModule(cfg, channels=1, train_photos=("camera",), val_photos=("coins",))
    module = VQVAEModule(VQVAE(in_channels=3, channels=8, num_res_blocks=0, codebook_size=8, code_dim=4), cfg)
    trainer = build_trainer(cfg, enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(ConfigError, match="1-channel images but the network takes 3"):
        trainer.fit(module, datamodule)
    assert module.net.quantizer.steps.item() == 0


# ----------------------------------------------------------------------------- loss and metrics
def test_loss_is_the_weighted_sum_of_independently_computed_terms() -> None:
    import lpips

    torch.manual_seed(0)
    cfg = load_config({"vq_weight": 0.3, "recon_weight": 2.0, "lpips_weight": 0.7, "lpips_backbone": "random"})
    net = tiny_vqvae().eval()
    module = VQVAEModule(net, cfg).eval()
    x = torch.rand(4, 3, 32, 32)
    loss, terms = module.step((x,), "val")

    recon, vq_loss, _ = net(x)
    mse = ((recon - x) ** 2).mean()
    with torch.random.fork_rng():
        torch.manual_seed(0)  # the random backbone is seeded with 0
        reference = lpips.LPIPS(net="alex", pnet_rand=True, verbose=False).eval()
    lp = reference(x * 2 - 1, recon * 2 - 1).mean()
    expected = 0.3 * vq_loss + 2.0 * mse + 0.7 * lp
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert terms["recon"].item() == pytest.approx(mse.item(), rel=1e-6)
    assert terms["lpips"].item() == pytest.approx(lp.item(), rel=1e-5)
    assert "lpips" not in module.state_dict() and not any(k.startswith("_lpips") for k in module.state_dict())
    assert all(p.requires_grad is False for p in module._lpips.parameters())


def test_logged_psnr_and_ssim_equal_torchmetrics(tmp_path: Path) -> None:
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    torch.manual_seed(0)
    cfg = load_config({"save_dir": str(tmp_path), "batch": 16, "lpips_weight": 0.0, "plots": False})
    datamodule = PhotoPatchesDataModule(cfg, train_photos=("coffee",), val_photos=("flower",))
    net = tiny_vqvae()
    module = VQVAEModule(net, cfg)
    trainer = build_trainer(cfg, limit_val_batches=1, enable_progress_bar=False, enable_model_summary=False)
    trainer.validate(module, datamodule)
    x = datamodule.val_data[0][once_shuffled(len(datamodule.val_data[0]), cfg.seed)[:16]]  # the first val batch
    with torch.no_grad():
        recon = net.eval()(x)[0].clamp(0, 1)
    psnr = peak_signal_noise_ratio(recon, x, data_range=1.0)
    ssim = structural_similarity_index_measure(recon, x, data_range=1.0, kernel_size=11, sigma=1.5)
    assert trainer.callback_metrics["val/psnr"].item() == pytest.approx(psnr.item(), abs=1e-4)
    assert trainer.callback_metrics["val/ssim"].item() == pytest.approx(ssim.item(), abs=1e-3)
    distinct = len(set(net.encode_codes(x).flatten().tolist()))
    assert trainer.callback_metrics["val/usage"].item() == pytest.approx(distinct / 16)


def test_training_ssim_every_nth_batch_and_its_epoch_mean(tmp_path: Path) -> None:
    """train/ssim is the batch-size-weighted mean over batches 0, N, 2N, ... of the epoch; train/psnr
    and the loss are over every batch. Recomputed from each batch with the weights it met."""
    import copy

    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    seen: list[tuple[torch.Tensor, dict]] = []

    class Recording(VQVAEModule):  # keeps each training batch as the step got it, and the weights it met
        def step(self, batch, stage):  # noqa: ANN001
            if stage == "train":
                seen.append((batch[0].clone(), copy.deepcopy(self.net.state_dict())))
            return super().step(batch, stage)

    cfg = load_config({"save_dir": str(tmp_path), "batch": 8, "lpips_weight": 0.0, "plots": False, "epochs": 1,
                       "patches_per_epoch": 64, "train_ssim_every": 3})
    datamodule = PhotoPatchesDataModule(cfg, train_photos=("coffee",), val_photos=("flower",))
    net = tiny_vqvae(restart_unused=False)
    trainer = build_trainer(cfg, limit_val_batches=1, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(Recording(net, cfg), datamodule)
    assert [len(x) for x, _ in seen] == [8] * 8

    replay = tiny_vqvae(restart_unused=False)
    ssim_sum = psnr_sum = 0.0
    ssim_n = psnr_n = 0
    with torch.no_grad():
        for i, (x, state) in enumerate(seen):
            replay.load_state_dict(state)
            recon = replay.train()(x)[0].clamp(0, 1)
            psnr_sum += peak_signal_noise_ratio(recon, x, data_range=1.0).item() * len(x)
            psnr_n += len(x)
            if i % 3 == 0:
                ssim = structural_similarity_index_measure(recon, x, data_range=1.0, kernel_size=11, sigma=1.5)
                ssim_sum += ssim.item() * len(x)
                ssim_n += len(x)
    assert ssim_n == 3 * 8  # batches 0, 3, 6
    logged = trainer.callback_metrics
    assert logged["train/ssim"].item() == pytest.approx(ssim_sum / ssim_n, abs=1e-3)
    assert logged["train/psnr"].item() == pytest.approx(psnr_sum / psnr_n, abs=1e-3)


def test_train_ssim_every_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="train_ssim_every"):
        load_config({"save_dir": str(tmp_path), "train_ssim_every": 0})


def test_exports_to_onnx_whole_and_split() -> None:
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    import io

    from lightrainer.modules.vqvae_net import VQVAEDecoder, VQVAEEncoder

    torch.manual_seed(0)
    net = tiny_vqvae().eval()
    x = torch.rand(2, 3, 16, 16)
    codes = net.encode_codes(x)
    for model, inputs, expected in (
        (net, x, net(x)[0]), (VQVAEEncoder(net), x, codes), (VQVAEDecoder(net), codes, net.decode_codes(codes)),
    ):
        buffer = io.BytesIO()
        torch.onnx.export(model, (inputs,), buffer, dynamo=False)
        session = ort.InferenceSession(buffer.getvalue())
        out = session.run(None, {session.get_inputs()[0].name: inputs.numpy()})[0]
        assert torch.allclose(torch.from_numpy(out).to(expected.dtype), expected.detach(), atol=1e-5)


# ----------------------------------------------------------------------------- LPIPS offline
def test_random_lpips_backbone_is_announced(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="lightrainer.modules.vqvae"):
        model = build_lpips("alex", "random")
    assert "RANDOM alex backbone" in caplog.text
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_pretrained_lpips_without_weights_or_network_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):  # refused at once: no network touched
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    with caplog.at_level(logging.WARNING), pytest.raises(ConfigError, match="set lpips_backbone: random"):
        build_lpips("alex", "pretrained")
    assert "RANDOM" not in caplog.text  # never a silent (or logged) fallback


def test_pretrained_lpips_loads_offline_from_the_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from torchvision.models import alexnet

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.manual_seed(1)
    weights = alexnet().state_dict()  # stands in for the ImageNet file: same name, same layout
    torch.save(weights, checkpoints / vqvae_task.LPIPS_BACKBONE_FILES["alex"])
    model = build_lpips("alex", "pretrained")
    assert torch.equal(model.net.slice1[0].weight, weights["features.0.weight"])


# ----------------------------------------------------------------------------- photo patches
def test_random_patch_loader_yields_reproducible_crops_of_the_photos() -> None:
    h, w = 12, 20
    photo = (torch.arange(h * w).reshape(1, h, w) % 251).to(torch.uint8).expand(3, h, w).contiguous()
    loader = RandomPatchLoader([photo], patch=4, batch_size=32, batches_per_epoch=2, seed=3)
    epoch0 = [b[0] for b in loader]
    (x,) = next(iter(loader))
    assert x.shape == (32, 3, 4, 4) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    values = (torch.cat(epoch0) * 255).round().long()[:, 0]
    flipped = 0
    for crop in values:
        top, left = divmod(int(crop.min()), w)  # values grow along rows and columns
        window = (torch.arange(h * w).reshape(h, w) % 251)[top : top + 4, left : left + 4]
        assert torch.equal(crop, window) or torch.equal(crop, window.flip(-1))
        flipped += torch.equal(crop, window.flip(-1))
    assert 0 < flipped < len(values)
    again = RandomPatchLoader([photo], patch=4, batch_size=32, batches_per_epoch=2, seed=3)
    assert all(torch.equal(a[0], b) for a, b in zip(again, epoch0))  # same seed and epoch, same crops
    other_rank = RandomPatchLoader([photo], patch=4, batch_size=32, batches_per_epoch=2, seed=3, rank=1)
    assert not torch.equal(next(iter(other_rank))[0], epoch0[0])


def test_channel_shuffle_permutes_the_colour_channels_of_each_crop() -> None:
    base = torch.arange(8 * 8).reshape(8, 8)
    photo = torch.stack([base, base + 64, base + 128]).to(torch.uint8)  # channel c holds base + 64c
    loader = RandomPatchLoader([photo], patch=8, batch_size=16, batches_per_epoch=1, hflip=False, channel_shuffle=True)
    (x,) = next(iter(loader))
    values = (x * 255).round().long()
    orders = {tuple((values[i, :, 0, 0] // 64).tolist()) for i in range(16)}
    assert all(sorted(o) == [0, 1, 2] for o in orders) and len(orders) > 1  # permutations, not all the same
    for i in range(16):
        assert torch.equal(values[i] % 64, base.expand(3, 8, 8))  # the same crop in every channel


def test_photo_datamodule_validates_on_other_photos(tmp_path: Path) -> None:
    cfg = load_config({"batch": 8, "patch_size": 16, "patches_per_epoch": 24})
    datamodule = PhotoPatchesDataModule(cfg, train_photos=("coffee", "camera"), val_photos=("flower",))
    datamodule.setup()
    flower = load_photo("flower")
    assert torch.equal(datamodule.val_data[0], grid_patches(flower, 16).float() / 255)
    assert datamodule.val_data[0].shape[0] == (flower.shape[1] // 16) * (flower.shape[2] // 16)
    batches = list(datamodule.train_dataloader())
    assert len(batches) == 3 and all(len(b) == 1 and b[0].shape == (8, 3, 16, 16) for b in batches)
    with pytest.raises(ConfigError, match="share \\['coffee'\\]"):
        PhotoPatchesDataModule(cfg, train_photos=("coffee",), val_photos=("coffee",))
    with pytest.raises(ConfigError, match="photo 'lena' is not packaged offline"):
        load_photo("lena")


# ----------------------------------------------------------------------------- the shipped config
def test_few_batch_fit_of_the_shipped_config(tmp_path: Path) -> None:
    from lightrainer.build import build_from_config

    cfg = load_config(
        ROOT / "configs" / "vqvae.yaml", save_dir=str(tmp_path), epochs=1, patches_per_epoch=64, batch=32,
        lpips_weight=0.5, lpips_backbone="random",
    )
    module, datamodule = build_from_config(cfg)
    assert isinstance(module, VQVAEModule)
    trainer = build_trainer(cfg, limit_val_batches=2, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule)
    run = Path(cfg.run_dir)
    assert (run / "recon_epoch1.png").stat().st_size > 5_000
    assert (run / "codebook_usage.png").is_file()
    header = (run / "results.csv").read_text().splitlines()[0].split(",")
    for name in ("vq", "recon", "lpips", "perplexity", "usage", "psnr", "ssim"):
        assert f"train/{name}" in header and f"val/{name}" in header
    args = yaml.safe_load((run / "args.yaml").read_text())
    assert args["lpips_backbone"] == "random" and "RANDOM" in derived_values((run / "args.yaml").read_text())["lpips"]
    saved = torch.load(run / "weights" / "last.pt", map_location="cpu", weights_only=False)["model"]
    assert not any("lpips" in k for k in saved)
