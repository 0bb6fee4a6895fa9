"""clmae: Curriculum-Learned Masked Autoencoders (CL-MAE, WACV 2024) at cluster scale."""

__version__ = "0.1.0"
