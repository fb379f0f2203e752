"""Exchange formats with the wider Stable Diffusion ecosystem (A1111, ComfyUI, original LDM)."""
