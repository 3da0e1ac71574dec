"""debias as a drop-in for the loss of diffusers' train_text_to_image.py (``--snr_gamma 5``).

A tiny random ``UNet2DModel`` and a ``DDPMScheduler`` run one training step the way the
diffusers example writes it, and again through ``debias.add_noise`` / ``debias.fused_loss``;
the loss and every parameter gradient must agree. Nothing is downloaded.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import debias

diffusers = pytest.importorskip("diffusers")
DDPMScheduler, UNet2DModel = diffusers.DDPMScheduler, diffusers.UNet2DModel
compute_snr = pytest.importorskip("diffusers.training_utils").compute_snr

T = 1000
SNR_GAMMA = 5.0
BATCH, CHANNELS, SIZE = 5, 3, 8
PREDICTIONS = ("epsilon", "v_prediction")
# The two paths differ only in where the weight is computed (float64 snr here, float32 in
# diffusers) and in the rounding of the loss gradient: a few float32 ulps.
RTOL, ATOL = 1e-5, 1e-7


def make_unet() -> torch.nn.Module:
    """A float32 UNet2DModel small enough for a 2-core CPU, with seeded random weights."""
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=SIZE,
        in_channels=CHANNELS,
        out_channels=CHANNELS,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        attention_head_dim=8,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    )


def make_batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """latents, noise and timesteps as the example draws them; the batch always holds t=0 and
    t=T-1 so both branches of min(snr, gamma) are exercised."""
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(BATCH, CHANNELS, SIZE, SIZE, generator=gen)
    noise = torch.randn(latents.shape, generator=gen)
    timesteps = torch.randint(0, T, (BATCH,), generator=gen)
    timesteps[:2] = torch.tensor([0, T - 1])
    return latents, noise, timesteps


def diffusers_weights(noise_scheduler, timesteps, prediction_type: str) -> torch.Tensor:
    """mse_loss_weights exactly as train_text_to_image.py computes them."""
    snr = compute_snr(noise_scheduler, timesteps)
    stacked = torch.stack([snr, SNR_GAMMA * torch.ones_like(timesteps)], dim=1)
    mse_loss_weights = stacked.min(dim=1)[0]
    if prediction_type == "epsilon":
        mse_loss_weights = mse_loss_weights / snr
    elif prediction_type == "v_prediction":
        mse_loss_weights = mse_loss_weights / (snr + 1)
    return mse_loss_weights


def diffusers_step(unet, noise_scheduler, latents, noise, timesteps, prediction_type):
    """The example's training step; returns (noisy_latents, loss) after backward."""
    noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
    if prediction_type == "epsilon":
        target = noise
    else:
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    model_pred = unet(noisy_latents, timesteps).sample
    mse_loss_weights = diffusers_weights(noise_scheduler, timesteps, prediction_type)
    loss = F.mse_loss(model_pred.float(), target.float(), reduction="none")
    loss = loss.mean(dim=list(range(1, len(loss.shape)))) * mse_loss_weights
    loss = loss.mean()
    loss.backward()
    return noisy_latents, loss.detach()


def take_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return grads


def assert_grads_close(got: dict, want: dict, rtol: float = RTOL, atol: float = ATOL) -> None:
    """Every parameter gradient agrees; the message names the worst parameter."""
    assert got.keys() == want.keys()
    worst, worst_excess, report = None, 0.0, ""
    for name, w in want.items():
        g = got[name]
        err = (g - w).abs()
        excess = (err / (atol + rtol * w.abs())).max().item()
        if worst is None or excess > worst_excess:
            rel = (err / w.abs().clamp_min(1e-30)).max().item()
            worst, worst_excess = name, excess
            report = (
                f"max abs err {err.max().item():.3g}, max rel err {rel:.3g}, "
                f"|grad| max {w.abs().max().item():.3g}"
            )
    assert worst_excess <= 1.0, (
        f"gradients differ beyond rtol={rtol}, atol={atol}; worst parameter {worst!r}: {report} "
        f"({worst_excess:.3g}x the tolerance)"
    )


