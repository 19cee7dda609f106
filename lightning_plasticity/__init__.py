"""lightning-plasticity: measure and fix loss of plasticity in any PyTorch Lightning model."""

__version__ = "0.1.0"
