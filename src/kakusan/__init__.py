__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "Pipeline":  # `from kakusan import Pipeline`, imported on first use (torch and friends are heavy)
        from .pipeline import Pipeline

        return Pipeline
    raise AttributeError(f"module 'kakusan' has no attribute {name!r}")
