"""peflow: an open, runnable training pipeline for Perception Encoder vision encoders."""

__version__ = "0.1.0"
