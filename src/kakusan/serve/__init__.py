"""``kakusan serve``: a local web page over :class:`kakusan.Pipeline` (Gradio, the ``ui`` extra).

:mod:`.service` holds what the page does (models by name, caps, safe uploads, one generation through the
pipeline) and imports no web framework; :mod:`.app` is the Gradio page over it, imported only by ``serve``.
"""

from .service import Limits, ModelPool, Request, Result, Service, default_checkpoints, open_upload


def serve(*args, **kwargs):
    """See :func:`kakusan.serve.app.serve` (imports Gradio)."""
    from .app import serve as _serve

    return _serve(*args, **kwargs)


__all__ = ["Limits", "ModelPool", "Request", "Result", "Service", "default_checkpoints", "open_upload", "serve"]
