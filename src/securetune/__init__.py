"""securetune: ML-LR secure fine-tuning (Du et al. 2024) as a reproducible workflow."""

__version__ = "0.1.0"
