"""Optional integrations, imported lazily: diffusers, k-diffusion, flow_matching."""
