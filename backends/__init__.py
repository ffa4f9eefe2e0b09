"""Backends: kernels for moec's canonical ops. `torch_backend` runs on every device."""

BACKENDS = ("torch",)


def resolve_backend(name: str, device) -> str:
    """'auto' picks the best backend available for the device."""
    if name == "auto":
        return "torch"
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; available: {', '.join(BACKENDS)} (or 'auto')")
    return name
