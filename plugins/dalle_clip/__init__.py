"""Built-in plugin dalle_clip: the ``clip`` reranker on open_clip.

Registered by where it lives, with its params: listing plugins and checking recipes import no torch.
"""

from dalle_framework import hookimpl, lazy_attributes

from .params import ClipParams

__getattr__ = lazy_attributes(__name__, {"ClipReranker": ".reranker", "read_state_dict": ".reranker"})
__all__ = ["ClipReranker", "ClipParams", "read_state_dict"]


@hookimpl
def dalle_register_rerankers(registry):
    registry.register("dalle_clip.reranker:ClipReranker", name="clip", params=ClipParams)
