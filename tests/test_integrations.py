"""debias as a drop-in for the loss side of existing trainers.

Each test writes a trainer's lines out and runs one training step of a tiny random network
through them, and again through ``debias.add_noise`` / ``debias.fused_loss``; x_t, the loss
and every parameter gradient must agree. The trainers: diffusers' train_text_to_image.py
(``--snr_gamma 5``, DDPM, a ``UNet2DModel``); the Flux and SD3 DreamBooth LoRA scripts (flow
matching, every ``--weighting_scheme``, prior preservation; ``FluxTransformer2DModel`` and
``SD3Transformer2DModel``); the SDXL DreamBooth LoRA script's ``--do_edm_style_training`` (EDM
and Euler schedulers); and the weightings of kohya-ss/sd-scripts. Nothing is downloaded.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import DTYPE_IDS, DTYPES, get_sigmas

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


def assert_grads_close(
    got: dict, want: dict, rtol: float = RTOL, atol: float = ATOL, atol_of_max: float = 0.0
) -> None:
    """Every parameter gradient agrees; the message names the worst parameter.
    ``atol_of_max`` adds that fraction of the parameter's largest gradient to ``atol``: an entry
    that is a sum of large terms cancelling carries their rounding, not its own."""
    assert got.keys() == want.keys()
    worst, worst_excess, report = None, 0.0, ""
    for name, w in want.items():
        g = got[name]
        err = (g - w).abs()
        tol = atol + atol_of_max * w.abs().max() + rtol * w.abs()
        excess = (err / tol).max().item()
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
        model_pred.detach(),
        noise,
        timesteps,
        noise_scheduler,
        "debias",
        "epsilon",
        reduction="none",
        backend=backend,
        max_weight=1e3,
    )
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


# ---- flow matching: train_dreambooth_lora_flux.py and train_dreambooth_lora_sd3.py ---------
#
# The two scripts share their loss side: u from compute_density_for_timestep_sampling,
# timesteps = scheduler.timesteps[(u * T).long()], sigmas looked up by get_sigmas,
# x_t = (1 - sigma) x0 + sigma noise, target noise - x0, weighting from
# compute_loss_weighting_for_sd3. They differ in the network call: Flux packs 2x2 latent patches
# into tokens and is given timesteps / 1000. Both transformers are built tiny (one block, 8-wide
# heads, 12-20k parameters): a forward and backward pass takes milliseconds on the CPU, so the
# tests run the real architectures rather than a stand-in.

FlowMatchEulerDiscreteScheduler = diffusers.FlowMatchEulerDiscreteScheduler
SD3Transformer2DModel = diffusers.SD3Transformer2DModel
FluxTransformer2DModel = diffusers.FluxTransformer2DModel
training_utils = pytest.importorskip("diffusers.training_utils")
compute_density_for_timestep_sampling = training_utils.compute_density_for_timestep_sampling
compute_loss_weighting_for_sd3 = training_utils.compute_loss_weighting_for_sd3

WEIGHTING_SCHEMES = ("sigma_sqrt", "logit_normal", "mode", "cosmap", "none")
SHIFTS = (1.0, 3.0)  # the scheduler's default and SD3's
SCRIPTS = ("flux", "sd3")
DENSITY = {"logit_mean": 0.0, "logit_std": 1.0, "mode_scale": 1.29}  # the scripts' defaults
PRIOR_LOSS_WEIGHT = 0.75
FLOW_BATCH, LATENT_CHANNELS, TEXT_LEN, TEXT_DIM = 6, 4, 3, 16
# sigma_sqrt weights the smallest sigma by up to 1e6 (shift 1): gradients of ~1e3 whose small
# entries are sums that cancel, so their rounding is measured against the parameter's largest.
ATOL_OF_MAX = 1e-6
FLOW_CASES = [
    pytest.param(script, scheme, shift, id=f"{script}-{scheme}-shift{shift:g}")
    for script in SCRIPTS
    for scheme in WEIGHTING_SCHEMES
    for shift in SHIFTS
]


def script_timesteps(noise_scheduler_copy, weighting_scheme, bsz, generator=None, **density):
    """The scripts' timestep sampling; they draw from the global generator (generator=None)."""
    u = compute_density_for_timestep_sampling(
        weighting_scheme=weighting_scheme,
        batch_size=bsz,
        generator=generator,
        **(DENSITY | density),
    )
    indices = (u * noise_scheduler_copy.config.num_train_timesteps).long()
    return noise_scheduler_copy.timesteps[indices]


