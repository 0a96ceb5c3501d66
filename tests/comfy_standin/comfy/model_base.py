"""Stand-in for comfy/model_base.py at Comfy-Org/ComfyUI
a125cd84b054a57729b5eecab930ca9408719832: ``model_sampling`` (the class built from a sampling
base and a prediction mixin) and ``BaseModel._apply_model``."""

import comfy.model_sampling


# model_base.py, model_sampling(model_config, model_type)
def model_sampling(model_type, model_config=None):
    s = comfy.model_sampling.ModelSamplingDiscrete
    if model_type == "EPS":
        c = comfy.model_sampling.EPS
    elif model_type == "V_PREDICTION":
        c = comfy.model_sampling.V_PREDICTION
    elif model_type == "FLOW":
        c = comfy.model_sampling.CONST
        s = comfy.model_sampling.ModelSamplingDiscreteFlow
    elif model_type == "EDM":
        c = comfy.model_sampling.EDM
        s = comfy.model_sampling.ModelSamplingContinuousEDM
    else:
        raise ValueError(model_type)

    class ModelSampling(s, c):
        pass

    return ModelSampling(model_config)


class ModelConfig:
    def __init__(self, **sampling_settings):
        self.sampling_settings = sampling_settings


# model_base.py, class BaseModel: apply_model -> _apply_model
class BaseModel:
    def __init__(self, diffusion_model, model_type, model_config=None):
        self.diffusion_model = diffusion_model
        self.model_sampling = model_sampling(model_type, model_config)

    def apply_model(self, x, t, **kwargs):
        sigma = t
        xc = self.model_sampling.calculate_input(sigma, x)
        dtype = next(self.diffusion_model.parameters()).dtype  # get_dtype()
        xc = xc.to(dtype)
        t = self.model_sampling.timestep(t).float()
        model_output = self.diffusion_model(xc, t, **kwargs).float()
        return self.model_sampling.calculate_denoised(sigma, model_output, x)

    def process_latent_in(self, latent):
        return latent

    def process_latent_out(self, latent):
        return latent
