"""The config catalog at the command line: ``--assume-inert KEY`` / ``--accept-semantic-gap FIELD`` and the gate
that stops scan, emit, convert and verify before anything is written (:mod:`mapgen.catalog`)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mapgen.catalog import ConfigReport, check_config
from mapgen.errors import MapgenError


def add_config_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("config catalog")
    group.add_argument("--assume-inert", action="append", default=[], metavar="KEY",
                       help="treat a config key the catalog does not know as inert (repeatable; recorded in the "
                       "output's metadata)")
    group.add_argument("--accept-semantic-gap", action="append", default=[], metavar="FIELD",
                       help="convert although FIELD (a refused config value or model-type fact) changes the model's "
                       "outputs (repeatable; recorded in the output's metadata)")


def check(config: Mapping[str, Any], args: argparse.Namespace, file: str) -> ConfigReport:
    """The catalog's report; warnings go to stderr."""
    report = check_config(config, assume_inert=getattr(args, "assume_inert", ()) or (),
                          accept_gaps=getattr(args, "accept_semantic_gap", ()) or (), file=file)
    for d in report.diagnostics:
        if d.severity != "error":
            print(d.render(), file=sys.stderr)
    return report


def gate(config: Mapping[str, Any], args: argparse.Namespace, file: str) -> ConfigReport:
    """:func:`check`, raising every error at once (exit 1) so that nothing is written."""
    report = check(config, args, file)
    if report.errors:
        raise MapgenError(report.errors)
    return report


def gate_checkpoint(source: str, args: argparse.Namespace) -> ConfigReport | None:
    """The gate for a local checkpoint directory; ``None`` when its config.json cannot be read (the runtime's
    own checks report that, with their specific codes)."""
    path = Path(source) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    return gate(config, args, str(path))