def make_transformer(script: str) -> torch.nn.Module:
    """A one-block SD3Transformer2DModel or FluxTransformer2DModel with seeded random weights."""
    torch.manual_seed(0)
    if script == "sd3":
        return SD3Transformer2DModel(
            sample_size=SIZE,
            patch_size=2,
            in_channels=LATENT_CHANNELS,
            out_channels=LATENT_CHANNELS,
            num_layers=1,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=TEXT_DIM,
            caption_projection_dim=16,
            pooled_projection_dim=TEXT_DIM,
            pos_embed_max_size=SIZE,
        )
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * LATENT_CHANNELS,  # 2x2 packed latents
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=TEXT_DIM,
        pooled_projection_dim=TEXT_DIM,
        axes_dims_rope=(2, 2, 4),
    )


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """FluxPipeline._pack_latents: [B, C, H, W] as [B, H/2 * W/2, 4C] tokens of 2x2 patches."""
    b, c, h, w = latents.shape
    latents = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return latents.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """FluxPipeline._unpack_latents, the inverse of pack_latents."""
    b, _, c4 = tokens.shape
    tokens = tokens.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return tokens.reshape(b, c4 // 4, h, w)


def latent_image_ids(h: int, w: int) -> torch.Tensor:
    """FluxPipeline._prepare_latent_image_ids: (0, row, column) of each packed token."""
    ids = torch.zeros(h, w, 3)
    ids[..., 1] += torch.arange(h)[:, None]
    ids[..., 2] += torch.arange(w)[None, :]
    return ids.reshape(h * w, 3)


def flow_model_pred(script, transformer, noisy_model_input, timesteps, cond):
    """The scripts' forward pass (SD3: latents and timesteps as they are; Flux: packed tokens,
    timesteps / 1000, the prediction unpacked)."""
    prompt_embeds, pooled_prompt_embeds = cond
    if script == "sd3":
        return transformer(
            hidden_states=noisy_model_input,
            timestep=timesteps,
            encoder_hidden_states=prompt_embeds,
            pooled_projections=pooled_prompt_embeds,
            return_dict=False,
        )[0]
    h, w = noisy_model_input.shape[2:]
    model_pred = transformer(
        hidden_states=pack_latents(noisy_model_input),
        timestep=timesteps / 1000,
        guidance=None,
        pooled_projections=pooled_prompt_embeds,
        encoder_hidden_states=prompt_embeds,
        txt_ids=torch.zeros(prompt_embeds.shape[1], 3),
        img_ids=latent_image_ids(h // 2, w // 2),
        return_dict=False,
    )[0]
    return unpack_latents(model_pred, h, w)


def make_flow_batch(noise_scheduler, weighting_scheme, seed: int = 1):
    """latents, noise, timesteps (sampled as the scripts do) and text conditioning. The first
    and last samples get the ends of the table, sigma = 1 (x_t = noise) and the smallest sigma
    (sigma_sqrt's largest weight), one in each half of a prior-preservation batch."""
    gen = torch.Generator().manual_seed(seed)
    model_input = torch.randn(FLOW_BATCH, LATENT_CHANNELS, SIZE, SIZE, generator=gen)
    noise = torch.randn(model_input.shape, generator=gen)
    timesteps = script_timesteps(noise_scheduler, weighting_scheme, FLOW_BATCH, gen)
    timesteps[[0, -1]] = noise_scheduler.timesteps[[0, -1]]
    prompt_embeds = torch.randn(FLOW_BATCH, TEXT_LEN, TEXT_DIM, generator=gen)
    pooled_prompt_embeds = torch.randn(FLOW_BATCH, TEXT_DIM, generator=gen)
    return model_input, noise, timesteps, (prompt_embeds, pooled_prompt_embeds)


def flow_script_step(
    script,
    transformer,
    noise_scheduler_copy,
    model_input,
    noise,
    timesteps,
    cond,
    weighting_scheme,
    with_prior_preservation=False,
    precondition_outputs=False,
):
    """The scripts' training step from the timesteps on; (noisy_model_input, loss) after
    backward. With prior preservation the batch is instance images then class images;
    precondition_outputs is the SD3 script's option."""
    sigmas = get_sigmas(noise_scheduler_copy, timesteps, model_input.ndim, model_input.dtype)
    noisy_model_input = (1.0 - sigmas) * model_input + sigmas * noise
    model_pred = flow_model_pred(script, transformer, noisy_model_input, timesteps, cond)
    if precondition_outputs:
        model_pred = model_pred * (-sigmas) + noisy_model_input
    weighting = compute_loss_weighting_for_sd3(weighting_scheme=weighting_scheme, sigmas=sigmas)
    if precondition_outputs:
        target = model_input
    else:
        target = noise - model_input
    if with_prior_preservation:
        model_pred, model_pred_prior = torch.chunk(model_pred, 2, dim=0)
        target, target_prior = torch.chunk(target, 2, dim=0)
        weighting, weighting_prior = torch.chunk(weighting, 2, dim=0)
        prior_loss = torch.mean(
            (
                weighting_prior.float() * (model_pred_prior.float() - target_prior.float()) ** 2
            ).reshape(target_prior.shape[0], -1),
            1,
        )
        prior_loss = prior_loss.mean()
    loss = torch.mean(
        (weighting.float() * (model_pred.float() - target.float()) ** 2).reshape(
            target.shape[0], -1
        ),
        1,
    )
    loss = loss.mean()
    if with_prior_preservation:
        loss = loss + PRIOR_LOSS_WEIGHT * prior_loss
    loss.backward()
    return noisy_model_input, loss.detach()


def assert_same_noising(got: torch.Tensor, want: torch.Tensor, trainer_line: str) -> None:
    assert got.dtype == want.dtype and torch.equal(got, want), (
        f"add_noise differs from {trainer_line}: max abs err {(got - want).abs().max().item():.3g}"
    )


@pytest.mark.parametrize("weighting_scheme", WEIGHTING_SCHEMES)
@pytest.mark.parametrize("shift", SHIFTS, ids=lambda s: f"shift{s:g}")
def test_flow_timestep_sampling_matches_diffusers(shift, weighting_scheme):
    """debias.sample_timesteps draws the scripts' timesteps: the same values from the same
    generator, whether it is passed or the global one (as in the scripts), and leaves the
    generator where the scripts leave it; also with other logit_normal / mode parameters."""
    noise_scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=T, shift=shift)
    scheme = weighting_scheme
    n = 4096
    for density in ({}, {"logit_mean": -0.5, "logit_std": 1.5, "mode_scale": 0.8}):
        gen_want, gen_got = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
        want = script_timesteps(noise_scheduler, weighting_scheme, n, gen_want, **density)
        got = debias.sample_timesteps(
            n, noise_scheduler, scheme, generator=gen_got, **(DENSITY | density)
        )
        assert got.dtype == want.dtype and torch.equal(got, want), f"{density}"
        assert torch.equal(gen_got.get_state(), gen_want.get_state())

    torch.manual_seed(4)
    want = script_timesteps(noise_scheduler, weighting_scheme, FLOW_BATCH)
    torch.manual_seed(4)
    got = debias.sample_timesteps(FLOW_BATCH, noise_scheduler, scheme)
    assert torch.equal(got, want)


@pytest.mark.parametrize("weighting_scheme", WEIGHTING_SCHEMES)
@pytest.mark.parametrize("shift", SHIFTS, ids=lambda s: f"shift{s:g}")
def test_flow_loss_weight_matches_diffusers(shift, weighting_scheme):
    """debias.loss_weight(timesteps, scheduler, scheme) is compute_loss_weighting_for_sd3 on the
    scripts' sigmas, at every timestep of the table (also with NoiseSchedule.flow_matching)."""
    noise_scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=T, shift=shift)
    timesteps = noise_scheduler.timesteps
    want = compute_loss_weighting_for_sd3(
        weighting_scheme, get_sigmas(noise_scheduler, timesteps, 1)
    )
    for schedule in (noise_scheduler, debias.NoiseSchedule.flow_matching(T, shift=shift)):
        got = debias.loss_weight(timesteps, schedule, weighting_scheme)
        assert got.dtype == torch.float32 and got.shape == (T,)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("scheduler", ["flow-shift1", "flow-shift3", "edm"])
