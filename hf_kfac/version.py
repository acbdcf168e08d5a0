"""Version of the hf_kfac package."""

__version__ = "0.1.0"
