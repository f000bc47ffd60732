"""What the CLI prints: round lines, the final table, a site's errors, a run's
problems. Rendering only; the numbers come from the run folder."""

from __future__ import annotations

import re
from typing import Any

from rich.markup import escape
from rich.table import Table

from common import wire
from common.console import console
from common.wire import SCORES as METRICS


def site_order(name: str) -> tuple:
    """Sites in the order a person counts them: site-2 before site-10."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part)
                 for part in re.split(r"(\d+)", name))


def round_line(row: dict[str, Any]) -> None:
    def fmt(v: float | None) -> str:
        return "  n/a" if v is None else f"{v:.3f}"

    sites = (" ".join(f"{s} {fmt(row['dice'][s])}" for s in sorted(row["dice"], key=site_order))
             or "not scored this round")
    fails = f"  [red]{len(row['failures'])} failure(s)[/]" if row["failures"] else ""
    console.print(
        f"round {row['round']:>3}  Dice [bold cyan]{fmt(row['dice_mean'])}[/]  ({sites})  "
        f"loss {fmt(row['train_loss'])}  {row['seconds']:.1f} s{fails}",
        soft_wrap=True,
    )


def summary_table(summary: dict[str, Any]) -> Table:
    """The final scores per site and across sites; with several structures the
    headline (per case the mean over structures) first, then a block per
    structure."""
    structures = summary.get("structures", [])
    several = len(structures) > 1
    final = summary["final"]["round"]
    table = Table(title=f"run {summary['run']}: "
                        + (f"round {final}" if final is not None else "no round was scored")
                        + (", mean over structures, then each" if several else ""))
    table.add_column("site")
    for m in METRICS:
        table.add_column(m, justify="right")
    table.add_column("cases", justify="right")
    table.add_column("rounds trained", justify="right")
    rows = dict(summary["final"]["sites"])
    overall = summary["final"]["overall"]
    taking_part = summary.get("participation", {})
    done = summary["rounds_completed"]
    sites = sorted(set(rows) | set(taking_part), key=site_order)
    for site in sites:
        vals = rows.get(site, {})
        trained = taking_part.get(site, {}).get("rounds_trained")
        cell = "" if trained is None else f"{trained} of {done}"
        table.add_row(site, *[fmt(vals.get(m)) for m in METRICS],
                      str(vals.get(wire.NUM_EXAMPLES, "")),
                      f"[red]{cell}[/]" if trained == 0 else cell)
    table.add_row("[bold]all sites[/]", *[fmt(overall.get(m)) for m in METRICS], "", "")
    for structure in structures if several else ():
        table.add_section()
        table.add_row(f"[bold]{structure}[/]")
        keys = [wire.structure_key(m, structure) for m in METRICS]
        for site in sites:
            table.add_row(site, *[fmt(rows.get(site, {}).get(k)) for k in keys])
        table.add_row("[bold]all sites[/]", *[fmt(overall.get(k)) for k in keys])
    return table


def site_error_line(line: str) -> None:
    """A simulated site's own error, as its local log has it (this machine's)."""
    console.print(f"[red]site error[/] {escape(line)}", soft_wrap=True)


def problems(summary: dict[str, Any]) -> None:
    for problem in summary.get("problems", []):
        console.print(f"[red bold]problem:[/] {escape(problem)}", soft_wrap=True)
    if summary.get("stopped"):
        console.print(f"[yellow]stopped:[/] {escape(str(summary['stopped']))}", soft_wrap=True)


def workers_line(workers: dict[str, Any] | None, rows: list[dict[str, Any]]) -> None:
    """After a simulation: its round times (the first holds the start-up, the
    last every site's scoring where it sends evaluate messages), and where the
    simulated sites ran (``server.simulation.worker_summary``)."""
    timed = [r for r in rows if r.get("seconds") is not None]
    seconds = [float(r["seconds"]) for r in timed]
    if len(seconds) >= 3:
        middle = sorted(seconds[1:-1])
        median = middle[len(middle) // 2] if len(middle) % 2 else (
            middle[len(middle) // 2 - 1] + middle[len(middle) // 2]) / 2
        first, last = timed[0].get("round", 1), timed[-1].get("round", len(timed))
        console.print(f"round time: median {median:.1f} s (rounds {first + 1}-{last - 1}); "
                      f"round {first} {seconds[0]:.1f} s (first reads of the sites' cases), "
                      f"last {seconds[-1]:.1f} s",
                      soft_wrap=True)
    elif seconds:  # too few rounds for a median without the first's and last's extras
        console.print("round time: " + ", ".join(
            f"round {r.get('round', i + 1)} {t:.1f} s" for i, (r, t) in
            enumerate(zip(timed, seconds, strict=True)))
            + " (the first holds the reads of the sites' cases; a median needs 3 rounds)",
            soft_wrap=True)
    if not workers:
        return
    peaks = list(workers["peak_rss_mb"].values())
    console.print(
        f"simulated sites ran in {workers['processes']} process(es) on "
        f"{len(workers['nodes'])} Ray node(s), at most {workers['sites_held_peak']} site's "
        f"cases in a process at once, peak memory per process {min(peaks):.0f}-"
        f"{max(peaks):.0f} MB", soft_wrap=True)


def fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"