def test_noising_matches_diffusers_at_every_timestep(scheduler, dtype, backend):
    """debias.add_noise is the scripts' noising bit for bit at every timestep of the table, in
    the latents' dtype as the scripts compute it (mixed precision casts model_input to bf16/fp16):
    (1 - sigmas) * x0 + sigmas * noise with sigmas in that dtype (flow), and
    EDMEulerScheduler.add_noise (x0 + sigma noise); given the diffusers scheduler or debias'
    own constructor of the same schedule."""
    if scheduler == "edm":
        noise_scheduler = EDMEulerScheduler(num_train_timesteps=T)
        own = debias.NoiseSchedule.edm(T)
    else:
        shift = float(scheduler[-1])
        noise_scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=T, shift=shift)
        own = debias.NoiseSchedule.flow_matching(T, shift=shift)
    # Triton's interpreter runs a program per sample at a few ms each: every 25th level there.
    step = 25 if backend == "triton" else 1
    timesteps = noise_scheduler.timesteps[:T:step]
    gen = torch.Generator().manual_seed(6)
    model_input = torch.randn(len(timesteps), 3, 5, generator=gen).to(dtype)
    noise = torch.randn(len(timesteps), 3, 5, generator=gen).to(dtype)
    if scheduler == "edm":
        want = noise_scheduler.add_noise(model_input, noise, timesteps)
    else:
        sigmas = get_sigmas(noise_scheduler, timesteps, model_input.ndim, model_input.dtype)
        want = (1.0 - sigmas) * model_input + sigmas * noise
    for schedule in (noise_scheduler, own):
        got, _ = debias.add_noise(model_input, timesteps, schedule, noise=noise, backend=backend)
        assert_same_noising(got, want, "the scripts' noising")


@pytest.mark.parametrize("script, weighting_scheme, shift", FLOW_CASES)
def test_flow_step_matches_diffusers(script, weighting_scheme, shift, backend):
    """The Flux and SD3 DreamBooth step: debias.add_noise gives the scripts' noisy_model_input
    bit for bit, and fused_loss(weighting=weighting_scheme) (prediction "flow", the default of a
    flow-matching scheduler) gives their loss and every transformer gradient."""
    noise_scheduler_copy = FlowMatchEulerDiscreteScheduler(num_train_timesteps=T, shift=shift)
    transformer = make_transformer(script)
    model_input, noise, timesteps, cond = make_flow_batch(noise_scheduler_copy, weighting_scheme)

    noisy_model_input, want_loss = flow_script_step(
        script,
        transformer,
        noise_scheduler_copy,
        model_input,
        noise,
        timesteps,
        cond,
        weighting_scheme,
    )
    want_grads = take_grads(transformer)

    noisy, returned = debias.add_noise(
        model_input, timesteps, noise_scheduler_copy, noise=noise, backend=backend
    )
    assert returned is noise
    assert_same_noising(noisy, noisy_model_input, "(1 - sigmas) * model_input + sigmas * noise")
    model_pred = flow_model_pred(script, transformer, noisy, timesteps, cond)
    loss = debias.fused_loss(
        model_pred,
        noise,
        timesteps,
        noise_scheduler_copy,
        weighting=weighting_scheme,
        x0=model_input,
        backend=backend,
    )
    loss.backward()

    assert loss.dtype == torch.float32 and loss.dim() == 0
    torch.testing.assert_close(loss.detach(), want_loss, rtol=RTOL, atol=ATOL)
    assert_grads_close(take_grads(transformer), want_grads, atol_of_max=ATOL_OF_MAX)


