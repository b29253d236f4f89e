"""residual-lightning: ResiDual spectral alignment of CLIP-like ViTs with PyTorch Lightning."""

__version__ = "0.1.0"
