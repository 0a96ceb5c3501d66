"""Stand-in for comfy/samplers.py at Comfy-Org/ComfyUI
a125cd84b054a57729b5eecab930ca9408719832: the path a SAMPLER takes in SamplerCustom
(``sample`` -> ``CFGGuider.sample`` -> ``inner_sample`` -> ``KSAMPLER.sample`` -> the sampler
function, whose model is ``KSamplerX0Inpaint`` around the guider)."""

# ruff: noqa: B006 - the signatures are ComfyUI's, mutable defaults included

import math

import torch


# samplers.py, cfg_function (no sampler_cfg_function / post-cfg hooks in these tests)
def cfg_function(
    model, cond_pred, uncond_pred, cond_scale, x, timestep, model_options={}, cond=None, uncond=None
):
    return uncond_pred + (cond_pred - uncond_pred) * cond_scale


# samplers.py, sampling_function: uncond skipped at cfg 1 (the cfg1 optimization), then
# calc_cond_batch, reduced here to one apply_model call per cond (a cond is a dict of the
# network's keyword arguments in this stand-in).
def sampling_function(model, x, timestep, uncond, cond, cond_scale, model_options={}, seed=None):
    if math.isclose(cond_scale, 1.0) and not model_options.get("disable_cfg1_optimization", False):
        uncond_ = None
    else:
        uncond_ = uncond
    out = [model.apply_model(x, timestep, **cond), None]
    if uncond_ is not None:
        out[1] = model.apply_model(x, timestep, **uncond_)
    else:
        out[1] = out[0]  # calc_cond_batch leaves a missing cond's output unused at cfg 1
    return cfg_function(model, out[0], out[1], cond_scale, x, timestep, model_options=model_options)


# samplers.py, class KSamplerX0Inpaint (no denoise mask in these tests)
class KSamplerX0Inpaint:
    def __init__(self, model, sigmas):
        self.inner_model = model
        self.sigmas = sigmas

    def __call__(self, x, sigma, denoise_mask, model_options={}, seed=None):
        assert denoise_mask is None
        return self.inner_model(x, sigma, model_options=model_options, seed=seed)


# samplers.py, class Sampler (max_denoise) and class KSAMPLER(Sampler) (sample)
class Sampler:
    def sample(self):
        pass

    def max_denoise(self, model_wrap, sigmas):
        max_sigma = float(model_wrap.inner_model.model_sampling.sigma_max)
        sigma = float(sigmas[0])
        return math.isclose(max_sigma, sigma, rel_tol=1e-05) or sigma > max_sigma


class KSAMPLER(Sampler):
    def __init__(self, sampler_function, extra_options={}, inpaint_options={}):
        self.sampler_function = sampler_function
        self.extra_options = extra_options
        self.inpaint_options = inpaint_options

    def sample(
        self,
        model_wrap,
        sigmas,
        extra_args,
        callback,
        noise,
        latent_image=None,
        denoise_mask=None,
        disable_pbar=False,
    ):
        extra_args["denoise_mask"] = denoise_mask
        model_k = KSamplerX0Inpaint(model_wrap, sigmas)
        model_k.latent_image = latent_image
        model_k.noise = noise

        noise = model_wrap.inner_model.model_sampling.noise_scaling(
            sigmas[0], noise, latent_image, self.max_denoise(model_wrap, sigmas)
        )

        k_callback = None
        total_steps = len(sigmas) - 1
        if callback is not None:
            k_callback = lambda x: callback(x["i"], x["denoised"], x["x"], total_steps)  # noqa: E731

        samples = self.sampler_function(
            model_k,
            noise,
            sigmas,
            extra_args=extra_args,
            callback=k_callback,
            disable=disable_pbar,
            **self.extra_options,
        )
        samples = model_wrap.inner_model.model_sampling.inverse_noise_scaling(sigmas[-1], samples)
        return samples