@pytest.mark.parametrize(
    "script, weighting_scheme",
    [pytest.param(s, w, id=f"{s}-{w}") for s in SCRIPTS for w in ("sigma_sqrt", "logit_normal")],
)
def test_flow_prior_preservation_matches_diffusers(script, weighting_scheme, backend):
    """--with_prior_preservation: the scripts chunk the batch into instance and class halves and
    add prior_loss_weight times the class half's loss. One fused_loss(reduction="none") and the
    same split give the loss and the gradients."""
    noise_scheduler_copy = FlowMatchEulerDiscreteScheduler(num_train_timesteps=T, shift=3.0)
    transformer = make_transformer(script)
    model_input, noise, timesteps, cond = make_flow_batch(noise_scheduler_copy, weighting_scheme)

    _, want_loss = flow_script_step(
        script,
        transformer,
        noise_scheduler_copy,
        model_input,
        noise,
        timesteps,
        cond,
        weighting_scheme,
        with_prior_preservation=True,
    )
    want_grads = take_grads(transformer)

    noisy, _ = debias.add_noise(
        model_input, timesteps, noise_scheduler_copy, noise=noise, backend=backend
    )
    model_pred = flow_model_pred(script, transformer, noisy, timesteps, cond)
    per_sample = debias.fused_loss(
        model_pred,
        noise,
        timesteps,
        noise_scheduler_copy,
        weighting=weighting_scheme,
        x0=model_input,
        reduction="none",
        backend=backend,
    )
    assert per_sample.shape == (FLOW_BATCH,)
    instance_loss, prior_loss = per_sample.chunk(2)
    loss = instance_loss.mean() + PRIOR_LOSS_WEIGHT * prior_loss.mean()
    loss.backward()

    torch.testing.assert_close(loss.detach(), want_loss, rtol=RTOL, atol=ATOL)
    assert_grads_close(take_grads(transformer), want_grads, atol_of_max=ATOL_OF_MAX)


def sd3_precondition_case(shift, weighting_scheme, backend):
    """train_dreambooth_lora_sd3.py --precondition_outputs 1 on a small SD3 transformer: the
    script's loss and parameter gradients, then debias's x_t (same noise) and the
    transformer's output F on it, for the test to take the loss of. Returns (scheduler,
    transformer, model_input, noise, timesteps, x_t, F, the script's loss, its gradients)."""
    noise_scheduler_copy = FlowMatchEulerDiscreteScheduler(num_train_timesteps=T, shift=shift)
    transformer = make_transformer("sd3")
    model_input, noise, timesteps, cond = make_flow_batch(noise_scheduler_copy, weighting_scheme)
    _, want_loss = flow_script_step(
        "sd3",
        transformer,
        noise_scheduler_copy,
        model_input,
        noise,
        timesteps,
        cond,
        weighting_scheme,
        precondition_outputs=True,
    )
    want_grads = take_grads(transformer)
    noisy, _ = debias.add_noise(
        model_input, timesteps, noise_scheduler_copy, noise=noise, backend=backend
    )
    model_pred = flow_model_pred("sd3", transformer, noisy, timesteps, cond)
    return (
        noise_scheduler_copy, transformer, model_input, noise, timesteps, noisy, model_pred,
        want_loss, want_grads,
    )  # fmt: skip


@pytest.mark.parametrize("output", ["denoised", "raw"])
@pytest.mark.parametrize("shift", SHIFTS, ids=lambda s: f"shift{s:g}")
def test_sd3_precondition_outputs_matches_diffusers(shift, output, backend):
    """train_dreambooth_lora_sd3.py --precondition_outputs --weighting_scheme sigma_sqrt: the
    script's D = x_t - sigma F against x0, weighted sigma^-2. As x0 - D = sigma (F - (noise -
    x0)), that is the unweighted flow loss: fused_loss(weighting="none") on D with
    prediction="sample" ("none" is weight 1 in flow space, sigma^-2 in x0 space), or on the
    transformer's output F with the flow prediction."""
    case = sd3_precondition_case(shift, "sigma_sqrt", backend)
    noise_scheduler_copy, transformer, model_input, noise, timesteps, noisy = case[:6]
    model_pred, want_loss, want_grads = case[6:]
    prediction = "flow"
    if output == "denoised":
        sigmas = get_sigmas(noise_scheduler_copy, timesteps, model_input.ndim, model_input.dtype)
        model_pred, prediction = model_pred * (-sigmas) + noisy, "sample"
    loss = debias.fused_loss(
        model_pred,
        noise,
        timesteps,
        noise_scheduler_copy,
        weighting="none",
        prediction=prediction,
        x0=model_input,
        backend=backend,
    )
    loss.backward()

    # On F debias never forms D; the script rounds D = x_t - sigma F before subtracting x0,
    # which at the smallest sigma (0.001 at shift 1) keeps ~14 of the 24 bits of D - x0, and
    # sigma_sqrt weights that sample by 1e6: the two differ by the script's rounding there.
    rtol, of_max = (RTOL, ATOL_OF_MAX) if output == "denoised" else (1e-4, 1e-4)
    torch.testing.assert_close(loss.detach(), want_loss, rtol=rtol, atol=ATOL)
    assert_grads_close(take_grads(transformer), want_grads, rtol=rtol, atol_of_max=of_max)


