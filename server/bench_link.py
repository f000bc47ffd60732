"""``fedseg bench deploy --link RATE[:RTT]``: the same deployment's rounds at
``transfer-precision`` float32 and float16, side by side, over a loopback
shaped like a hospital's link (``server/link.py``: traffic control on the
SuperLink's public port, so every byte between the hospitals and the server
and nothing else)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.table import Table

from server.link import Link, shaped
from server.processes import free_port
from server.render import console, fmt, round_line

PRECISIONS = ("float32", "float16")


def preflight(link: Link) -> None:
    """Refuse before anything starts where the link cannot be shaped (not
    root, no tc, no netem for a round-trip time): shape an unused port once."""
    with shaped(link, free_port()):
        pass


def compare(work: Path, sites: list[Path], names: list[str], config: dict[str, Any],
            link: Link, threads: int) -> dict[str, list[dict[str, Any]]]:
    """One federation, the link shaped once its nodes are connected, then a
    run at each precision in turn; each run's ``metrics.jsonl`` rows."""
    from server.localfed import LocalFederation
    from server.runs import read_metrics

    rows = {}
    with LocalFederation(work, sites, names=names, threads=threads) as fed:
        with shaped(link, fed.port):
            for precision in PRECISIONS:
                console.print(f"transfer-precision {precision}, over {link}:")
                fed.run(f"bench-{precision}", {**config, "transfer-precision": precision},
                        on_round=round_line)
                rows[precision] = read_metrics(fed.state.runs / f"bench-{precision}")
    return rows


def markdown(rows: dict[str, list[dict[str, Any]]], sites: int) -> str:
    """:func:`report`'s figures as a markdown table (docs/performance.md)."""
    full, half = (rows[p] for p in PRECISIONS)
    lines = ["| round | float32 (s) | float16 (s) | float16 / float32 | MB down / up per site, "
             "float32 | float16 | Dice float32 | Dice float16 |",
             "|---|---|---|---|---|---|---|---|"]
    for a, b in zip(full, half, strict=True):
        lines.append(f"| {a['round']} | {a['seconds']:.1f} | {b['seconds']:.1f} | "
                     f"{b['seconds'] / a['seconds']:.2f} | "
                     + " | ".join(f"{r['bytes_down'] / sites / 1e6:.2f} / "
                                  f"{r['bytes_up'] / sites / 1e6:.2f}" for r in (a, b))
                     + f" | {fmt(a['dice_mean'])} | {fmt(b['dice_mean'])} |")
    return "\n".join(lines) + "\n"


def report(rows: dict[str, list[dict[str, Any]]], sites: int, link: Link) -> Table:
    """Seconds per round and bytes per site, float32 beside float16."""
    mb = 1e6 * sites
    table = Table(title=f"seconds per round over {link}, {sites} hospitals")
    for col in ("round", *(f"{p} s" for p in PRECISIONS), "float16 / float32",
                *(f"{p} MB down/up per site" for p in PRECISIONS),
                *(f"Dice {p}" for p in PRECISIONS)):
        table.add_column(col, justify="right")
    full, half = (rows[p] for p in PRECISIONS)
    for a, b in zip(full, half, strict=True):
        table.add_row(str(a["round"]), f"{a['seconds']:.1f}", f"{b['seconds']:.1f}",
                      f"{b['seconds'] / a['seconds']:.2f}",
                      *(f"{r['bytes_down'] / mb:.2f} / {r['bytes_up'] / mb:.2f}" for r in (a, b)),
                      fmt(a["dice_mean"]), fmt(b["dice_mean"]))
    steady = [(a, b) for a, b in zip(full, half, strict=True)][1:-1]  # not the first, last
    if steady:
        sa = sum(a["seconds"] for a, _ in steady) / len(steady)
        sb = sum(b["seconds"] for _, b in steady) / len(steady)
        table.add_row(f"mean 2..{len(full) - 1}", f"{sa:.1f}", f"{sb:.1f}", f"{sb / sa:.2f}",
                      "", "", "", "")
    return table
