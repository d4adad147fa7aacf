"""The argparse pieces every ``rlr`` subcommand shares: help wrapped at spaces, errors as one line."""

from __future__ import annotations

import argparse
import sys
import textwrap
from typing import NoReturn


class HelpFormatter(argparse.HelpFormatter):
    """Wraps help text at spaces only, so names such as tiny-flux or SD 3 / 3.5 are never split."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return textwrap.fill(
            " ".join(text.split()),
            width,
            initial_indent=indent,
            subsequent_indent=indent,
            break_on_hyphens=False,
        )


class SampleArgumentParser(argparse.ArgumentParser):
    """Errors as one line and a pointer to ``--help``, as ``rlr fit``'s, not the usage block."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message}\n({self.prog} --help lists the options)\n")
        self.exit(2)