@pytest.mark.parametrize("source", ["config", "explicit"])
@pytest.mark.parametrize("prediction_type", PREDICTIONS)
def test_min_snr_step_matches_diffusers(prediction_type, source, backend):
    """debias.add_noise reproduces scheduler.add_noise bit for bit, and fused_loss(min_snr,
    gamma=5) gives the example's loss and every parameter gradient, with the prediction type
    read from the scheduler's config or passed explicitly (overriding a config that says
    otherwise)."""
    other = PREDICTIONS[1 - PREDICTIONS.index(prediction_type)]
    config_type = prediction_type if source == "config" else other
    noise_scheduler = DDPMScheduler(num_train_timesteps=T, prediction_type=config_type)
    unet = make_unet()
    latents, noise, timesteps = make_batch()

    noisy_latents, want_loss = diffusers_step(
        unet, noise_scheduler, latents, noise, timesteps, prediction_type
    )
    want_grads = take_grads(unet)

    noisy, returned = debias.add_noise(
        latents, timesteps, noise_scheduler, noise=noise, backend=backend
    )
    assert returned is noise
    assert torch.equal(noisy, noisy_latents), (
        f"add_noise differs from scheduler.add_noise: max abs err "
        f"{(noisy - noisy_latents).abs().max().item():.3g}"
    )
    model_pred = unet(noisy, timesteps).sample
    loss = debias.fused_loss(
        model_pred,
        noise,
        timesteps,
        noise_scheduler,
        weighting="min_snr",
        prediction=None if source == "config" else prediction_type,
        x0=latents,
        backend=backend,
        gamma=SNR_GAMMA,
    )
    loss.backward()

    assert loss.dtype == torch.float32 and loss.dim() == 0
    torch.testing.assert_close(loss.detach(), want_loss, rtol=RTOL, atol=ATOL)
    assert_grads_close(take_grads(unet), want_grads)


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
def test_philox_noise_matches_tensor_path(prediction_type, backend):
    """Deleting the randn_like line (noise=None, noise drawn in the kernel) trains on the same
    objective as passing that noise as a tensor: loss and gradients agree with the tensor path
    fed ``noise.materialize()``."""
    noise_scheduler = DDPMScheduler(num_train_timesteps=T, prediction_type=prediction_type)
    unet = make_unet()
    latents, _, timesteps = make_batch()
    kwargs = dict(weighting="min_snr", x0=latents, backend=backend, gamma=SNR_GAMMA)

    gen = torch.Generator().manual_seed(2)
    noisy, noise = debias.add_noise(
        latents, timesteps, noise_scheduler, generator=gen, backend=backend
    )
    assert isinstance(noise, debias.PhiloxNoise)
    loss = debias.fused_loss(
        unet(noisy, timesteps).sample, noise, timesteps, noise_scheduler, **kwargs
    )
    loss.backward()
    philox_grads = take_grads(unet)

    tensor_noise = noise.materialize()
    assert tensor_noise.shape == latents.shape and tensor_noise.dtype == latents.dtype
    assert 0.5 < tensor_noise.std().item() < 1.5
    noisy_t, _ = debias.add_noise(
        latents, timesteps, noise_scheduler, noise=tensor_noise, backend=backend
    )
    torch.testing.assert_close(noisy, noisy_t, rtol=RTOL, atol=1e-6)
    loss_t = debias.fused_loss(
        unet(noisy_t, timesteps).sample, tensor_noise, timesteps, noise_scheduler, **kwargs
    )
    loss_t.backward()

    torch.testing.assert_close(loss.detach(), loss_t.detach(), rtol=RTOL, atol=ATOL)
    assert_grads_close(philox_grads, take_grads(unet))


