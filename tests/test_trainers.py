"""debias in the loss lines of the trainers people run today, one training step each.

Each test restates a trainer's own functions (its lines as written there, cited by repository,
path and commit: the restated function is the trainer's function the test compares to), runs
one step of a tiny seeded network through them and again through debias, and compares x_t (bit
for bit when the trainer's noise is passed), the loss and the gradient of the prediction and of
every parameter (float32, rtol 1e-5). The trainers:

- kohya-ss/sd-scripts @ 48d368fa: flux_train_network.py / train_network.py (Flux LoRA: every
  --timestep_sampling, --loss_type and --huber_schedule, --masked_loss, loss_weights,
  --ip_noise_gamma, --model_prediction_type), and the SD / SDXL DDPM path (--huber_schedule
  snr, --min_snr_gamma, --ip_noise_gamma);
- kohya-ss/musubi-tuner @ 30c658c4: the video trainers' base (Wan, HunyuanVideo) on
  [B, C, F, H, W] latents;
- Nerogar/OneTrainer @ 23df3832: flow-matching losses with masked training (images and video);
- huggingface/diffusers @ 58eb52c0: examples/dreambooth/train_dreambooth_lora_qwen_image.py and
  train_dreambooth_lora_flux2.py (packed tokens), examples/text_to_image/train_text_to_image.py
  (--input_perturbation).

docs/trainers.md shows each trainer's lines beside the debias call that replaces them.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import get_sigmas, skip_unless_backend

import debias

diffusers = pytest.importorskip("diffusers")
training_utils = pytest.importorskip("diffusers.training_utils")
DDPMScheduler = diffusers.DDPMScheduler
FlowMatchEulerDiscreteScheduler = diffusers.FlowMatchEulerDiscreteScheduler

RTOL = 1e-5
B = 3  # an odd batch; every shape below is small enough for a 2-core CPU


@pytest.fixture(params=("torch", "cpu"))
def backend(request) -> str:
    skip_unless_backend(request.param)
    return request.param


def _close(name, got, want, rtol=RTOL):
    """Max error within rtol of the reference's largest magnitude."""
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    scale = want.double().abs().max().item() + 1e-30
    err = (got.double() - want.double()).abs().max().item()
    assert err <= rtol * scale, f"{name}: max error {err:.3g} at scale {scale:.3g}"


def _view(x, like):
    return x.view((-1,) + (1,) * (like.dim() - 1))


def _model(kind: str, channels: int) -> torch.nn.Module:
    """A seeded random conv over image or video latents, or a linear map over packed tokens."""
    torch.manual_seed(1234)
    if kind == "image":
        return torch.nn.Conv2d(channels, channels, 3, padding=1)
    if kind == "video":
        return torch.nn.Conv3d(channels, channels, 3, padding=1)
    return torch.nn.Linear(channels, channels)


def _step(model, x_t, loss_of_pred):
    """One forward/backward: (loss, {"pred": dL/dpred, <parameter>: dL/dparameter})."""
    model.zero_grad(set_to_none=True)
    pred = model(x_t)
    pred.retain_grad()
    loss = loss_of_pred(pred)
    loss.backward()
    grads = {"pred": pred.grad}
    grads.update({name: p.grad.clone() for name, p in model.named_parameters()})
    return loss.detach(), grads


def _same_step(got, want, rtol=RTOL):
    _close("loss", got[0], want[0], rtol)
    for name, grad in want[1].items():
        _close(f"grad of {name}", got[1][name], grad, rtol)


def _latents(shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype)


def _mask(shape, seed=1):
    """Values in [0, 1] with whole zero regions, as alpha masks have."""
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(shape, generator=g)
    return torch.where(torch.rand(shape, generator=g) < 0.3, torch.zeros_like(m), m)


# ---- kohya-ss/sd-scripts @ 48d368fa557731ad0488c07304dfeba8c07910eb ---------------------------


def time_shift(mu: float, sigma: float, t: torch.Tensor):
    """sd-scripts library/flux_train_utils.py time_shift."""
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma)


def get_lin_function(x1: float = 256, y1: float = 0.5, x2: float = 4096, y2: float = 1.15):
    """sd-scripts library/flux_train_utils.py get_lin_function (musubi-tuner's
    utils/train_utils.py has the same)."""
    m = (y2 - y1) / (x2 - x1)
    b = y1 - m * x1
    return lambda x: m * x + b