@pytest.mark.parametrize("weighting_scheme", ["logit_normal", "cosmap"])
@pytest.mark.parametrize("shift", SHIFTS, ids=lambda s: f"shift{s:g}")
def test_sd3_default_precondition_through_the_low_level_call(shift, weighting_scheme, backend):
    """train_dreambooth_lora_sd3.py at its default --precondition_outputs 1 with a weighting
    other than sigma_sqrt: weighting ||D - x0||^2 with D = x_t - sigma F, which is
    sigma^2 weighting ||F - (noise - x0)||^2 on the transformer's output: one affine_loss call
    with w = sigma^2 weighting, p = 1, q = -1 (README, "Drop-in for Flux / SD3")."""
    case = sd3_precondition_case(shift, weighting_scheme, backend)
    noise_scheduler_copy, transformer, model_input, noise, timesteps, _ = case[:6]
    model_pred, want_loss, want_grads = case[6:]
    sigmas = get_sigmas(noise_scheduler_copy, timesteps, 1, torch.float32)
    w = sigmas**2 * compute_loss_weighting_for_sd3(weighting_scheme, sigmas)
    one = torch.ones_like(sigmas)
    loss = debias.affine_loss(model_pred, noise, w, one, -one, model_input, backend=backend)
    loss.backward()
    torch.testing.assert_close(loss.detach(), want_loss, rtol=RTOL, atol=ATOL)
    assert_grads_close(take_grads(transformer), want_grads, atol_of_max=ATOL_OF_MAX)


# ---- EDM-style training: train_dreambooth_lora_sdxl.py --do_edm_style_training ------------
#
# Two schedulers take this path. An EDMEulerScheduler (an EDM checkpoint): x_t = x0 + sigma
# noise, Karras' preconditioning through precondition_inputs/outputs, and the plain MSE of the
# denoised D against x0. An EulerDiscreteScheduler (SDXL's own): the same x_t, inputs divided
# by sqrt(sigma^2 + 1), D built from the epsilon or v output, and the MSE weighted by sigma^-2,
# which is the constant epsilon-space weighting on an x0 target (||D - x0||^2 =
# sigma^2 ||eps - eps_hat||^2). The UNet is the small UNet2DModel of the tests above; the
# script's UNet2DConditionModel adds text conditioning, which the loss side never sees.

EDMEulerScheduler = diffusers.EDMEulerScheduler
EulerDiscreteScheduler = diffusers.EulerDiscreteScheduler


def unweighted_x0(snr: torch.Tensor) -> torch.Tensor:
    """Epsilon-space weight 1/snr: weight 1 on the x0 (D) loss, as ||x0 - D||^2 = ||eps -
    eps_hat||^2 / snr; on an EDM schedule 1/snr = sigma^2."""
    return 1.0 / snr


def sdxl_euler_scheduler(prediction_type: str):
    """stabilityai/stable-diffusion-xl-base-1.0's scheduler/scheduler_config.json."""
    return EulerDiscreteScheduler(
        num_train_timesteps=T,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type=prediction_type,
        timestep_spacing="leading",
        steps_offset=1,
    )


def make_edm_batch(noise_scheduler, seed: int = 1):
    """latents, noise and timesteps as the script draws them (indices into
    scheduler.timesteps), with the first and last index in the batch."""
    gen = torch.Generator().manual_seed(seed)
    model_input = torch.randn(BATCH, CHANNELS, SIZE, SIZE, generator=gen)
    noise = torch.randn(model_input.shape, generator=gen)
    indices = torch.randint(0, noise_scheduler.config.num_train_timesteps, (BATCH,), generator=gen)
    indices[:2] = torch.tensor([0, T - 1])
    timesteps = noise_scheduler.timesteps[indices]
    return model_input, noise, timesteps


def sdxl_edm_inputs(noise_scheduler, noisy_model_input, timesteps):
    """The script's sigmas and preconditioned UNet input."""
    sigmas = get_sigmas(
        noise_scheduler, timesteps, len(noisy_model_input.shape), noisy_model_input.dtype
    )
    if isinstance(noise_scheduler, EDMEulerScheduler):
        inp_noisy_latents = noise_scheduler.precondition_inputs(noisy_model_input, sigmas)
    else:
        inp_noisy_latents = noisy_model_input / ((sigmas**2 + 1) ** 0.5)
    return sigmas, inp_noisy_latents


