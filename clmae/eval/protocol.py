"""What an evaluation protocol declares, and what `clmae-eval` hands it when it runs.

A protocol module defines one `Protocol` (conventionally the module attribute `PROTOCOL`) and is listed in
`clmae.eval.BUILTIN` (or named in the `CLMAE_EVAL_PLUGINS` environment variable): `clmae-eval` then offers
it as a sub-command with its own options, records its settings in the results JSON and MLflow, and calls
its `run` with an `EvalContext`. Everything else (checkpoint and config resolution, the class checks, the
process group, the MLflow run, the results file, the table) is `clmae/evaluate.py`'s, once for all.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clmae.errors import ClmaeError


class DatasetMismatchError(ClmaeError, ValueError):
    """The training and validation files do not describe the same classes, or a protocol cannot use them."""


@dataclass
class EvalContext:
    """Everything a protocol's `run` needs; built by clmae-eval after the checks, on every rank.

    source: the loaded encoder (clmae.weights.EncoderSource); cfg: the resolved Config; env: clmae.dist.DistEnv;
    settings: the protocol's `settings(args, source)`; tracker: clmae.tracking.Tracker (active on rank 0 only);
    out_dir: where results and the feature cache go.
    """

    source: Any
    cfg: Any
    env: Any
    num_classes: int
    settings: dict[str, Any]
    tracker: Any
    out_dir: Path
    _encoder: Any = field(default=None, repr=False)

    def encoder(self):
        """The frozen encoder as timm's VisionTransformer on env.device, built once."""
        if self._encoder is None:
            self._encoder = self.source.build_timm().to(self.env.device)
        return self._encoder

    def features(self, data_path: str):
        """Frozen-encoder features (clmae.eval.features.Features) of every image of `data_path`, from the
        cache or one forward pass that all ranks share. Collective: every rank calls it."""
        from clmae.eval.features import cached_features

        return cached_features(
            self.encoder(), self.source.identity(), data_path, self.cfg, self.env, self.out_dir / "features"
        )

    def train_and_val_features(self, device=None):
        """(train, val) features of data.train_path and data.val_path, moved to `device` (default: env's)."""
        device = device or self.env.device
        train = self.features(self.cfg.data.train_path)
        val = self.features(self.cfg.data.val_path)
        return train.to(device), val.to(device)


@dataclass(frozen=True)
class Protocol:
    """One evaluation protocol.

    name:          the `clmae-eval` sub-command, the results file's stem and the `clmae.protocol` MLflow tag
    help:          one line for `clmae-eval --help`
    add_arguments: adds the protocol's own options to its sub-parser (beyond CHECKPOINT, --config, --out)
    settings:      (args, source) -> the hyper-parameters as used: JSON-serialisable, written to the results
                   file and logged as MLflow params `eval.<key>`
    run:           (EvalContext) -> {metric: value}, on rank 0 (other ranks may return {}); called on every rank
    check:         optional (args, cfg) -> None, raising ClmaeError before any process group or forward pass
    format_table:  optional results -> printed table (default: one `metric  value` line each)
    """

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    settings: Callable[[argparse.Namespace, Any], dict[str, Any]]
    run: Callable[[EvalContext], dict[str, float]]
    check: Callable[[argparse.Namespace, Any], None] | None = None
    format_table: Callable[[dict[str, float]], str] | None = None


def no_arguments(parser: argparse.ArgumentParser) -> None:
    """`add_arguments` of a protocol without options of its own."""


def metric_table(results: dict[str, float]) -> str:
    """Results as aligned `metric  value` lines."""
    return aligned([("metric", "%")] + [(name, f"{value:.2f}") for name, value in results.items()])


def aligned(rows: list[tuple[str, str]]) -> str:
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)