def sd_scripts_get_noisy_model_input_and_timesteps(
    args, noise_scheduler, latents, noise, device, dtype
):
    """sd-scripts library/flux_train_utils.py get_noisy_model_input_and_timesteps, the
    --timestep_sampling uniform / sigmoid / shift / flux_shift branches and --ip_noise_gamma as
    written. It also returns xi and the strength that the --ip_noise_gamma lines draw (None
    without it), which the debias side is handed."""
    bsz, h, w = latents.shape[0], latents.shape[-2], latents.shape[-1]
    num_timesteps = noise_scheduler.config.num_train_timesteps
    if args.timestep_sampling == "uniform" or args.timestep_sampling == "sigmoid":
        if args.timestep_sampling == "sigmoid":
            sigmas = torch.sigmoid(args.sigmoid_scale * torch.randn((bsz,), device=device))
        else:
            sigmas = torch.rand((bsz,), device=device)
        timesteps = sigmas * num_timesteps
    elif args.timestep_sampling == "shift":
        shift = args.discrete_flow_shift
        sigmas = torch.randn(bsz, device=device)
        sigmas = sigmas * args.sigmoid_scale
        sigmas = sigmas.sigmoid()
        sigmas = (sigmas * shift) / (1 + (shift - 1) * sigmas)
        timesteps = sigmas * num_timesteps
    elif args.timestep_sampling == "flux_shift":
        sigmas = torch.randn(bsz, device=device)
        sigmas = sigmas * args.sigmoid_scale
        sigmas = sigmas.sigmoid()
        mu = get_lin_function(y1=0.5, y2=1.15)((h // 2) * (w // 2))
        sigmas = time_shift(mu, 1.0, sigmas)
        timesteps = sigmas * num_timesteps
    else:
        raise NotImplementedError(args.timestep_sampling)  # "sigma": the table draw
    sigmas = sigmas.view(-1, 1, 1, 1) if latents.ndim == 4 else sigmas.view(-1, 1, 1, 1, 1)
    xi = ip_noise_gamma = None
    if args.ip_noise_gamma:
        xi = torch.randn_like(latents, device=latents.device, dtype=dtype)
        if args.ip_noise_gamma_random_strength:
            ip_noise_gamma = torch.rand(1, device=latents.device, dtype=dtype) * args.ip_noise_gamma
        else:
            ip_noise_gamma = args.ip_noise_gamma
        noisy_model_input = (1.0 - sigmas) * latents + sigmas * (noise + ip_noise_gamma * xi)
    else:
        noisy_model_input = (1.0 - sigmas) * latents + sigmas * noise
    return noisy_model_input.to(dtype), timesteps.to(dtype), sigmas, xi, ip_noise_gamma


def sd_scripts_compute_loss_weighting_for_sd3(weighting_scheme: str, sigmas=None):
    """sd-scripts library/flux_train_utils.py compute_loss_weighting_for_sd3."""
    if weighting_scheme == "sigma_sqrt":
        weighting = (sigmas**-2.0).float()
    elif weighting_scheme == "cosmap":
        bot = 1 - 2 * sigmas + 2 * sigmas**2
        weighting = 2 / (math.pi * bot)
    else:
        weighting = torch.ones_like(sigmas)
    return weighting


def apply_model_prediction_type(args, model_pred, noisy_model_input, sigmas):
    """sd-scripts library/flux_train_utils.py apply_model_prediction_type."""
    weighting = None
    if args.model_prediction_type == "raw":
        pass
    elif args.model_prediction_type == "additive":
        model_pred = model_pred + noisy_model_input
    elif args.model_prediction_type == "sigma_scaled":
        model_pred = model_pred * (-sigmas) + noisy_model_input
        weighting = sd_scripts_compute_loss_weighting_for_sd3(args.weighting_scheme, sigmas)
    return model_pred, weighting


def get_huber_threshold_if_needed(args, timesteps: torch.Tensor, noise_scheduler):
    """sd-scripts library/train_util.py get_huber_threshold_if_needed."""
    if not (args.loss_type == "huber" or args.loss_type == "smooth_l1"):
        return None
    b_size = timesteps.shape[0]
    if args.huber_schedule == "exponential":
        alpha = -math.log(args.huber_c) / noise_scheduler.config.num_train_timesteps
        result = torch.exp(-alpha * timesteps) * args.huber_scale
    elif args.huber_schedule == "snr":
        if not hasattr(noise_scheduler, "alphas_cumprod"):
            raise NotImplementedError(
                "Huber schedule 'snr' is not supported with the current model."
            )
        alphas_cumprod = torch.index_select(noise_scheduler.alphas_cumprod, 0, timesteps.cpu())
        sigmas = ((1.0 - alphas_cumprod) / alphas_cumprod) ** 0.5
        result = (1 - args.huber_c) / (1 + sigmas) ** 2 + args.huber_c
        result = result.to(timesteps.device)
    elif args.huber_schedule == "constant":
        result = torch.full((b_size,), args.huber_c * args.huber_scale, device=timesteps.device)
    else:
        raise NotImplementedError(f"Unknown Huber loss schedule {args.huber_schedule}!")
    return result


def conditional_loss(model_pred, target, loss_type: str, reduction: str, huber_c=None):
    """sd-scripts library/train_util.py conditional_loss (reduction "none", as train_network
    calls it)."""
    assert reduction == "none"
    if loss_type == "l2":
        loss = torch.nn.functional.mse_loss(model_pred, target, reduction=reduction)
    elif loss_type == "l1":
        loss = torch.nn.functional.l1_loss(model_pred, target, reduction=reduction)
    elif loss_type == "huber":
        huber_c = huber_c.view(-1, *([1] * (model_pred.ndim - 1)))
        loss = 2 * huber_c * (torch.sqrt((model_pred - target) ** 2 + huber_c**2) - huber_c)
    elif loss_type == "smooth_l1":
        huber_c = huber_c.view(-1, *([1] * (model_pred.ndim - 1)))
        loss = 2 * (torch.sqrt((model_pred - target) ** 2 + huber_c**2) - huber_c)
    else:
        raise NotImplementedError(f"Unsupported Loss Type: {loss_type}")
    return loss


def apply_masked_loss(loss, batch):
    """sd-scripts library/custom_train_functions.py apply_masked_loss, the alpha_masks branch."""
    mask_image = batch["alpha_masks"].to(dtype=loss.dtype).unsqueeze(1)  # add channel dimension
    mask_image = torch.nn.functional.interpolate(mask_image, size=loss.shape[2:], mode="area")
    loss = loss * mask_image
    return loss


def prepare_scheduler_for_custom_training(noise_scheduler, device):
    """sd-scripts library/custom_train_functions.py prepare_scheduler_for_custom_training."""
    if hasattr(noise_scheduler, "all_snr"):
        return
    alphas_cumprod = noise_scheduler.alphas_cumprod
    sqrt_alphas_cumprod = torch.sqrt(alphas_cumprod)
    sqrt_one_minus_alphas_cumprod = torch.sqrt(1.0 - alphas_cumprod)
    alpha = sqrt_alphas_cumprod
    sigma = sqrt_one_minus_alphas_cumprod
    all_snr = (alpha / sigma) ** 2
    noise_scheduler.all_snr = all_snr.to(device)


def apply_snr_weight(loss, timesteps, noise_scheduler, gamma, v_prediction=False):
    """sd-scripts library/custom_train_functions.py apply_snr_weight."""
    snr = torch.stack([noise_scheduler.all_snr[t] for t in timesteps])
    min_snr_gamma = torch.minimum(snr, torch.full_like(snr, gamma))
    if v_prediction:
        snr_weight = torch.div(min_snr_gamma, snr + 1).float().to(loss.device)
    else:
        snr_weight = torch.div(min_snr_gamma, snr).float().to(loss.device)
    loss = loss * snr_weight
    return loss


def sd_scripts_process_batch_loss(
    args, noise_pred, target, timesteps, weighting, batch, noise_scheduler
):
    """sd-scripts train_network.py NetworkTrainer.process_batch, the lines after
    get_noise_pred_and_target, with post_process_loss's --min_snr_gamma."""
    huber_c = get_huber_threshold_if_needed(args, timesteps, noise_scheduler)
    loss = conditional_loss(noise_pred.float(), target.float(), args.loss_type, "none", huber_c)
    if weighting is not None:
        loss = loss * weighting
    if args.masked_loss or ("alpha_masks" in batch and batch["alpha_masks"] is not None):
        loss = apply_masked_loss(loss, batch)
    loss = loss.mean(dim=list(range(1, loss.ndim)))  # mean over all dims except batch
    loss_weights = batch["loss_weights"]
    loss = loss * loss_weights
    if args.min_snr_gamma:  # post_process_loss
        loss = apply_snr_weight(loss, timesteps, noise_scheduler, args.min_snr_gamma, False)
    return loss.mean()


def get_timesteps(min_timestep: int, max_timestep: int, b_size: int, device) -> torch.Tensor:
    """sd-scripts library/train_util.py get_timesteps."""
    if min_timestep < max_timestep:
        timesteps = torch.randint(min_timestep, max_timestep, (b_size,), device="cpu")
    else:
        timesteps = torch.full((b_size,), max_timestep, device="cpu")
    timesteps = timesteps.long().to(device)
    return timesteps


def get_noise_noisy_latents_and_timesteps(args, noise_scheduler, latents):
    """sd-scripts library/train_util.py get_noise_noisy_latents_and_timesteps (no noise offset,
    no multires noise), as written; it also returns the perturbation it draws (xi, strength;
    None without --ip_noise_gamma), which the debias side is handed."""
    noise = torch.randn_like(latents, device=latents.device)
    b_size = latents.shape[0]
    min_timestep = 0 if args.min_timestep is None else args.min_timestep
    max_timestep = (
        noise_scheduler.config.num_train_timesteps
        if args.max_timestep is None
        else args.max_timestep
    )
    timesteps = get_timesteps(min_timestep, max_timestep, b_size, latents.device)
    xi = strength = None
    if args.ip_noise_gamma:
        if args.ip_noise_gamma_random_strength:
            strength = torch.rand(1, device=latents.device) * args.ip_noise_gamma
        else:
            strength = args.ip_noise_gamma
        xi = torch.randn_like(latents)
        noisy_latents = noise_scheduler.add_noise(latents, noise + strength * xi, timesteps)
    else:
        noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
    return noise, noisy_latents, timesteps, xi, strength


# The Flux trainer's scheduler (sd-scripts library/sd3_train_utils.py
# FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=...)): the branches above read
# only its config, and it has no alphas_cumprod, so --huber_schedule snr is refused on Flux.
FLUX_SCHEDULER = SimpleNamespace(config=SimpleNamespace(num_train_timesteps=1000))


def _sd_scripts_args(**kw):
    """sd-scripts' argparse defaults for the flags these tests read (flux_train_utils.py,
    train_util.py), with --model_prediction_type raw unless given."""
    args = SimpleNamespace(
        timestep_sampling="sigmoid",
        sigmoid_scale=1.0,
        discrete_flow_shift=3.0,
        model_prediction_type="raw",
        weighting_scheme="none",
        loss_type="l2",
        huber_schedule="snr",
        huber_c=0.1,
        huber_scale=1.0,
        masked_loss=False,
        ip_noise_gamma=None,
        ip_noise_gamma_random_strength=False,
        min_snr_gamma=None,
        min_timestep=None,
        max_timestep=None,
    )
    for k, v in kw.items():
        assert hasattr(args, k), k
        setattr(args, k, v)
    return args


def _sd_scripts_batch(latents, masked: bool):
    """loss_weights per sample (caption weights); alpha masks at image resolution (8x the
    latents), as sd-scripts' dataset gives them."""
    batch = {"loss_weights": torch.tensor([1.0, 0.5, 2.0])[: latents.shape[0]]}
    if masked:
        batch["alpha_masks"] = _mask((latents.shape[0], 8 * latents.shape[2], 8 * latents.shape[3]))
    return batch


def _sd_scripts_flux_step(args, model, latents, batch, seed):
    """flux_train_network.py FluxNetworkTrainer.get_noise_pred_and_target, then process_batch;
    the model sees the unpacked latents (pack_latents / unpack_latents only permute them)."""
    torch.manual_seed(seed)
    noise = torch.randn_like(latents)
    noisy, timesteps, sigmas, _, _ = sd_scripts_get_noisy_model_input_and_timesteps(
        args, FLUX_SCHEDULER, latents, noise, "cpu", latents.dtype
    )

    def loss_of(model_pred):
        model_pred, weighting = apply_model_prediction_type(args, model_pred, noisy, sigmas)
        target = noise - latents
        return sd_scripts_process_batch_loss(
            args, model_pred, target, timesteps, weighting, batch, FLUX_SCHEDULER
        )

    return noisy, sigmas.flatten(), _step(model, noisy, loss_of)


def _sd_scripts_sigma_kwargs(args, latents):
    """debias.sample_timesteps' arguments for sd-scripts' --timestep_sampling flags."""
    h, w = latents.shape[-2:]
    return {
        "uniform": {},
        "sigmoid": {"sigmoid_scale": args.sigmoid_scale},
        "shift": {"sigmoid_scale": args.sigmoid_scale, "shift": args.discrete_flow_shift},
        "flux_shift": {"sigmoid_scale": args.sigmoid_scale, "seq_len": (h // 2) * (w // 2)},
    }[args.timestep_sampling]


def _debias_flux_step(args, model, latents, batch, seed, backend):
    """The same step through debias: the trainer's noise and xi passed, its draws made by
    sample_timesteps, its huber_c computed by the user, its mask interpolated by the user."""
    torch.manual_seed(seed)
    noise = torch.randn_like(latents)
    scheme = args.timestep_sampling
    sigma = debias.sample_timesteps(
        latents.shape[0], "flow", scheme, **_sd_scripts_sigma_kwargs(args, latents)
    )
    xi = gamma = None
    if args.ip_noise_gamma:
        xi = torch.randn_like(latents)
        gamma = args.ip_noise_gamma
        if args.ip_noise_gamma_random_strength:
            gamma = (torch.rand(1) * args.ip_noise_gamma).expand(latents.shape[0])
    x_t, _ = debias.add_noise(
        latents,
        sigma,
        "flow",
        noise=noise,
        input_perturbation=gamma,
        perturbation_noise=xi,
        backend=backend,
    )
    huber_c = get_huber_threshold_if_needed(args, sigma * 1000, FLUX_SCHEDULER)
    mask = None
    if args.masked_loss:
        mask = F.interpolate(batch["alpha_masks"][:, None], size=latents.shape[2:], mode="area")
    kw = {"loss": args.loss_type, "huber_c": huber_c, "mask": mask, "backend": backend}

    def loss_of(pred):
        if args.model_prediction_type == "raw":
            return debias.fused_loss(
                pred,
                noise,
                sigma,
                "flow",
                "none",
                "flow",
                x0=latents,
                sample_weight=batch["loss_weights"],
                **kw,
            )
        # the other two on F through the op itself: y = p noise + q x0 (float64 coefficients).
        # With --ip_noise_gamma x_t also holds s gamma xi, which y must carry too: the x0 term
        # then reads x0 + x_t (one add by the user) instead of x0.
        s = sigma.double()
        ip = args.ip_noise_gamma is not None
        x0_term = latents + x_t if ip else latents
        if args.model_prediction_type == "additive":
            # (F + x_t) - (noise - x0) = F - y, y = noise - (x0 + x_t)
            # = (1 - s) noise - (2 - s) x0
            one = torch.ones_like(s)
            w, p, q = (one, one, -one) if ip else (one, 1 - s, s - 2)
        else:
            # sigma_scaled: (-s F + x_t) - (noise - x0) = -s (F - y), y = ((x0 + x_t) - noise) / s
            # = ((s - 1) noise + (2 - s) x0) / s, so l2 is s^2 |F - y|^2, l1 s |F - y|, huber
            # s^2 huber_{c/s}, smooth_l1 s smooth_l1_{c/s}: a per-sample weight and c / s
            power = 2 if args.loss_type in ("l2", "huber") else 1
            weighting = sd_scripts_compute_loss_weighting_for_sd3(args.weighting_scheme, s)
            w, p, q = s**power * weighting, (s - 1) / s, (2 - s) / s
            if ip:
                p, q = -1 / s, 1 / s
            if huber_c is not None:
                kw["huber_c"] = (huber_c.double() / s).float()
        w = w * batch["loss_weights"].double()
        return debias.affine_loss(pred, noise, w.float(), p.float(), q.float(), x0_term, **kw)

    return x_t, sigma, _step(model, x_t, loss_of)


SAMPLINGS = [
    pytest.param({"timestep_sampling": "uniform"}, id="uniform"),
    pytest.param({"timestep_sampling": "sigmoid", "sigmoid_scale": 1.0}, id="sigmoid"),
    pytest.param(
        {"timestep_sampling": "shift", "discrete_flow_shift": 3.1582, "sigmoid_scale": 1.0},
        id="shift",
    ),
    pytest.param({"timestep_sampling": "flux_shift", "sigmoid_scale": 1.3}, id="flux_shift"),
]
LOSS_TYPES = [
    pytest.param({"loss_type": "l2"}, id="l2"),
    pytest.param({"loss_type": "l1"}, id="l1"),
    pytest.param({"loss_type": "huber", "huber_schedule": "constant"}, id="huber-constant"),
    pytest.param(
        {"loss_type": "huber", "huber_schedule": "exponential", "huber_c": 0.2}, id="huber-exp"
    ),
    pytest.param(
        {"loss_type": "smooth_l1", "huber_schedule": "constant", "huber_scale": 0.5},
        id="smooth_l1-constant",
    ),
    pytest.param({"loss_type": "smooth_l1", "huber_schedule": "exponential"}, id="smooth_l1-exp"),
]


@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("sampling", SAMPLINGS)
def test_sd_scripts_flux_lora_step(backend, sampling, loss_type, masked):
    """--timestep_sampling, --loss_type / --huber_schedule, --masked_loss and loss_weights:
    the same sigmas after the same seed, x_t bit for bit, loss and gradients."""
    args = _sd_scripts_args(**sampling, **loss_type, masked_loss=masked)
    latents = _latents((B, 4, 8, 10))
    batch = _sd_scripts_batch(latents, masked)
    model = _model("image", 4)
    x_want, sigma_want, want = _sd_scripts_flux_step(args, model, latents, batch, seed=5)
    x_got, sigma_got, got = _debias_flux_step(args, model, latents, batch, 5, backend)
    assert torch.equal(sigma_got, sigma_want)
    assert torch.equal(x_got, x_want)
    _same_step(got, want)


@pytest.mark.parametrize("random_strength", [False, True], ids=["fixed", "random_strength"])
@pytest.mark.parametrize("sampling", SAMPLINGS[1:3])
def test_sd_scripts_flux_ip_noise_gamma(backend, sampling, random_strength):
    """--ip_noise_gamma 0.1 (and --ip_noise_gamma_random_strength): the script's xi passed as
    perturbation_noise gives its x_t bit for bit; the target stays noise - latents."""
    args = _sd_scripts_args(
        **sampling, ip_noise_gamma=0.1, ip_noise_gamma_random_strength=random_strength
    )
    latents = _latents((B, 4, 8, 10))
    batch = _sd_scripts_batch(latents, False)
    model = _model("image", 4)
    x_want, _, want = _sd_scripts_flux_step(args, model, latents, batch, seed=9)
    x_got, _, got = _debias_flux_step(args, model, latents, batch, 9, backend)
    assert torch.equal(x_got, x_want)
    _same_step(got, want)


# --weighting_scheme weighs only the sigma_scaled prediction in sd-scripts
PREDICTION_TYPES = [("raw", "none"), ("additive", "none")] + [
    ("sigma_scaled", scheme) for scheme in ("none", "cosmap", "sigma_sqrt")
]


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize(
    "prediction_type, weighting_scheme",
    PREDICTION_TYPES,
    ids=["-".join(c) for c in PREDICTION_TYPES],
)
def test_sd_scripts_flux_model_prediction_type(
    backend, prediction_type, weighting_scheme, loss_type
):
    """--model_prediction_type raw / additive / sigma_scaled (the script's default), every
    --loss_type, through affine_loss on the network's output F (sigma_scaled also takes its
    --weighting_scheme weighting), masked, with loss_weights."""
    _check_prediction_type(backend, prediction_type, weighting_scheme, loss_type)


def _check_prediction_type(backend, prediction_type, weighting_scheme, loss_type, **ip):
    """One masked step with loss_weights and shift sigmas, the script's against debias': x_t
    bit for bit, loss and gradients."""
    args = _sd_scripts_args(
        timestep_sampling="shift",
        model_prediction_type=prediction_type,
        weighting_scheme=weighting_scheme,
        masked_loss=True,
        **loss_type,
        **ip,
    )
    latents = _latents((B, 4, 8, 10))
    batch = _sd_scripts_batch(latents, True)
    model = _model("image", 4)
    x_want, sigma, want = _sd_scripts_flux_step(args, model, latents, batch, seed=3)
    assert ((sigma > 0.05) & (sigma < 0.95)).all()  # the draw this seed gives: 1/sigma is mild
    x_got, _, got = _debias_flux_step(args, model, latents, batch, 3, backend)
    assert torch.equal(x_got, x_want)
    _same_step(got, want)


@pytest.mark.parametrize("random_strength", [False, True], ids=["fixed", "random_strength"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES[::2] + LOSS_TYPES[3:4])
@pytest.mark.parametrize("prediction_type", ["additive", "sigma_scaled"])
def test_sd_scripts_flux_model_prediction_type_with_ip_noise_gamma(
    backend, prediction_type, loss_type, random_strength
):
    """--model_prediction_type additive / sigma_scaled with --ip_noise_gamma: x_t carries
    s gamma xi, so the prediction does too; affine_loss's x0 term reads x0 + x_t."""
    weighting_scheme = "cosmap" if prediction_type == "sigma_scaled" else "none"
    ip = {"ip_noise_gamma": 0.1, "ip_noise_gamma_random_strength": random_strength}
    _check_prediction_type(backend, prediction_type, weighting_scheme, loss_type, **ip)


def test_sd_scripts_flux_huber_snr_is_not_available():
    """--huber_schedule snr (sd-scripts' default schedule) reads alphas_cumprod, which the Flux
    scheduler has not: the script stops there, so on Flux only constant / exponential apply."""
    args = _sd_scripts_args(loss_type="huber", huber_schedule="snr")
    with pytest.raises(NotImplementedError, match="snr"):
        get_huber_threshold_if_needed(args, torch.rand(B) * 1000, FLUX_SCHEDULER)


@pytest.mark.parametrize("ip", [False, True], ids=["plain", "ip_noise_gamma"])
def test_sd_scripts_flux_bf16_weight_dtype(backend, ip):
    """Mixed precision (weight_dtype bf16, float32 latents): the script computes x_t in float32
    and rounds it to bf16 (its xi is drawn in bf16); debias' float32 x_t rounded alike is the
    same without --ip_noise_gamma, and within one bf16 step with it."""
    args = _sd_scripts_args(timestep_sampling="shift", ip_noise_gamma=0.1 if ip else None)
    latents = _latents((B, 4, 8, 10))
    torch.manual_seed(2)
    noise = torch.randn_like(latents)
    want, _, sigmas, xi, gamma = sd_scripts_get_noisy_model_input_and_timesteps(
        args, FLUX_SCHEDULER, latents, noise, "cpu", torch.bfloat16
    )
    x_t, _ = debias.add_noise(
        latents,
        sigmas.flatten(),
        "flow",
        noise=noise,
        input_perturbation=gamma,
        perturbation_noise=None if xi is None else xi.float(),
        backend=backend,
    )
    got = x_t.to(torch.bfloat16)
    if not ip:
        assert torch.equal(got, want)
    # one bf16 step at the inputs' scale: the script rounds gamma * xi to bf16 before the sum
    scale = latents.abs() + noise.abs() + (0 if xi is None else gamma * xi.float().abs())
    assert ((got.float() - want.float()).abs() <= torch.finfo(torch.bfloat16).eps * scale).all()


def _sdxl_scheduler():
    """sd-scripts train_network.py NetworkTrainer.get_noise_scheduler (SD / SDXL LoRA)."""
    noise_scheduler = DDPMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        clip_sample=False,
    )
    prepare_scheduler_for_custom_training(noise_scheduler, "cpu")
    return noise_scheduler


@pytest.mark.parametrize(
    "extras",
    [
        pytest.param({}, id="plain"),
        pytest.param(
            {"masked_loss": True, "min_snr_gamma": 5.0, "ip_noise_gamma": 0.1}, id="masked-snr5-ip"
        ),
        pytest.param(
            {"ip_noise_gamma": 0.05, "ip_noise_gamma_random_strength": True}, id="ip-random"
        ),
    ],
)
@pytest.mark.parametrize(
    "loss_type, schedule",
    [
        (loss, schedule)
        for loss in ("huber", "smooth_l1")
        for schedule in ("snr", "exponential", "constant")
    ]
    + [("l1", None), ("l2", None)],
    ids=lambda v: v,
)
def test_sd_scripts_sdxl_ddpm_step(backend, loss_type, schedule, extras):
    """The SD / SDXL LoRA trainer (DDPMScheduler, epsilon target): --huber_schedule snr (the
    one place it applies), exponential and constant, --masked_loss, --min_snr_gamma and
    --ip_noise_gamma, against the same lines; timesteps drawn alike, x_t bit for bit."""
    args = _sd_scripts_args(loss_type=loss_type, huber_schedule=schedule or "snr", **extras)
    scheduler = _sdxl_scheduler()
    latents = _latents((B, 4, 8, 6))
    batch = _sd_scripts_batch(latents, args.masked_loss)
    model = _model("image", 4)

    torch.manual_seed(4)
    noise, noisy, timesteps, _, _ = get_noise_noisy_latents_and_timesteps(args, scheduler, latents)
    want = _step(
        model,
        noisy,
        lambda pred: sd_scripts_process_batch_loss(
            args, pred, noise, timesteps, None, batch, scheduler
        ),
    )

    torch.manual_seed(4)
    noise = torch.randn_like(latents)
    t = debias.sample_timesteps(B, scheduler, "uniform")
    assert torch.equal(t, timesteps)
    gamma = xi = None
    if args.ip_noise_gamma:
        gamma = args.ip_noise_gamma
        if args.ip_noise_gamma_random_strength:
            gamma = (torch.rand(1) * args.ip_noise_gamma).expand(B)
        xi = torch.randn_like(latents)
    x_t, _ = debias.add_noise(
        latents,
        t,
        scheduler,
        noise=noise,
        input_perturbation=gamma,
        perturbation_noise=xi,
        backend=backend,
    )
    assert torch.equal(x_t, noisy)
    mask = None
    if args.masked_loss:
        mask = F.interpolate(batch["alpha_masks"][:, None], size=latents.shape[2:], mode="area")
    weighting, options = ("min_snr", {"gamma": 5.0}) if args.min_snr_gamma else ("constant", {})
    got = _step(
        model,
        x_t,
        lambda pred: debias.fused_loss(
            pred,
            noise,
            t,
            scheduler,
            weighting,
            "epsilon",
            loss=loss_type,
            huber_c=get_huber_threshold_if_needed(args, t, scheduler),
            mask=mask,
            sample_weight=batch["loss_weights"],
            backend=backend,
            **options,
        ),
    )
    _same_step(got, want)


# ---- kohya-ss/musubi-tuner @ 30c658c4f4b0bf05038b3346eff9670259b10fc7 -------------------------


class MusubiFlowMatchDiscreteScheduler:
    """musubi-tuner src/musubi_tuner/modules/scheduling_flow_match_discrete.py
    FlowMatchDiscreteScheduler.__init__, the tables training reads (the trainer builds it with
    shift=args.discrete_flow_shift, reverse=True; __init__ does not apply the shift)."""

    def __init__(self, num_train_timesteps=1000, shift=1.0, reverse=True):
        self.config = SimpleNamespace(num_train_timesteps=num_train_timesteps)
        sigmas = torch.linspace(1, 0, num_train_timesteps + 1)
        if not reverse:
            sigmas = sigmas.flip(0)
        self.sigmas = sigmas
        self.timesteps = (sigmas[:-1] * num_train_timesteps).to(dtype=torch.float32)


def musubi_compute_density_for_timestep_sampling(
    weighting_scheme, batch_size, logit_mean=None, logit_std=None, mode_scale=None
):
    """musubi-tuner src/musubi_tuner/training/timesteps.py compute_density_for_timestep_sampling."""
    if weighting_scheme == "logit_normal":
        u = torch.normal(mean=logit_mean, std=logit_std, size=(batch_size,), device="cpu")
        u = torch.nn.functional.sigmoid(u)
    elif weighting_scheme == "mode":
        u = torch.rand(size=(batch_size,), device="cpu")
        u = 1 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    else:
        u = torch.rand(size=(batch_size,), device="cpu")
    return u


def musubi_get_sigmas(noise_scheduler, timesteps, device, n_dim=4, dtype=torch.float32):
    """musubi-tuner src/musubi_tuner/training/timesteps.py get_sigmas (exact match, else the
    nearest table entry)."""
    sigmas = noise_scheduler.sigmas.to(device=device, dtype=dtype)
    schedule_timesteps = noise_scheduler.timesteps.to(device)
    timesteps = timesteps.to(device)
    if any([(schedule_timesteps == t).sum() == 0 for t in timesteps]):
        step_indices = [torch.argmin(torch.abs(schedule_timesteps - t)).item() for t in timesteps]
    else:
        step_indices = [(schedule_timesteps == t).nonzero().item() for t in timesteps]
    sigma = sigmas[step_indices].flatten()
    while len(sigma.shape) < n_dim:
        sigma = sigma.unsqueeze(-1)
    return sigma


def musubi_compute_loss_weighting_for_sd3(
    weighting_scheme, noise_scheduler, timesteps, device, dtype
):
    """musubi-tuner src/musubi_tuner/training/timesteps.py compute_loss_weighting_for_sd3."""
    if weighting_scheme == "sigma_sqrt" or weighting_scheme == "cosmap":
        sigmas = musubi_get_sigmas(noise_scheduler, timesteps, device, n_dim=5, dtype=dtype)
        if weighting_scheme == "sigma_sqrt":
            weighting = (sigmas**-2.0).float()
        else:
            bot = 1 - 2 * sigmas + 2 * sigmas**2
            weighting = 2 / (math.pi * bot)
    else:
        weighting = None
    return weighting


def musubi_get_noisy_model_input_and_timesteps(
    args, noise, latents, noise_scheduler, device, dtype
):
    """musubi-tuner src/musubi_tuner/training/trainer_base.py
    NetworkTrainer.get_noisy_model_input_and_timesteps: the "sigma" branch and the uniform /
    sigmoid / shift / flux_shift branches of compute_sampling_timesteps (batch["timesteps"]
    None, no --min_timestep / --max_timestep, no --preserve_distribution_shape), as written;
    it also returns t, the sigma each sample was noised with."""
    batch_size = noise.shape[0]
    if args.timestep_sampling in ("uniform", "sigmoid", "shift", "flux_shift"):
        if args.timestep_sampling == "uniform" or args.timestep_sampling == "sigmoid":
            if args.timestep_sampling == "sigmoid":
                t = torch.sigmoid(args.sigmoid_scale * torch.randn((batch_size,), device=device))
            else:
                t = torch.rand((batch_size,), device=device)
        else:
            if args.timestep_sampling == "shift":
                shift = args.discrete_flow_shift
            else:
                h, w = latents.shape[-2:]
                mu = get_lin_function(y1=0.5, y2=1.15)((h // 2) * (w // 2))
                shift = math.exp(mu)
            logits_norm = torch.randn((batch_size,), device=device)
            logits_norm = logits_norm * args.sigmoid_scale
            t = logits_norm.sigmoid()
            t = (t * shift) / (1 + (shift - 1) * t)
        t_min = args.min_timestep if args.min_timestep is not None else 0
        t_max = args.max_timestep if args.max_timestep is not None else 1000.0
        t_min /= 1000.0
        t_max /= 1000.0
        t = t * (t_max - t_min) + t_min
        sigma = t
        timesteps = t * 1000.0
        t = t.view(-1, 1, 1, 1, 1) if latents.ndim == 5 else t.view(-1, 1, 1, 1)
        noisy_model_input = (1 - t) * latents + t * noise
        timesteps += 1  # 1 to 1000
    else:
        u = musubi_compute_density_for_timestep_sampling(
            weighting_scheme=args.weighting_scheme,
            batch_size=batch_size,
            logit_mean=args.logit_mean,
            logit_std=args.logit_std,
            mode_scale=args.mode_scale,
        )
        t_min = args.min_timestep if args.min_timestep is not None else 0
        t_max = args.max_timestep if args.max_timestep is not None else 1000
        indices = (u * (t_max - t_min) + t_min).long()
        timesteps = noise_scheduler.timesteps[indices].to(device=device)
        sigmas = musubi_get_sigmas(
            noise_scheduler, timesteps, device, n_dim=latents.ndim, dtype=dtype
        )
        noisy_model_input = sigmas * noise + (1.0 - sigmas) * latents
        sigma = sigmas.flatten()
    return noisy_model_input, timesteps, sigma


def musubi_compute_loss(args, pred, target, timesteps, noise_scheduler, dit_dtype, network_dtype):
    """musubi-tuner src/musubi_tuner/training/trainer_base.py NetworkTrainer.compute_loss (the
    target is call_dit's noise - latents, e.g. wan_train_network.py)."""
    weighting = musubi_compute_loss_weighting_for_sd3(
        args.weighting_scheme, noise_scheduler, timesteps, timesteps.device, dit_dtype
    )
    loss = torch.nn.functional.mse_loss(pred.to(network_dtype), target, reduction="none")
    if weighting is not None:
        loss = loss * weighting
    return loss.mean()


def _musubi_args(**kw):
    """musubi-tuner's parser defaults (training/parser_common.py) for the flags read here."""
    args = SimpleNamespace(
        timestep_sampling="sigma",
        discrete_flow_shift=1.0,
        sigmoid_scale=1.0,
        weighting_scheme="none",
        logit_mean=0.0,
        logit_std=1.0,
        mode_scale=1.29,
        min_timestep=None,
        max_timestep=None,
    )
    for k, v in kw.items():
        assert hasattr(args, k), k
        setattr(args, k, v)
    return args


MUSUBI_SAMPLINGS = [
    pytest.param({}, id="sigma"),
    pytest.param({"weighting_scheme": "logit_normal", "logit_mean": -0.3}, id="sigma-logit_normal"),
    pytest.param({"weighting_scheme": "cosmap"}, id="sigma-cosmap"),
    pytest.param({"timestep_sampling": "uniform"}, id="uniform"),
    pytest.param({"timestep_sampling": "sigmoid", "sigmoid_scale": 1.5}, id="sigmoid"),
    pytest.param({"timestep_sampling": "shift", "discrete_flow_shift": 3.0}, id="shift-wan"),
    pytest.param({"timestep_sampling": "shift", "discrete_flow_shift": 7.0}, id="shift-hunyuan"),
    pytest.param(
        {"timestep_sampling": "shift", "discrete_flow_shift": 3.0, "weighting_scheme": "cosmap"},
        id="shift-cosmap",
    ),
    pytest.param({"timestep_sampling": "flux_shift"}, id="flux_shift"),
]


@pytest.mark.parametrize("sampling", MUSUBI_SAMPLINGS)
def test_musubi_tuner_video_step(backend, sampling):
    """[B, C, F, H, W] video latents (Wan, HunyuanVideo): the trainer's sigmas (equal to
    sample_timesteps' for uniform / sigmoid / shift; its flux_shift rounds otherwise and its
    "sigma" default reads its own table: those are passed as t), x_t bit for bit, its
    target noise - latents and its loss, with its --weighting_scheme."""
    args = _musubi_args(**sampling)
    scheduler = MusubiFlowMatchDiscreteScheduler(shift=args.discrete_flow_shift)
    latents = _latents((B, 4, 5, 6, 6))
    model = _model("video", 4)

    torch.manual_seed(8)
    noise = torch.randn_like(latents)
    noisy, timesteps, t_want = musubi_get_noisy_model_input_and_timesteps(
        args, noise, latents, scheduler, "cpu", torch.float32
    )
    want = _step(
        model,
        noisy,
        lambda pred: musubi_compute_loss(
            args, pred, noise - latents, timesteps, scheduler, torch.float32, torch.float32
        ),
    )

    torch.manual_seed(8)
    noise = torch.randn_like(latents)
    scheme = args.timestep_sampling
    if scheme in ("uniform", "sigmoid", "shift"):
        kw = {"sigmoid_scale": args.sigmoid_scale} if scheme != "uniform" else {}
        if scheme == "shift":
            kw["shift"] = args.discrete_flow_shift
        t = debias.sample_timesteps(B, "flow", scheme, **kw)
        assert torch.equal(t, t_want)
    else:
        t = t_want  # the trainer's own sigmas
        if scheme == "flux_shift":  # sd-scripts' time_shift, rounded another way
            torch.manual_seed(8)
            torch.randn_like(latents)
            h, w = latents.shape[-2:]
            seq_len = (h // 2) * (w // 2)
            _close(
                "flux_shift", debias.sample_timesteps(B, "flow", scheme, seq_len=seq_len), t, 1e-6
            )
    x_t, _ = debias.add_noise(latents, t, "flow", noise=noise, backend=backend)
    assert torch.equal(x_t, noisy)
    weighting, sample_weight = "none", None
    if args.weighting_scheme in ("cosmap", "sigma_sqrt"):
        if scheme == "sigma":  # the weight at the sample's own sigma
            weighting = args.weighting_scheme
        else:
            # the trainer looks its weight up at timesteps t * 1000 + 1, which are not in its
            # table: the nearest entry's sigma, not t; the user passes that weight as is
            sample_weight = musubi_compute_loss_weighting_for_sd3(
                args.weighting_scheme, scheduler, timesteps, "cpu", torch.float32
            ).flatten()
    got = _step(
        model,
        x_t,
        lambda pred: debias.fused_loss(
            pred,
            noise,
            t,
            "flow",
            weighting,
            "flow",
            x0=latents,
            sample_weight=sample_weight,
            backend=backend,
        ),
    )
    _same_step(got, want)


@pytest.mark.parametrize("scheme", ["shift", "sigma"])
def test_musubi_tuner_bf16_latents_within_one_step(backend, scheme):
    """bf16 latents and noise: the trainer's float32 t promotes x_t to float32, which call_dit
    rounds to the network's bf16; debias rounds in bf16 directly: within one bf16 step."""
    args = _musubi_args(timestep_sampling=scheme, discrete_flow_shift=3.0)
    scheduler = MusubiFlowMatchDiscreteScheduler(shift=3.0)
    latents = _latents((B, 4, 5, 6, 6), dtype=torch.bfloat16)
    torch.manual_seed(6)
    noise = torch.randn_like(latents)
    noisy, _, t = musubi_get_noisy_model_input_and_timesteps(
        args, noise, latents, scheduler, "cpu", torch.float32
    )
    want = noisy.to(torch.bfloat16)
    x_t, _ = debias.add_noise(latents, t, "flow", noise=noise, backend=backend)
    assert x_t.dtype == torch.bfloat16
    step = torch.finfo(torch.bfloat16).eps * (latents.float().abs() + noise.float().abs())
    assert ((x_t.float() - want.float()).abs() <= step).all()


# ---- Nerogar/OneTrainer @ 23df3832e8f213d64c337e39f9365ba46e99fed0 ----------------------------


def ot_get_timestep_discrete(num_train_timesteps, generator, batch_size, config, shift):
    """OneTrainer modules/modelSetup/mixin/ModelSetupNoiseMixin.py _get_timestep_discrete, the
    training (not deterministic) TimestepDistribution.UNIFORM branch, as written."""
    min_timestep = int(num_train_timesteps * config.min_noising_strength)
    max_timestep = int(num_train_timesteps * config.max_noising_strength)
    timestep = min_timestep + (max_timestep - min_timestep) * torch.rand(
        batch_size, generator=generator, device=generator.device
    )
    timestep = (
        num_train_timesteps * shift * timestep / ((shift - 1) * timestep + num_train_timesteps)
    )
    return timestep.int()


def ot_add_noise_discrete(scaled_latent_image, latent_noise, timestep, timesteps):
    """OneTrainer modules/modelSetup/mixin/ModelSetupFlowMatchingMixin.py _add_noise_discrete
    (its cached sigma tables built on each call)."""
    num_timesteps = timesteps.shape[-1]
    all_timesteps = torch.arange(
        start=1, end=num_timesteps + 1, step=1, dtype=torch.int32, device=scaled_latent_image.device
    )
    sigma_table = all_timesteps / num_timesteps
    one_minus_sigma_table = 1.0 - sigma_table
    orig_dtype = scaled_latent_image.dtype
    sigmas = sigma_table[timestep]
    one_minus_sigmas = one_minus_sigma_table[timestep]
    while sigmas.dim() < scaled_latent_image.dim():
        sigmas = sigmas.unsqueeze(-1)
        one_minus_sigmas = one_minus_sigmas.unsqueeze(-1)
    scaled_noisy_latent_image = (
        latent_noise.to(dtype=sigmas.dtype) * sigmas
        + scaled_latent_image.to(dtype=sigmas.dtype) * one_minus_sigmas
    )
    return scaled_noisy_latent_image.to(dtype=orig_dtype), sigmas


def ot_masked_losses(losses, mask, unmasked_weight, normalize_masked_area_loss):
    """OneTrainer modules/util/loss/masked_loss.py masked_losses (masked_losses_with_prior
    without prior_losses is the same)."""
    clamped_mask = torch.clamp(mask, unmasked_weight, 1)
    losses *= clamped_mask
    if normalize_masked_area_loss:
        losses = losses / clamped_mask.mean(dim=(1, 2, 3), keepdim=True)
    return losses


def ot_flow_matching_losses(batch, data, config, num_timesteps=1000):
    """OneTrainer modules/modelSetup/mixin/ModelSetupDiffusionLossMixin.py
    _flow_matching_losses with __masked_losses / __unmasked_losses (the MSE and MAE terms, no
    prior), then BaseFluxSetup.calculate_loss's .mean(); LossScaler.NONE (scale 1)."""
    loss_weight = batch["loss_weight"]
    all_timesteps = torch.arange(start=1, end=num_timesteps + 1, step=1, dtype=torch.int32)
    sigmas = all_timesteps / num_timesteps
    mean_dim = list(range(1, data["predicted"].ndim))
    pred, target = data["predicted"].to(dtype=torch.float32), data["target"].to(dtype=torch.float32)
    losses = 0
    terms = ((config.mse_strength, F.mse_loss), (config.mae_strength, F.l1_loss))
    for strength, fn in terms:
        if strength == 0:
            continue
        part = fn(pred, target, reduction="none")
        if config.masked_training:
            part = ot_masked_losses(
                part,
                batch["latent_mask"].to(dtype=torch.float32),
                config.unmasked_weight,
                config.normalize_masked_area_loss,
            )
        losses += part.mean(mean_dim) * strength
    losses = losses * 1  # config.loss_scaler.get_scale(...) for LossScaler.NONE
    losses *= loss_weight
    if config.loss_weight_fn == "SIGMA":
        losses *= sigmas[data["timestep"]]
    return losses.mean()


def _ot_config(**kw):
    """OneTrainer's TrainConfig defaults for the fields read here."""
    config = SimpleNamespace(
        min_noising_strength=0.0,
        max_noising_strength=1.0,
        timestep_shift=1.0,
        mse_strength=1.0,
        mae_strength=0.0,
        masked_training=False,
        unmasked_weight=0.1,
        normalize_masked_area_loss=False,
        loss_weight_fn="CONSTANT",
    )
    for k, v in kw.items():
        assert hasattr(config, k), k
        setattr(config, k, v)
    return config


def _onetrainer_steps(config, latents, latent_mask, debias_mask, backend, kind, per_column=False):
    """One step of OneTrainer's flow-matching setups (BaseFluxSetup.predict for images,
    BaseHunyuanVideoSetup.predict for video) and the same step through debias. per_column:
    the user divides the clamped mask by its mean over dims (1, 2, 3), as OneTrainer does,
    instead of passing mask_normalize."""
    model = _model(kind, latents.shape[1])
    loss_weight = torch.tensor([1.0, 0.7, 1.6])
    table = torch.zeros(1000)  # model.noise_scheduler.timesteps: its length is read

    generator = torch.Generator().manual_seed(21)
    noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype)  # _create_noise
    timestep = ot_get_timestep_discrete(1000, generator, B, config, config.timestep_shift)
    noisy, sigma = ot_add_noise_discrete(latents, noise, timestep, table)
    batch = {"loss_weight": loss_weight, "latent_mask": latent_mask}
    want = _step(
        model,
        noisy,
        lambda pred: ot_flow_matching_losses(
            batch, {"predicted": pred, "target": noise - latents, "timestep": timestep}, config
        ),
    )

    sigma = sigma.flatten()  # the user's sigma: (timestep + 1) / 1000
    x_t, _ = debias.add_noise(latents, sigma, "flow", noise=noise, backend=backend)
    assert torch.equal(x_t, noisy)
    sample_weight = loss_weight * (sigma if config.loss_weight_fn == "SIGMA" else 1.0)
    mask = None
    if config.masked_training:
        mask = torch.clamp(debias_mask, config.unmasked_weight, 1)
        if per_column:
            mask = mask / mask.mean(dim=(1, 2, 3), keepdim=True)

    def loss_of(pred):
        total = 0
        for strength, kind in ((config.mse_strength, "l2"), (config.mae_strength, "l1")):
            if strength:
                total = total + debias.fused_loss(
                    pred,
                    noise,
                    sigma,
                    "flow",
                    "none",
                    "flow",
                    x0=latents,
                    loss=kind,
                    mask=mask,
                    mask_normalize=config.normalize_masked_area_loss and not per_column,
                    sample_weight=sample_weight * strength,
                    backend=backend,
                )
        return total

    return _step(model, x_t, loss_of), want


@pytest.mark.parametrize(
    "options",
    [
        pytest.param({}, id="mse"),
        pytest.param({"timestep_shift": 3.0, "loss_weight_fn": "SIGMA"}, id="shift3-sigma"),
        pytest.param({"masked_training": True}, id="masked"),
        pytest.param(
            {"masked_training": True, "normalize_masked_area_loss": True}, id="masked-norm"
        ),
        pytest.param(
            {
                "masked_training": True,
                "normalize_masked_area_loss": True,
                "unmasked_weight": 0.0,
                "mse_strength": 0.6,
                "mae_strength": 0.4,
            },
            id="masked-norm-mse+mae",
        ),
    ],
)
def test_onetrainer_flux_step(backend, options):
    """OneTrainer's flow-matching loss on [B, C, H, W] latents: masked training is the mask
    clamp(latent_mask, unmasked_weight, 1) (the user clamps it), times the elementwise loss,
    with normalize_masked_area_loss dividing by the clamped mask's mean over the sample: that
    is mask_normalize=True. MSE + MAE strengths are two calls; loss_weight and the SIGMA loss
    weight are sample_weight."""
    config = _ot_config(**options)
    latents = _latents((B, 4, 8, 6))
    latent_mask = _mask((B, 1, 8, 6))
    got, want = _onetrainer_steps(config, latents, latent_mask, latent_mask, backend, "image")
    _same_step(got, want)


@pytest.mark.parametrize("normalize", [False, True], ids=["masked", "masked-norm"])
def test_onetrainer_video_frame_mask(backend, normalize):
    """OneTrainer's HunyuanVideo setup on [B, C, F, H, W] latents with a frame mask (the
    latent_mask [B, 1, F, H, W] constant over each frame): its normalisation takes the mask's
    mean over dims (1, 2, 3) only, which for a frame mask is the sample's mask mean, so debias'
    [B, 1, F, 1, 1] mask with mask_normalize gives its loss."""
    config = _ot_config(masked_training=True, normalize_masked_area_loss=normalize)
    latents = _latents((B, 4, 5, 6, 6))
    frames = _mask((B, 1, 5, 1, 1), seed=4)
    latent_mask = frames.expand(B, 1, 5, 6, 6).contiguous()
    got, want = _onetrainer_steps(config, latents, latent_mask, frames, backend, "video")
    _same_step(got, want)


def test_onetrainer_video_spatial_mask_normalises_per_column(backend):
    """A [B, 1, F, H, W] latent_mask that varies within a frame: OneTrainer's mean over dims
    (1, 2, 3) leaves W, so each column w is divided by the mask's mean over (F, H) in it. That
    is neither mask_normalize option (its loss differs), and it is the mask divided by that
    mean, passed without mask_normalize."""
    config = _ot_config(masked_training=True, normalize_masked_area_loss=True)
    latents = _latents((B, 4, 5, 6, 6))
    latent_mask = _mask((B, 1, 5, 6, 6), seed=6)
    got, want = _onetrainer_steps(
        config, latents, latent_mask, latent_mask, backend, "video", per_column=True
    )
    _same_step(got, want)
    plain, _ = _onetrainer_steps(config, latents, latent_mask, latent_mask, backend, "video")
    assert (plain[0] - want[0]).abs() > 1e-3 * want[0].abs()


# ---- huggingface/diffusers @ 58eb52c0803ea9af3abec60841c2a093bdf1f951 -------------------------


def qwen_pack_latents(latents, batch_size, num_channels_latents, height, width):
    """diffusers src/diffusers/pipelines/qwenimage/pipeline_qwenimage.py
    QwenImagePipeline._pack_latents."""
    latents = latents.view(batch_size, num_channels_latents, height // 2, 2, width // 2, 2)
    latents = latents.permute(0, 2, 4, 1, 3, 5)
    latents = latents.reshape(batch_size, (height // 2) * (width // 2), num_channels_latents * 4)
    return latents


def qwen_unpack_latents(latents, height, width, vae_scale_factor):
    """diffusers src/diffusers/pipelines/qwenimage/pipeline_qwenimage.py
    QwenImagePipeline._unpack_latents."""
    batch_size, _, channels = latents.shape
    height = 2 * (int(height) // (vae_scale_factor * 2))
    width = 2 * (int(width) // (vae_scale_factor * 2))
    latents = latents.view(batch_size, height // 2, width // 2, channels // 4, 2, 2)
    latents = latents.permute(0, 3, 1, 4, 2, 5)
    latents = latents.reshape(batch_size, channels // (2 * 2), 1, height, width)
    return latents


def flux2_pack_latents(latents):
    """diffusers src/diffusers/pipelines/flux2/pipeline_flux2.py Flux2Pipeline._pack_latents."""
    batch_size, num_channels, height, width = latents.shape
    return latents.reshape(batch_size, num_channels, height * width).permute(0, 2, 1)


def flux2_prepare_latent_ids(latents):
    """diffusers src/diffusers/pipelines/flux2/pipeline_flux2.py
    Flux2Pipeline._prepare_latent_ids."""
    batch_size, _, height, width = latents.shape
    t = torch.arange(1)
    h = torch.arange(height)
    w = torch.arange(width)
    l = torch.arange(1)
    latent_ids = torch.cartesian_prod(t, h, w, l)
    return latent_ids.unsqueeze(0).expand(batch_size, -1, -1)


def flux2_unpack_latents_with_ids(x, x_ids):
    """diffusers src/diffusers/pipelines/flux2/pipeline_flux2.py
    Flux2Pipeline._unpack_latents_with_ids."""
    x_list = []
    for data, pos in zip(x, x_ids, strict=True):
        _, ch = data.shape
        h_ids = pos[:, 1].to(torch.int64)
        w_ids = pos[:, 2].to(torch.int64)
        h = torch.max(h_ids) + 1
        w = torch.max(w_ids) + 1
        flat_ids = h_ids * w + w_ids
        out = torch.zeros((h * w, ch), device=data.device, dtype=data.dtype)
        out.scatter_(0, flat_ids.unsqueeze(1).expand(-1, ch), data)
        out = out.view(h, w, ch).permute(2, 0, 1)
        x_list.append(out)
    return torch.stack(x_list, dim=0)


def dreambooth_loss(model_pred, target, weighting):
    """The loss lines of train_dreambooth_lora_qwen_image.py and train_dreambooth_lora_flux2.py
    (examples/dreambooth; no prior preservation)."""
    loss = torch.mean(
        (weighting.float() * (model_pred.float() - target.float()) ** 2).reshape(
            target.shape[0], -1
        ),
        1,
    )
    return loss.mean()


SCHEDULERS = [
    pytest.param({"shift": 3.0, "use_dynamic_shifting": True}, id="dynamic"),
    pytest.param({"shift": 3.0}, id="shift3"),
]
SCHEMES = ["logit_normal", "mode", "none", "cosmap", "sigma_sqrt"]
DENSITY = {"logit_mean": 0.2, "logit_std": 1.1, "mode_scale": 1.29}


def _dreambooth_draw(scheduler, scheme, model_input):
    """The scripts' draw and noising lines (diffusers' compute_density_for_timestep_sampling,
    called as is; get_sigmas is the scripts' closure, tests/conftest.py)."""
    noise = torch.randn_like(model_input)
    u = training_utils.compute_density_for_timestep_sampling(
        scheme, model_input.shape[0], **DENSITY
    )
    indices = (u * scheduler.config.num_train_timesteps).long()
    timesteps = scheduler.timesteps[indices].to(device=model_input.device)
    sigmas = get_sigmas(scheduler, timesteps, n_dim=model_input.ndim, dtype=model_input.dtype)
    noisy_model_input = (1.0 - sigmas) * model_input + sigmas * noise
    return noise, timesteps, sigmas, noisy_model_input


def _debias_draw(scheduler, scheme, model_input, backend):
    noise = torch.randn_like(model_input)
    t = debias.sample_timesteps(model_input.shape[0], scheduler, scheme, **DENSITY)
    x_t, _ = debias.add_noise(model_input, t, scheduler, noise=noise, backend=backend)
    return noise, t, x_t


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("config", SCHEDULERS)
def test_diffusers_qwen_image_step(backend, config, scheme):
    """train_dreambooth_lora_qwen_image.py: [B, C, 1, H, W] latents, the transformer on packed
    2x2 patches [B, N, 4C], the loss on the unpacked prediction with --weighting_scheme; debias
    on the unpacked prediction, and on the packed tokens against packed targets (the same loss:
    packing only permutes)."""
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, **config)
    model_input = _latents((B, 4, 1, 6, 8))
    C, H, W = 4, 6, 8
    model = _model("tokens", 4 * C)

    def run(x_t):  # the script's permute, pack, transformer, unpack
        packed = qwen_pack_latents(x_t.permute(0, 2, 1, 3, 4), B, C, H, W)
        return packed, lambda out: qwen_unpack_latents(out, H * 8, W * 8, 8)

    torch.manual_seed(13)
    noise, timesteps, sigmas, noisy = _dreambooth_draw(scheduler, scheme, model_input)
    packed, unpack = run(noisy)
    weighting = training_utils.compute_loss_weighting_for_sd3(scheme, sigmas)
    want = _step(
        model, packed, lambda out: dreambooth_loss(unpack(out), noise - model_input, weighting)
    )

    torch.manual_seed(13)
    noise, t, x_t = _debias_draw(scheduler, scheme, model_input, backend)
    assert torch.equal(t, timesteps) and torch.equal(x_t, noisy)
    kw = {"x0": model_input, "backend": backend}
    packed, unpack = run(x_t)
    got = _step(
        model,
        packed,
        lambda out: debias.fused_loss(unpack(out), noise, t, scheduler, scheme, "flow", **kw),
    )
    _same_step(got, want)

    def pack(x):
        return qwen_pack_latents(x.permute(0, 2, 1, 3, 4), B, C, H, W)

    kw["x0"] = pack(model_input)
    got = _step(
        model,
        packed,
        lambda out: debias.fused_loss(out, pack(noise), t, scheduler, scheme, "flow", **kw),
    )
    _same_step(got, want)


def test_diffusers_qwen_image_bf16(backend):
    """--mixed_precision bf16: the script casts the latents to bf16 and takes its sigmas in bf16,
    so x_t is bf16 arithmetic; debias' bf16 x_t is within one bf16 step of it."""
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    model_input = _latents((B, 4, 1, 6, 8), dtype=torch.bfloat16)
    torch.manual_seed(14)
    noise, _, _, noisy = _dreambooth_draw(scheduler, "logit_normal", model_input)
    torch.manual_seed(14)
    _, _, x_t = _debias_draw(scheduler, "logit_normal", model_input, backend)
    assert x_t.dtype == noisy.dtype == torch.bfloat16
    step = torch.finfo(torch.bfloat16).eps * (model_input.float().abs() + noise.float().abs())
    assert ((x_t.float() - noisy.float()).abs() <= step).all()


@pytest.mark.parametrize("scheme", ["logit_normal", "cosmap"])
@pytest.mark.parametrize("config", SCHEDULERS)
def test_diffusers_flux2_step(backend, config, scheme):
    """train_dreambooth_lora_flux2.py: [B, C, H, W] latents, the transformer on the packed
    tokens [B, H*W, C], unpacked by position ids, its loss; debias on the unpacked prediction
    and on the tokens."""
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, **config)
    model_input = _latents((B, 8, 5, 7))
    ids = flux2_prepare_latent_ids(model_input)
    model = _model("tokens", 8)

    torch.manual_seed(15)
    noise, timesteps, sigmas, noisy = _dreambooth_draw(scheduler, scheme, model_input)
    weighting = training_utils.compute_loss_weighting_for_sd3(scheme, sigmas)
    want = _step(
        model,
        flux2_pack_latents(noisy),
        lambda out: dreambooth_loss(
            flux2_unpack_latents_with_ids(out, ids), noise - model_input, weighting
        ),
    )

    torch.manual_seed(15)
    noise, t, x_t = _debias_draw(scheduler, scheme, model_input, backend)
    assert torch.equal(t, timesteps) and torch.equal(x_t, noisy)
    got = _step(
        model,
        flux2_pack_latents(x_t),
        lambda out: debias.fused_loss(
            flux2_unpack_latents_with_ids(out, ids),
            noise,
            t,
            scheduler,
            scheme,
            "flow",
            x0=model_input,
            backend=backend,
        ),
    )
    _same_step(got, want)
    got = _step(
        model,
        flux2_pack_latents(x_t),
        lambda out: debias.fused_loss(
            out,
            flux2_pack_latents(noise),
            t,
            scheduler,
            scheme,
            "flow",
            x0=flux2_pack_latents(model_input),
            backend=backend,
        ),
    )
    _same_step(got, want)


@pytest.mark.parametrize("normalize", [False, True], ids=["masked", "masked-norm"])
def test_packed_token_mask_equals_the_latent_mask(backend, normalize):
    """The scripts above have no loss mask; for a trainer that masks packed tokens, a [B, N, 1]
    token mask on the tokens gives the loss of the [B, 1, H, W] mask on the latents (and the
    masked mean written out), with the gradient packed alike."""
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    model_input = _latents((B, 8, 5, 7))
    torch.manual_seed(16)
    noise, t, _ = _debias_draw(scheduler, "logit_normal", model_input, backend)
    pred = _latents((B, 8, 5, 7), seed=3)
    latent_mask = _mask((B, 1, 5, 7))
    token_mask = flux2_pack_latents(latent_mask)  # [B, N, 1]
    kw = {"mask_normalize": normalize, "backend": backend}

    a = pred.clone().requires_grad_()
    la = debias.fused_loss(
        a, noise, t, scheduler, "none", "flow", x0=model_input, mask=latent_mask, **kw
    )
    la.backward()
    b = flux2_pack_latents(pred).detach().requires_grad_()
    lb = debias.fused_loss(
        b,
        flux2_pack_latents(noise),
        t,
        scheduler,
        "none",
        "flow",
        x0=flux2_pack_latents(model_input),
        mask=token_mask,
        **kw,
    )
    lb.backward()
    c = pred.clone().requires_grad_()
    sq = (c - (noise - model_input)) ** 2 * latent_mask
    per = sq.sum((1, 2, 3)) / (
        latent_mask.expand_as(sq).sum((1, 2, 3)) if normalize else sq[0].numel()
    )
    lc = per.mean()
    lc.backward()
    _close("loss packed", lb, la)
    _close("loss written out", la, lc)
    _close("grad", a.grad, c.grad)
    _close("grad packed", b.grad, flux2_pack_latents(a.grad))


@pytest.mark.parametrize("perturbation", [0.1, 0.0], ids=["input_perturbation", "none"])
def test_diffusers_text_to_image_input_perturbation(backend, perturbation):
    """examples/text_to_image/train_text_to_image.py --input_perturbation: new_noise = noise +
    gamma * randn_like(noise); x_t = noise_scheduler.add_noise(latents, new_noise, timesteps)
    (diffusers' own, called as is); the target stays noise; F.mse_loss(..., "mean")."""
    scheduler = DDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000
    )
    latents = _latents((B, 4, 8, 6))
    model = _model("image", 4)

    torch.manual_seed(17)
    noise = torch.randn_like(latents)
    if perturbation:
        new_noise = noise + perturbation * torch.randn_like(noise)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (B,), device=latents.device)
    if perturbation:
        noisy_latents = scheduler.add_noise(latents, new_noise, timesteps)
    else:
        noisy_latents = scheduler.add_noise(latents, noise, timesteps)
    want = _step(
        model, noisy_latents, lambda pred: F.mse_loss(pred.float(), noise.float(), reduction="mean")
    )

    torch.manual_seed(17)
    noise = torch.randn_like(latents)
    xi = torch.randn_like(noise) if perturbation else None
    t = debias.sample_timesteps(B, scheduler, "uniform")
    x_t, _ = debias.add_noise(
        latents,
        t,
        scheduler,
        noise=noise,
        input_perturbation=perturbation or None,
        perturbation_noise=xi,
        backend=backend,
    )
    assert torch.equal(t, timesteps) and torch.equal(x_t, noisy_latents)
    got = _step(
        model,
        x_t,
        lambda pred: debias.fused_loss(
            pred, noise, t, scheduler, "constant", "epsilon", backend=backend
        ),
    )
    _same_step(got, want)


def test_input_perturbation_drawn_inside(backend):
    """perturbation_noise=None: xi comes from debias' own Philox stream (seeded by the
    generator, repeatable), x_t - ((1 - sigma) x0 + sigma noise) is sigma gamma xi with xi
    standard normal, and the returned noise (the target's) is the unperturbed one."""
    x0 = _latents((B, 4, 32, 32))
    noise = _latents((B, 4, 32, 32), seed=5)
    sigma = torch.tensor([0.2, 0.5, 0.9])
    gamma = torch.tensor([0.1, 0.05, 0.2])

    def draw():
        generator = torch.Generator().manual_seed(1)
        return debias.add_noise(
            x0, sigma, "flow", noise, generator, input_perturbation=gamma, backend=backend
        )

    x_t, kept = draw()
    again, _ = draw()
    assert kept is noise and torch.equal(x_t, again)
    plain = (1.0 - _view(sigma, x0)) * x0 + _view(sigma, x0) * noise
    xi = (x_t - plain) / _view(sigma * gamma, x0)
    assert abs(xi.mean().item()) < 0.05 and abs(xi.std().item() - 1) < 0.05


# ---- bad input: one ValueError / TypeError naming the argument -------------------------------


def _bad_calls():
    x0, noise, pred = _latents((B, 4, 6, 6)), _latents((B, 4, 6, 6), 1), _latents((B, 4, 6, 6), 2)
    sigma = torch.tensor([0.2, 0.5, 0.8])

    def loss(**kw):
        return lambda: debias.fused_loss(pred, noise, sigma, "flow", "none", "flow", x0=x0, **kw)

    return [
        ("huber without huber_c", loss(loss="huber"), ValueError, "huber_c"),
        ("smooth_l1 without huber_c", loss(loss="smooth_l1"), ValueError, "huber_c"),
        ("huber_c = 0", loss(loss="huber", huber_c=0.0), ValueError, "huber_c"),
        (
            "huber_c < 0 in a tensor",
            loss(loss="huber", huber_c=torch.tensor([0.1, -0.1, 0.1])),
            ValueError,
            "huber_c",
        ),
        ("unknown loss", loss(loss="l3"), ValueError, "loss"),
        ("mask not broadcasting", loss(mask=torch.ones(B, 2, 6, 6)), ValueError, "mask"),
        ("negative mask", loss(mask=-torch.ones(B, 1, 6, 6)), ValueError, "mask"),
        (
            "sample_weight length",
            loss(sample_weight=torch.ones(B + 1)),
            ValueError,
            "sample_weight",
        ),
        (
            "sigma above 1",
            lambda: debias.fused_loss(pred, noise, sigma + 0.5, "flow", "none", "flow", x0=x0),
            ValueError,
            "sigma",
        ),
        (
            "sigma below 0",
            lambda: debias.add_noise(x0, sigma - 0.5, "flow", noise=noise),
            ValueError,
            "sigma",
        ),
        (
            "perturbation_noise shape",
            lambda: debias.add_noise(
                x0,
                sigma,
                "flow",
                noise=noise,
                input_perturbation=0.1,
                perturbation_noise=noise[:, :2],
            ),
            ValueError,
            "perturbation_noise",
        ),
        (
            "negative input_perturbation",
            lambda: debias.add_noise(x0, sigma, "flow", noise=noise, input_perturbation=-0.1),
            ValueError,
            "input_perturbation",
        ),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls())), ids=[c[0] for c in _bad_calls()])
def test_bad_input_names_the_argument(case):
    _, call, err, name = _bad_calls()[case]
    with pytest.raises(err, match=name):
        call()
