"""Built-in plugin dalle_clip: the ``clip`` reranker on open_clip."""

from dalle_framework import hookimpl

from .reranker import ClipReranker, read_state_dict

__all__ = ["ClipReranker", "read_state_dict"]


@hookimpl
def dalle_register_rerankers(registry):
    registry.register(ClipReranker, name="clip")