# samplers.py, class CFGGuider (set_conds, set_cfg, __call__ -> predict_noise, inner_sample,
# outer_sample, sample), without hooks, wrappers and model loading.
class CFGGuider:
    def __init__(self, model_patcher):
        self.model_patcher = model_patcher
        self.model_options = model_patcher.model_options
        self.original_conds = {}
        self.cfg = 1.0

    def set_conds(self, positive, negative):
        self.inner_set_conds({"positive": positive, "negative": negative})

    def set_cfg(self, cfg):
        self.cfg = cfg

    def inner_set_conds(self, conds):
        for k in conds:
            self.original_conds[k] = conds[k]

    def __call__(self, *args, **kwargs):
        return self.predict_noise(*args, **kwargs)

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        return sampling_function(
            self.inner_model,
            x,
            timestep,
            self.conds.get("negative", None),
            self.conds.get("positive", None),
            self.cfg,
            model_options=model_options,
            seed=seed,
        )

    def inner_sample(
        self,
        noise,
        latent_image,
        device,
        sampler,
        sigmas,
        denoise_mask,
        callback,
        disable_pbar,
        seed,
    ):
        if latent_image is not None and torch.count_nonzero(latent_image) > 0:
            latent_image = self.inner_model.process_latent_in(latent_image)
        extra_model_options = dict(self.model_options)
        extra_model_options.setdefault("transformer_options", {})["sample_sigmas"] = sigmas
        extra_args = {"model_options": extra_model_options, "seed": seed}
        samples = sampler.sample(
            self, sigmas, extra_args, callback, noise, latent_image, denoise_mask, disable_pbar
        )
        return self.inner_model.process_latent_out(samples.to(torch.float32))

    def outer_sample(
        self,
        noise,
        latent_image,
        sampler,
        sigmas,
        denoise_mask=None,
        callback=None,
        disable_pbar=False,
        seed=None,
    ):
        self.inner_model = self.model_patcher.model  # prepare_sampling: the patched BaseModel
        device = self.model_patcher.load_device
        noise = noise.to(device)
        latent_image = latent_image.to(device)
        sigmas = sigmas.to(device)
        output = self.inner_sample(
            noise, latent_image, device, sampler, sigmas, denoise_mask, callback, disable_pbar, seed
        )
        del self.inner_model
        return output

    def sample(
        self,
        noise,
        latent_image,
        sampler,
        sigmas,
        denoise_mask=None,
        callback=None,
        disable_pbar=False,
        seed=None,
    ):
        if sigmas.shape[-1] == 0:
            return latent_image
        self.conds = {k: v for k, v in self.original_conds.items()}
        output = self.outer_sample(
            noise, latent_image, sampler, sigmas, denoise_mask, callback, disable_pbar, seed
        )
        del self.conds
        return output


# samplers.py, sample
def sample(
    model,
    noise,
    positive,
    negative,
    cfg,
    device,
    sampler,
    sigmas,
    model_options={},
    latent_image=None,
    denoise_mask=None,
    callback=None,
    disable_pbar=False,
    seed=None,
):
    cfg_guider = CFGGuider(model)
    cfg_guider.set_conds(positive, negative)
    cfg_guider.set_cfg(cfg)
    return cfg_guider.sample(
        noise, latent_image, sampler, sigmas, denoise_mask, callback, disable_pbar, seed
    )


# samplers.py, normal_scheduler (a grid that is not a bns solver's)
def normal_scheduler(model_sampling, steps, sgm=False, floor=False):
    s = model_sampling
    start = s.timestep(s.sigma_max)
    end = s.timestep(s.sigma_min)
    append_zero = True
    if sgm:
        timesteps = torch.linspace(start, end, steps + 1)[:-1]
    else:
        if math.isclose(float(s.sigma(end)), 0, abs_tol=0.00001):
            steps += 1
            append_zero = False
        timesteps = torch.linspace(start, end, steps)
    sigs = []
    for x in range(len(timesteps)):
        ts = timesteps[x]
        sigs.append(float(s.sigma(ts)))
    if append_zero:
        sigs += [0.0]
    return torch.FloatTensor(sigs)