def test_zero_terminal_snr_debias_weighting(backend):
    """On a zero-terminal-SNR scheduler, "debias" with epsilon refuses (naming max_weight)
    rather than return inf, runs when capped, and v_prediction needs no cap."""
    noise_scheduler = DDPMScheduler(num_train_timesteps=T, rescale_betas_zero_snr=True)
    assert noise_scheduler.alphas_cumprod[-1] == 0
    unet = make_unet()
    latents, noise, timesteps = make_batch()  # holds t = T-1, where snr = 0
    noisy, _ = debias.add_noise(latents, timesteps, noise_scheduler, noise=noise, backend=backend)
    model_pred = unet(noisy, timesteps).sample

    with pytest.raises(ValueError, match="max_weight"):
        debias.fused_loss(model_pred, noise, timesteps, noise_scheduler, "debias", backend=backend)

    capped = debias.fused_loss(
        model_pred, noise, timesteps, noise_scheduler, "debias", backend=backend, max_weight=1e3
    )
    capped.backward(retain_graph=True)
    assert torch.isfinite(capped)
    # The cap is the weight at t = T-1 (sample 1): 1e3 times the plain MSE there.
    per_sample = debias.fused_loss(
        model_pred.detach(), noise, timesteps, noise_scheduler, "debias", "epsilon",
        reduction="none", backend=backend, max_weight=1e3,
    )  # fmt: skip
    mse = F.mse_loss(model_pred.detach(), noise, reduction="none").mean(dim=(1, 2, 3))
    torch.testing.assert_close(per_sample[1], 1e3 * mse[1], rtol=RTOL, atol=0)
    assert all(torch.isfinite(p.grad).all() for p in unet.parameters())
    unet.zero_grad(set_to_none=True)

    v_loss = debias.fused_loss(
        model_pred,
        noise,
        timesteps,
        noise_scheduler,
        "debias",
        prediction="v_prediction",
        x0=latents,
        backend=backend,
        reduction="none",
    )
    assert torch.isfinite(v_loss).all()
    # At snr = 0 the v-space weight sqrt(snr)/(snr+1) is 0: the sample at t = T-1 adds nothing.
    assert v_loss[1] == 0
    v_loss.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in unet.parameters())


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
def test_loss_weight_matches_diffusers(prediction_type):
    """debias.loss_weight(t, scheduler, "min_snr", gamma=5) is the example's mse_loss_weights,
    for every timestep."""
    noise_scheduler = DDPMScheduler(num_train_timesteps=T, prediction_type=prediction_type)
    timesteps = torch.arange(T)
    got = debias.loss_weight(timesteps, noise_scheduler, "min_snr", gamma=SNR_GAMMA)
    want = diffusers_weights(noise_scheduler, timesteps, prediction_type)
    assert got.dtype == torch.float32 and got.shape == (T,)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


# ---- on a GPU -----------------------------------------------------------------------------

CUDA = torch.device("cuda")
# The two steps run the same UNet in fp32 (no TF32) with deterministic cuDNN kernels, so they
# differ only in the loss side; the looser bounds cover reductions summed in another order on
# the GPU, carried through the network's backward.
RTOL_CUDA, ATOL_CUDA = 1e-4, 1e-6


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("grad_in_forward", [True, False], ids=["kept", "recomputed"])
@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("gpu_backend", ["triton", "cuda"])
def test_min_snr_step_matches_diffusers_on_cuda(
    gpu_backend, prediction_type, grad_in_forward, monkeypatch
):
    """The drop-in on CUDA tensors, for each GPU backend in both gradient designs
    (GRAD_IN_FORWARD): the example's step and debias' give the same noisy latents, loss and
    parameter gradients."""
    if gpu_backend not in debias.ops._backend.available(CUDA):
        pytest.skip(f"backend {gpu_backend!r} is not built or cannot run on cuda here")
    monkeypatch.setitem(debias.ops.noise_loss.GRAD_IN_FORWARD, gpu_backend, grad_in_forward)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    noise_scheduler = DDPMScheduler(num_train_timesteps=T, prediction_type=prediction_type)
    unet = make_unet().to(CUDA)
    latents, noise, timesteps = (x.to(CUDA) for x in make_batch())

    noisy_latents, want_loss = diffusers_step(
        unet, noise_scheduler, latents, noise, timesteps, prediction_type
    )
    want_grads = take_grads(unet)

    noisy, returned = debias.add_noise(
        latents, timesteps, noise_scheduler, noise=noise, backend=gpu_backend
    )
    assert returned is noise
    torch.testing.assert_close(noisy, noisy_latents, rtol=1e-6, atol=1e-6)
    loss = debias.fused_loss(
        unet(noisy, timesteps).sample,
        noise,
        timesteps,
        noise_scheduler,
        weighting="min_snr",
        x0=latents,
        backend=gpu_backend,
        gamma=SNR_GAMMA,
    )
    loss.backward()

    assert loss.dtype == torch.float32 and loss.dim() == 0 and loss.device.type == "cuda"
    torch.testing.assert_close(loss.detach(), want_loss, rtol=RTOL_CUDA, atol=ATOL_CUDA)
    assert_grads_close(take_grads(unet), want_grads, rtol=RTOL_CUDA, atol=ATOL_CUDA)
