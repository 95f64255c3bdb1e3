"""Built-in plugin dalle_clip: the ``clip`` reranker on open_clip."""

from dalle_framework import hookimpl

from .reranker import ClipReranker, read_state_dict
from .retrieval import retrieval_accuracy

__all__ = ["ClipReranker", "read_state_dict", "retrieval_accuracy"]


@hookimpl
def dalle_register_rerankers(registry):
    registry.register(ClipReranker, name="clip")
