"""The terminal both sides' commands print to (rich), and the warnings they share."""

from __future__ import annotations

from rich.console import Console

console = Console(highlight=False)


def warn_insecure(what: str) -> None:
    """One line: ``what`` (the SuperLink, this node) runs without TLS."""
    console.print(f"[bold yellow]warning:[/] {what} runs WITHOUT TLS"
                  + (" and without node authentication" if what == "the SuperLink" else "")
                  + ": anyone on the network can read and inject traffic. Use only for a "
                    "test on one machine.")
