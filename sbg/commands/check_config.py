"""`sbg check-config FILE [--skip-files]`: validate a configuration file."""

from __future__ import annotations

from typing import TextIO

from sbg.config.load import load_config
from sbg.config.summary import format_summary
from sbg.errors import ConfigErrors


def run(path: str, skip_files: bool, out: TextIO, err: TextIO) -> int:
    """Check the file at PATH; return the exit status.

    0: the file is valid, and a summary went to OUT (and a `warning:` line
    per warning to ERR, e.g. a certificate that expires within 30 days).
    1: one line per problem went to ERR, each starting with its key path
    (a problem with the file as a whole names the file instead).
    """
    try:
        config = load_config(path, skip_files=skip_files)
    except ConfigErrors as e:
        for line in e.lines():
            err.write(line + "\n")
        return 1
    out.write(format_summary(config))
    for line in config.warnings:
        err.write(f"warning: {line}\n")
    if skip_files:
        out.write("(--skip-files: the certificate, key and secret files were not read)\n")
    return 0
