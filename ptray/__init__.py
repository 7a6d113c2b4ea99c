"""ptray: prompt tuning on SuperGLUE, scheduled with Ray Tune and tracked in MLflow."""

__version__ = "0.1.0"
