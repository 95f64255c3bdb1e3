"""pluggy hook specifications: one hook per component kind, each handed a typed registry."""

from __future__ import annotations

from typing import Callable

import pluggy

PROJECT = "dalle_framework"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def dalle_register_tokenizers(registry) -> None:
    """Register Tokenizer classes: ``registry.register(MyTokenizer)``."""


@hookspec
def dalle_register_codecs(registry) -> None:
    """Register ImageCodec classes."""


@hookspec
def dalle_register_priors(registry) -> None:
    """Register Prior classes."""


@hookspec
def dalle_register_rerankers(registry) -> None:
    """Register Reranker classes."""


@hookspec
def dalle_register_datasources(registry) -> None:
    """Register DataSource classes."""


@hookspec
def dalle_register_engines(registry) -> None:
    """Register Engine classes."""


@hookspec
def dalle_register_recipe_dirs(register: Callable[[str], None]) -> None:
    """Call ``register(path)`` for each directory of YAML recipes the plugin ships."""


@hookspec
def dalle_register_stages(registry) -> None:
    """Register Stage classes (a trainable step of the pipeline, see :class:`dalle_framework.Stage`)."""


@hookspec
def dalle_register_metrics(registry) -> None:
    """Register Metric classes (figures of ``dalle evaluate``, see :class:`dalle_framework.Metric`)."""


@hookspec
def dalle_register_feature_networks(registry) -> None:
    """Register FeatureNetwork classes (images -> feature vectors for distribution metrics)."""


@hookspec
def dalle_register_logit_filters(registry) -> None:
    """Register LogitFilter classes (token filters for ``generate.sampling.filters``)."""


@hookspec
def dalle_register_commands(register: Callable[..., None]) -> None:
    """Add ``dalle`` subcommands: ``register(name, run, help="...", add_arguments=None)``, where
    ``add_arguments(parser)`` adds the command's options to its argparse parser and ``run(args)``
    returns the exit code. Built-in commands keep their names."""
