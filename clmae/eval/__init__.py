"""Evaluation protocols of a pre-trained encoder (SPEC section 8), one module each; `clmae-eval`
(clmae/evaluate.py) is their command line and finds them here.

- features:      the frozen encoder's CLS and mean-pooled patch features over a .beton, computed once and cached
- linprobe:      the MAE linear-probe recipe on those features or on augmented crops (also fewshot's classifier)
- fewshot:       linear probes on 1, 2, 4, 8, 16 labelled images per class, 3 seeds
- knn:           the reference's k-NN, our post-norm L2 variant and the usual weighted cosine k-NN
- knn_reference: the reference's k-NN alone, exactly as main_zeroshot.py runs it
- finetune:      the MAE fine-tuning recipe on a DeepSpeed engine

To add a protocol: write a module that defines `PROTOCOL = Protocol(...)` (clmae/eval/protocol.py says what
it declares) and add its module name to BUILTIN. Protocols that live outside the package (a user's, or the
test suite's) are named in the environment: CLMAE_EVAL_PLUGINS="my_pkg.my_module:PROTOCOL,other:ATTR".
"""

from __future__ import annotations

import importlib
import os

from clmae.errors import ClmaeError
from clmae.eval.protocol import Protocol

# The sub-commands of clmae-eval, in the order --help lists them: module names, each defining PROTOCOL.
BUILTIN = (
    "clmae.eval.linprobe",
    "clmae.eval.fewshot",
    "clmae.eval.knn",
    "clmae.eval.knn_reference",
    "clmae.eval.finetune",
)
PLUGINS_ENV = "CLMAE_EVAL_PLUGINS"


class PluginError(ClmaeError, ValueError):
    """A CLMAE_EVAL_PLUGINS entry does not name a Protocol."""


def _load(spec: str, default_attr: str = "PROTOCOL") -> Protocol:
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name.strip())
    except ImportError as err:
        raise PluginError(f"{PLUGINS_ENV}: cannot import {module_name!r} (from {spec!r}): {err}") from None
    protocol = getattr(module, attr.strip() or default_attr, None)
    if not isinstance(protocol, Protocol):
        raise PluginError(
            f"{PLUGINS_ENV}: {spec!r} is not a clmae.eval.protocol.Protocol (got {type(protocol).__name__})"
        )
    return protocol


def protocols() -> dict[str, Protocol]:
    """{name: Protocol}: the built-in ones, then those of CLMAE_EVAL_PLUGINS (comma-separated module:attr)."""
    found: dict[str, Protocol] = {}
    plugins = [s for s in os.environ.get(PLUGINS_ENV, "").split(",") if s.strip()]
    for spec in [*BUILTIN, *plugins]:
        protocol = _load(spec)
        if protocol.name in found:
            raise PluginError(f"{PLUGINS_ENV}: {spec!r} defines protocol {protocol.name!r}, which already exists")
        found[protocol.name] = protocol
    return found
