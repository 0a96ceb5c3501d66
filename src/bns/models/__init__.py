"""Built-in models: the analytic Gaussian mixture and the reference image models."""
