"""Stand-in for comfy_extras/nodes_custom_sampler.py at Comfy-Org/ComfyUI
a125cd84b054a57729b5eecab930ca9408719832: SamplerCustom, the node that takes a SAMPLER and
SIGMAS. ``latent_preview.prepare_callback`` is replaced by a callback with the same signature
``callback(step, x0, x, total_steps)`` that records its calls in ``self.calls``."""

import comfy.sample


# nodes_custom_sampler.py, class Noise_RandomNoise
class Noise_RandomNoise:
    def __init__(self, seed):
        self.seed = seed

    def generate_noise(self, input_latent):
        return comfy.sample.prepare_noise(input_latent["samples"], self.seed)


# nodes_custom_sampler.py, class SamplerCustom (sample)
class SamplerCustom:
    FUNCTION = "sample"
    RETURN_TYPES = ("LATENT", "LATENT")

    def __init__(self):
        self.calls = []

    def sample(
        self, model, add_noise, noise_seed, cfg, positive, negative, sampler, sigmas, latent_image
    ):
        latent = latent_image
        latent_image = latent["samples"]
        latent = latent.copy()
        noise = Noise_RandomNoise(noise_seed).generate_noise(latent)
        x0_output = {}

        def callback(step, x0, x, total_steps):  # latent_preview.prepare_callback, recorded
            x0_output["x0"] = x0
            self.calls.append((step, x0.clone(), x.clone(), total_steps))

        samples = comfy.sample.sample_custom(
            model,
            noise,
            cfg,
            sampler,
            sigmas,
            positive,
            negative,
            latent_image,
            noise_mask=None,
            callback=callback,
            disable_pbar=True,
            seed=noise_seed,
        )
        out = latent.copy()
        out["samples"] = samples
        out_denoised = latent.copy()
        out_denoised["samples"] = model.model.process_latent_out(x0_output["x0"].cpu())
        return (out, out_denoised)
