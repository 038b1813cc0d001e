"""sbg, the Simple Border Gateway for Matrix federation."""

__version__ = "0.2.0"
