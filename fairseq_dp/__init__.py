# Copyright (c) fairseq_dp contributors. MIT license.
"""fairseq_dp: differentially private fine-tuning as a fairseq ``--user-dir`` plugin."""

__version__ = "0.1.0"


def _allow_fairseq_checkpoint_types() -> None:
    """Let ``torch.load(weights_only=True)`` (the default since torch 2.6) read
    fairseq checkpoints, by allowing exactly the types fairseq pickles there,
    instead of turning ``weights_only`` off for everything."""
    import argparse
    import collections
    import typing

    import torch
    from omegaconf import DictConfig, ListConfig
    from omegaconf.base import ContainerMetadata, Metadata
    from omegaconf.nodes import AnyNode, BooleanNode, EnumNode, FloatNode, IntegerNode, StringNode

    allowed = [
        argparse.Namespace,
        DictConfig,
        ListConfig,
        ContainerMetadata,
        Metadata,
        AnyNode,
        BooleanNode,
        EnumNode,
        FloatNode,
        IntegerNode,
        StringNode,
        typing.Any,
        dict,
        list,
        int,
        collections.defaultdict,
    ]
    try:
        from fairseq.distributed.utils import _TensorPlaceholder

        allowed.append(_TensorPlaceholder)
    except ImportError:  # pragma: no cover - older fairseq
        pass
    torch.serialization.add_safe_globals(allowed)


_allow_fairseq_checkpoint_types()

from .errors import DPConfigError, install_excepthook  # noqa: E402,F401

# fairseq's entry points then print a DPConfigError's message without a traceback
install_excepthook()

from . import criterions, models, tasks  # noqa: E402,F401
from .flags import show_after_fairseq_help  # noqa: E402

# fairseq-train --help cannot list the plugin's flags: print them after it
show_after_fairseq_help()