def sdxl_edm_denoised(noise_scheduler, noisy_model_input, model_pred, sigmas):
    """The script's output preconditioning: D from the UNet's output."""
    if isinstance(noise_scheduler, EDMEulerScheduler):
        return noise_scheduler.precondition_outputs(noisy_model_input, model_pred, sigmas)
    if noise_scheduler.config.prediction_type == "epsilon":
        return model_pred * (-sigmas) + noisy_model_input
    return model_pred * (-sigmas / (sigmas**2 + 1) ** 0.5) + (noisy_model_input / (sigmas**2 + 1))


def sdxl_edm_step(unet, noise_scheduler, model_input, noise, timesteps):
    """The script's step with --do_edm_style_training (no --snr_gamma, no prior preservation);
    (noisy_model_input, loss) after backward."""
    noisy_model_input = noise_scheduler.add_noise(model_input, noise, timesteps)
    sigmas, inp_noisy_latents = sdxl_edm_inputs(noise_scheduler, noisy_model_input, timesteps)
    model_pred = unet(inp_noisy_latents, timesteps).sample
    weighting = None
    model_pred = sdxl_edm_denoised(noise_scheduler, noisy_model_input, model_pred, sigmas)
    if not isinstance(noise_scheduler, EDMEulerScheduler):
        weighting = (sigmas**-2.0).float()
    target = model_input
    if weighting is not None:
        loss = torch.mean(
            (weighting.float() * (model_pred.float() - target.float()) ** 2).reshape(
                target.shape[0], -1
            ),
            1,
        )
        loss = loss.mean()
    else:
        loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
    loss.backward()
    return noisy_model_input, loss.detach()


@pytest.mark.parametrize("output", ["denoised", "raw"])
@pytest.mark.parametrize("prediction_type", PREDICTIONS)
def test_sdxl_edm_step_matches_diffusers(prediction_type, output, backend):
    """EDMEulerScheduler: debias.add_noise is scheduler.add_noise (x0 + sigma noise) bit for
    bit, and the unweighted MSE of D against x0 is fused_loss with an epsilon-space weight of
    1/snr (= sigma^2, weight 1 in x0 space): on D after precondition_outputs with
    prediction="sample", or on the UNet's raw output F with prediction="raw" (debias builds F's
    target from c_skip and c_out)."""
    noise_scheduler = EDMEulerScheduler(num_train_timesteps=T, prediction_type=prediction_type)
    unet = make_unet()
    model_input, noise, timesteps = make_edm_batch(noise_scheduler)

    noisy_model_input, want_loss = sdxl_edm_step(
        unet, noise_scheduler, model_input, noise, timesteps
    )
    want_grads = take_grads(unet)

    noisy, _ = debias.add_noise(
        model_input, timesteps, noise_scheduler, noise=noise, backend=backend
    )
    assert_same_noising(noisy, noisy_model_input, "EDMEulerScheduler.add_noise")
    sigmas, inp_noisy_latents = sdxl_edm_inputs(noise_scheduler, noisy, timesteps)
    model_pred = unet(inp_noisy_latents, timesteps).sample
    if output == "denoised":
        model_pred = noise_scheduler.precondition_outputs(noisy, model_pred, sigmas)
    loss = debias.fused_loss(
        model_pred,
        noise,
        timesteps,
        noise_scheduler,
        weighting=unweighted_x0,
        prediction="sample" if output == "denoised" else "raw",
        x0=model_input,
        backend=backend,
    )
    loss.backward()

    torch.testing.assert_close(loss.detach(), want_loss, rtol=RTOL, atol=ATOL)
    assert_grads_close(take_grads(unet), want_grads)


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
def test_sdxl_edm_style_euler_step_matches_diffusers(prediction_type, backend):
    """EulerDiscreteScheduler (SDXL's) with --do_edm_style_training: the script's D
    (model_pred * (-sigmas) + noisy_model_input for epsilon, the v form for v_prediction)
    against x0 weighted by sigmas**-2 is fused_loss(D, ..., weighting="constant",
    prediction="sample"): the constant epsilon-space weighting, whose x0-space weight is
    snr = sigma^-2. The scheduler is a DDPM-type one to debias (its alphas_cumprod), so the
    timesteps go in as the integers they are."""
    noise_scheduler = sdxl_euler_scheduler(prediction_type)
    unet = make_unet()
    model_input, noise, timesteps = make_edm_batch(noise_scheduler)

    _, want_loss = sdxl_edm_step(unet, noise_scheduler, model_input, noise, timesteps)
    want_grads = take_grads(unet)

    noisy_model_input = noise_scheduler.add_noise(model_input, noise, timesteps)
    sigmas, inp_noisy_latents = sdxl_edm_inputs(noise_scheduler, noisy_model_input, timesteps)
    model_pred = unet(inp_noisy_latents, timesteps).sample
    model_pred = sdxl_edm_denoised(noise_scheduler, noisy_model_input, model_pred, sigmas)
    loss = debias.fused_loss(
        model_pred,
        noise,
        timesteps.long(),
        noise_scheduler,
        weighting="constant",
        prediction="sample",
        x0=model_input,
        backend=backend,
    )
    loss.backward()

    torch.testing.assert_close(loss.detach(), want_loss, rtol=RTOL, atol=ATOL)
    assert_grads_close(take_grads(unet), want_grads)


