"""Stand-in for ComfyUI's ``comfy_extras`` (tests only)."""