# ---- debias.reference is the trainers' code ------------------------------------------------
#
# reference.py is the oracle of tests/test_noise_loss.py; here it meets the diffusers functions
# and script lines it is written after, bit for bit.


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("prediction_type", PREDICTIONS)
def test_reference_ddpm_is_diffusers(prediction_type, dtype):
    """reference.add_noise and get_velocity are DDPMScheduler's; reference.noise_loss is
    train_text_to_image.py's loss lines with its mse_loss_weights."""
    noise_scheduler = DDPMScheduler(num_train_timesteps=T, prediction_type=prediction_type)
    latents, noise, timesteps = make_batch()
    latents, noise = latents.to(dtype), noise.to(dtype)
    abar = noise_scheduler.alphas_cumprod
    x_t = debias.reference.add_noise(latents, timesteps, abar, noise)
    assert torch.equal(x_t, noise_scheduler.add_noise(latents, noise, timesteps))
    velocity = debias.reference.get_velocity(latents, noise, timesteps, abar)
    assert torch.equal(velocity, noise_scheduler.get_velocity(latents, noise, timesteps))

    pred = torch.randn(latents.shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    target = noise if prediction_type == "epsilon" else velocity
    weights = diffusers_weights(noise_scheduler, timesteps, prediction_type)
    want = F.mse_loss(pred.float(), target.float(), reduction="none")
    want = (want.mean(dim=list(range(1, want.dim()))) * weights).mean()
    table = torch.zeros(T).index_put_((timesteps,), weights)  # the weights as a [T] table
    got = debias.reference.noise_loss(pred, noise, timesteps, table, latents, abar, prediction_type)
    assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("shift", SHIFTS, ids=lambda s: f"shift{s:g}")
def test_reference_flow_is_the_scripts(shift, dtype):
    """reference.flow_noised is FlowMatchEulerDiscreteScheduler.scale_noise (and the scripts'
    (1 - sigmas) * x0 + sigmas * noise), sd3_loss_weighting is
    compute_loss_weighting_for_sd3 and flow_loss on flow_target the SD3 / Flux scripts' loss
    lines, for every weighting scheme, in the latents' dtype."""
    noise_scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=T, shift=shift)
    gen = torch.Generator().manual_seed(7)
    indices = torch.randint(0, T, (FLOW_BATCH,), generator=gen)
    indices[[0, -1]] = torch.tensor([0, T - 1])
    timesteps = noise_scheduler.timesteps[indices]
    x0, noise, pred = (torch.randn(FLOW_BATCH, 4, 6, generator=gen).to(dtype) for _ in range(3))

    x_t = debias.reference.flow_noised(x0, noise, noise_scheduler.sigmas[indices])
    assert torch.equal(x_t, noise_scheduler.scale_noise(x0, timesteps, noise))
    sigmas = get_sigmas(noise_scheduler, timesteps, x0.ndim, dtype)
    assert torch.equal(x_t, (1.0 - sigmas) * x0 + sigmas * noise)
    target = noise - x0
    for scheme in WEIGHTING_SCHEMES:
        weighting = compute_loss_weighting_for_sd3(weighting_scheme=scheme, sigmas=sigmas)
        got_weighting = debias.reference.sd3_loss_weighting(scheme, sigmas)
        assert got_weighting.dtype == weighting.dtype and torch.equal(got_weighting, weighting)
        want = torch.mean(
            (weighting.float() * (pred.float() - target.float()) ** 2).reshape(FLOW_BATCH, -1), 1
        ).mean()
        got = debias.reference.flow_loss(
            pred, debias.reference.flow_target(x0, noise), weighting.flatten()
        )
        assert torch.equal(got, want), scheme


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
def test_reference_edm_is_diffusers(prediction_type):
    """reference.edm_noised is EDMEulerScheduler.add_noise; edm_precondition's c_in and
    c_noise are its precondition_inputs / precondition_noise and edm_denoised its
    precondition_outputs (c_out negated for "v_prediction"); edm_raw_target is the raw output
    whose D is x0."""
    noise_scheduler = EDMEulerScheduler(num_train_timesteps=T, prediction_type=prediction_type)
    sd = noise_scheduler.config.sigma_data
    model_input, noise, timesteps = make_edm_batch(noise_scheduler)
    sigmas = get_sigmas(noise_scheduler, timesteps, model_input.ndim)
    x_t = debias.reference.edm_noised(model_input, noise, sigmas.flatten())
    assert torch.equal(x_t, noise_scheduler.add_noise(model_input, noise, timesteps))

    _, _, c_in, c_noise = debias.reference.edm_precondition(sigmas, sd)
    assert torch.equal(c_in * x_t, noise_scheduler.precondition_inputs(x_t, sigmas))
    assert torch.equal(c_noise, noise_scheduler.precondition_noise(sigmas))
    raw = torch.randn(model_input.shape, generator=torch.Generator().manual_seed(3))
    sign = 1.0 if prediction_type == "epsilon" else -1.0
    denoised = debias.reference.edm_denoised(x_t, sign * raw, sigmas.flatten(), sd)
    assert torch.equal(denoised, noise_scheduler.precondition_outputs(x_t, raw, sigmas))

    target = debias.reference.edm_raw_target(model_input, noise, sigmas.flatten(), sd)
    at_target = noise_scheduler.precondition_outputs(x_t, sign * target, sigmas)
    torch.testing.assert_close(at_target, model_input, rtol=1e-5, atol=1e-5)


# ---- kohya-ss/sd-scripts: library/custom_train_functions.py -------------------------------
#
# sd-scripts multiplies the per-sample MSE by a weight read from all_snr, float32
# (sqrt(abar) / sqrt(1 - abar))**2. apply_snr_weight is Min-SNR with diffusers' v form;
# apply_debiased_estimation clips snr at 1000 (SD's t=0 has snr 1175) and, for v-prediction,
# uses 1/(snr + 1): weight 1 on the x0 error, not the debias objective (sqrt(snr)/(snr + 1)).


def kohya_all_snr(noise_scheduler) -> torch.Tensor:
    """prepare_scheduler_for_custom_training's all_snr."""
    alphas_cumprod = noise_scheduler.alphas_cumprod
    alpha, sigma = torch.sqrt(alphas_cumprod), torch.sqrt(1.0 - alphas_cumprod)
    return (alpha / sigma) ** 2


def kohya_weight(function: str, all_snr, timesteps, v_prediction: bool) -> torch.Tensor:
    """The factor apply_snr_weight (gamma=5) or apply_debiased_estimation puts on the loss."""
    snr = torch.stack([all_snr[t] for t in timesteps])
    if function == "apply_snr_weight":
        min_snr_gamma = torch.minimum(snr, torch.full_like(snr, SNR_GAMMA))
        return torch.div(min_snr_gamma, snr + 1 if v_prediction else snr).float()
    snr_t = torch.minimum(snr, torch.ones_like(snr) * 1000)
    return 1 / (snr_t + 1) if v_prediction else 1 / torch.sqrt(snr_t)


# debias' equivalent of each: a named weighting where the objectives agree, else an
# epsilon-space callable of snr.
KOHYA_EQUIVALENTS = {
    ("apply_snr_weight", "epsilon"): ("min_snr", {"gamma": SNR_GAMMA}),
    ("apply_snr_weight", "v_prediction"): ("min_snr", {"gamma": SNR_GAMMA}),
    ("apply_debiased_estimation", "epsilon"): (lambda snr: snr.clamp(max=1000).rsqrt(), {}),
    # v-space 1/(min(snr, 1000) + 1) times (snr + 1)/snr, the v-to-epsilon factor
    ("apply_debiased_estimation", "v_prediction"): (
        lambda snr: (snr + 1) / (snr * (snr.clamp(max=1000) + 1)),
        {},
    ),
}


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("function", ["apply_snr_weight", "apply_debiased_estimation"])
def test_kohya_weightings_reproduced(function, prediction_type, backend):
    """Each sd-scripts weighting is a debias weighting: loss_weight gives its factor at every
    timestep, and fused_loss(reduction="none") its weighted per-sample loss. "debias" itself
    differs from apply_debiased_estimation where snr > 1000 and, for v, by 1/sqrt(snr)."""
    noise_scheduler = DDPMScheduler(
        num_train_timesteps=T,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type=prediction_type,
    )
    v_prediction = prediction_type == "v_prediction"
    weighting, options = KOHYA_EQUIVALENTS[function, prediction_type]
    timesteps = torch.arange(T)
    want = kohya_weight(function, kohya_all_snr(noise_scheduler), timesteps, v_prediction)
    got = debias.loss_weight(timesteps, noise_scheduler, weighting, **options)
    torch.testing.assert_close(got, want, rtol=2e-6, atol=0)

    snr = debias.NoiseSchedule.from_diffusers(noise_scheduler).snr
    ours = debias.loss_weight(timesteps, noise_scheduler, "debias").double()
    if function == "apply_debiased_estimation":
        clipped = snr > 1000
        assert clipped.tolist() == [True] + [False] * (T - 1)
        if v_prediction:
            torch.testing.assert_close(
                want.double()[1:], (ours / snr.sqrt())[1:], rtol=2e-6, atol=0
            )
        else:
            torch.testing.assert_close(want.double()[1:], ours[1:], rtol=2e-6, atol=0)

    latents, noise, t = make_batch()
    pred = torch.randn(latents.shape, generator=torch.Generator().manual_seed(5))
    target = noise_scheduler.get_velocity(latents, noise, t) if v_prediction else noise
    mse = F.mse_loss(pred.float(), target.float(), reduction="none").mean([1, 2, 3])
    want_loss = mse * kohya_weight(function, kohya_all_snr(noise_scheduler), t, v_prediction)
    loss = debias.fused_loss(
        pred,
        noise,
        t,
        noise_scheduler,
        weighting,
        x0=latents,
        reduction="none",
        backend=backend,
        **options,
    )
    torch.testing.assert_close(loss, want_loss, rtol=RTOL, atol=ATOL)


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
