"""The run folder: everything a coordinator reads after (or during) a run.

``runs/<name>/`` holds

* ``metrics.jsonl``: one JSON object per round (``round``, ``dice`` per site,
  ``dice_mean``, every metric per site under ``sites`` and across sites
  (case-weighted) under ``overall``, ``train_loss``, ``seconds``,
  ``bytes_up``, ``bytes_down``, ``failures``);
* ``checkpoint.pt``: the global model after the last completed round, with its
  round number and settings (what ``--resume`` continues from);
* ``final_model.pt``: the global model's state dict when the run ends;
* ``summary.json``: the final metrics per site and overall, and totals;
* ``dice.png``: Dice per site over rounds;
* ``report.html``: the run as a page (server/report.py);
* ``events.out.tfevents.*``: the rounds' metrics for TensorBoard
  (``tensorboard --logdir runs/``; server/tensorboard_events.py);
* ``harmonisation.json``: the target spacing and intensity scheme the run
  fixed at its start, and the sites' fingerprints it came from
  (``common/data/harmonise.py``; also in ``summary.json``).

Metrics are keyed as :mod:`common.wire` names them: with several
``structures`` each score per structure (``dice/liver``) beside the headline
(``dice``: per case the mean over structures; ``common/metrics.py`` says how
it is averaged). ``summary.json`` names the structures in class order.

No site path or patient value is written here: sites appear by their public name.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord

from common import wire
from common.config import RunSettings
from common.data.harmonise import Harmonisation
from common.errors import ConfigError
from common.jsonl import read_jsonl
from common.metrics import weighted_mean
from common.model import build_model
from common.packing import Template, pack, template_of, unpack
from common.privacy.accounting import PrivacyAccount
from server.strategies import RoundRecord
from server.tensorboard_events import EventLog

RUNS_DIR_ENV = "FEDSEG_RUNS_DIR"
MODEL_CARD = "model-card.json"  # beside final_model.pt: what it is and how it scored
HARMONISATION_FILE = "harmonisation.json"  # what the run fixed from the sites' fingerprints


def runs_root() -> Path:
    """Where run folders go: ``$FEDSEG_RUNS_DIR``, else ``./runs``."""
    return Path(os.environ.get(RUNS_DIR_ENV, "runs")).resolve()


def model_card(summary: dict[str, Any]) -> dict[str, Any]:
    """The final model's card, beside it in the run folder: the run, the round
    its scores are of (the final round's), per site and across sites with
    their units, the date, the fedseg version, the file's SHA-256 and the
    settings (what ``fedseg predict`` rebuilds the model from)."""
    final = summary["final"]
    return {"run": summary["run"], "rounds": summary["rounds_completed"],
            "scored_round": final["round"], "saved": summary["finished_at"],
            "fedseg_version": summary["fedseg_version"],
            "sha256": summary["final_model"]["sha256"],
            "federation_dice": final["overall"].get("dice"),
            "overall": final["overall"], "sites": final["sites"], "units": summary["units"],
            "stopped": summary["stopped"], "problems": summary["problems"],
            "harmonisation": summary.get("harmonisation"), "config": summary["config"]}


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def read_metrics(folder: Path) -> list[dict[str, Any]]:
    """The rounds recorded so far (complete lines only: a line cut short by a
    crash, and what follows it, is ignored)."""
    return read_jsonl(Path(folder) / "metrics.jsonl", stop_at_broken=True)


def packed_arrays(state: dict[str, Any]) -> ArrayRecord:
    """A state dict as the wire carries it (``common/packing.py``)."""
    from flwr.app import Array

    return ArrayRecord({k: Array(v) for k, v in pack(state).items()})


# During a run, report.html is drawn again after every scored round and at
# least this often (a coordinator's browser reloads it; RunFolder.redraw).
REDRAW_SECONDS = 30.0


class RunFolder:
    """A run's folder; created fresh, or reopened to resume."""

    def __init__(self, path: Path, settings: RunSettings, last_round: int,
                 history: list[dict[str, Any]], pending: dict[str, Any] | None = None) -> None:
        self.path = path
        self.settings = settings
        self.last_round = last_round
        self.history = history
        # A checkpointed round whose line waits for its scores (they come with
        # the next round's train replies): what the checkpoint kept of it.
        self.pending = pending
        self._clock = time.perf_counter()
        self._drawn: float | None = None  # when report.html was last drawn (monotonic)
        # each shareable site's last local model scored at each site (cross-site)
        self.cross_site: dict[str, dict[str, dict]] = {}
        self.events = EventLog(path, settings.structure_names,
                               history[-1]["round"] + 1 if history else 1)
        # In a run that names no structure: the one its sites' label maps name, once
        # known (server/strategies/recorder.py); kept in the checkpoint for a resume
        self.site_structure: str | None = None

    @classmethod
    def open(cls, root: Path, settings: RunSettings) -> RunFolder:
        name = settings.run_name or datetime.now().strftime("%Y%m%d-%H%M%S")
        path = Path(root) / name
        if settings.resume:
            if not (path / "checkpoint.pt").exists():
                raise ConfigError(
                    f"cannot resume run {name!r}: it has no checkpoint.pt (no round finished)"
                )
            saved = torch.load(path / "checkpoint.pt", map_location="cpu", weights_only=True)
            saved_model = RunSettings.from_run_config(saved["config"]).model
            if saved_model != settings.model:
                raise ConfigError(
                    f"cannot resume run {name!r}: its model was {saved_model}, "
                    f"this run asks for {settings.model}"
                )
            last = int(saved["round"])
            history = [row for row in read_metrics(path) if row["round"] <= last]
            _atomic_write(path / "metrics.jsonl",
                          "".join(json.dumps(r) + "\n" for r in history).encode())
            pending = saved.get("pending")
            if history and history[-1]["round"] == last:
                pending = None  # its line was written before the stop
            folder = cls(path, settings, last, history, pending)
            structure = saved.get("structure")
            folder.site_structure = structure if isinstance(structure, str) else None
            return folder
        if (path / "metrics.jsonl").exists():
            raise ConfigError(
                f"run folder {name!r} already holds a run; resume it or choose another name"
            )
        path.mkdir(parents=True, exist_ok=True)
        return cls(path, settings, 0, [])

    @property
    def harmonisation(self) -> Harmonisation | None:
        """The harmonisation fixed at the run's start (``harmonisation.json``),
        or None (a run with ``harmonise = off``, or before the fingerprint)."""
        path = self.path / HARMONISATION_FILE
        if not path.is_file():
            return None
        fixed = json.loads(path.read_text())["harmonisation"]
        return Harmonisation.from_dict(fixed) if fixed is not None else None

    def save_harmonisation(self, harmonisation: Harmonisation | None,
                           fingerprints: dict[str, dict[str, Any]], failures: list[str]) -> None:
        """``harmonisation.json``: what the run fixed (None: nothing, too few
        usable fingerprints), from which sites' fingerprints (aggregates, as
        each site's audit holds them), and the sites left out and why."""
        now = time.perf_counter()
        seconds, self._clock = now - self._clock, now  # round 1's time is its own
        _atomic_write(self.path / HARMONISATION_FILE, json.dumps(_json_safe({
            "harmonisation": harmonisation.to_dict() if harmonisation else None,
            "described": harmonisation.describe() if harmonisation else None,
            "fingerprints": fingerprints, "failures": failures,
            "seconds": round(seconds, 3)}), indent=2).encode())

    def checkpoint_arrays(self) -> ArrayRecord | None:
        if self.last_round == 0:
            return None
        saved = torch.load(self.path / "checkpoint.pt", map_location="cpu", weights_only=True)
        return packed_arrays(saved["state_dict"])

    def across_sites(self, sites: dict[str, dict[str, Any]]) -> dict[str, float]:
        """Each of the run's scores (``wire.score_keys``) across ``sites``,
        case-weighted."""
        return {k: weighted_mean(sites.values(), k)
                for k in wire.score_keys(self.settings.structure_names)}

    @functools.cached_property
    def template(self) -> Template:
        """The names and shapes of the run's model (built once, not every round)."""
        return template_of(build_model(self.settings.model).state_dict())

    def state_dict(self, arrays: ArrayRecord) -> dict[str, torch.Tensor]:
        """The global model's state dict from its packed arrays."""
        template = self.template
        flat = {k: a.numpy() for k, a in arrays.items()}
        return {k: torch.from_numpy(v.copy()) for k, v in unpack(flat, template).items()}

    def dp_releases(self) -> int:
        """DP releases so far (for the accountant when a run resumes)."""
        if self.pending:
            return int(self.pending["dp_releases"] or 0)
        return int(self.history[-1].get("dp_releases") or 0) if self.history else 0

    def pending_round(self) -> tuple[RoundRecord, dict[str, Any]] | None:
        """A resumed run's checkpointed round without its line: its record
        (train side) and snapshot, to be completed by the next scores."""
        if not self.pending:
            return None
        kept = dict(self.pending["record"])
        for key in ("failed", "left_out"):
            kept[key] = set(kept[key])
        return RoundRecord(**kept), self.pending

    def record_round(self, server_round: int, arrays: ArrayRecord, rec: RoundRecord,
                     ledger: PrivacyAccount | None = None) -> dict[str, Any]:
        """Save the global model and append the round's line at once."""
        return self.append_row(server_round, rec,
                               self.save_checkpoint(server_round, arrays, rec, ledger))

    def save_checkpoint(self, server_round: int, arrays: ArrayRecord, rec: RoundRecord,
                        ledger: PrivacyAccount | None = None) -> dict[str, Any]:
        """Save the global model of ``server_round`` (what a resumed run goes
        on from), with what is known of the round so far; returns the round's
        snapshot (seconds, privacy spent) for its line."""
        now = time.perf_counter()
        seconds, self._clock = now - self._clock, now
        snapshot = {"round": server_round, "seconds": seconds,
                    "epsilon": ledger.epsilon if ledger else None,
                    "dp_releases": ledger.releases if ledger else None,
                    "record": {**{k: v for k, v in rec.__dict__.items() if k != "structures"},
                               "failed": sorted(rec.failed),
                               "left_out": sorted(rec.left_out),
                               "failures": list(rec.failures)}}
        state = self.state_dict(arrays)
        buffer_path = self.path / ".checkpoint.pt.tmp"
        h = self.harmonisation
        torch.save({"round": server_round, "state_dict": state,
                    "config": self.settings.to_run_config(),
                    "harmonisation": h.to_dict() if h else None,
                    "structure": self.site_structure,
                    "pending": _json_safe(snapshot)}, buffer_path)
        os.replace(buffer_path, self.path / "checkpoint.pt")
        self.last_round = server_round
        return snapshot

    def append_row(self, server_round: int, rec: RoundRecord, snapshot: dict[str, Any]
                   ) -> dict[str, Any]:
        """Append the line of ``server_round`` (checkpointed before, see
        :meth:`save_checkpoint`), with the scores ``rec`` holds by now."""
        seconds = snapshot["seconds"]
        kept = wire.eval_metrics(self.settings.structure_names)  # the run's, nothing else
        overall = self.across_sites(rec.evaluate)
        row = {
            "round": server_round,
            "dice": {site: m.get("dice") for site, m in sorted(rec.evaluate.items())},
            "dice_mean": overall["dice"],
            "train_loss": weighted_mean(rec.train.values(), wire.TRAIN_LOSS),
            "train_loss_sites": {s: m.get(wire.TRAIN_LOSS)
                                 for s, m in sorted(rec.train.items())},
            "sites": {site: {k: m[k] for k in kept if k in m}
                      for site, m in sorted(rec.evaluate.items())},
            "overall": overall,
            "seconds": round(seconds, 3),
            "train_seconds": {s: m.get(wire.TRAIN_SECONDS) for s, m in sorted(rec.train.items())},
            "bytes_up": rec.bytes_up,
            "bytes_down": rec.bytes_down,
            "failures": rec.failures,
            "trained": rec.trained,
            "failed_sites": sorted(rec.failed),
            "cases_left_out": dict(sorted(rec.cases_left_out.items())),
            "aggregated": rec.aggregated,
            "epsilon": snapshot["epsilon"],
            "dp_releases": snapshot["dp_releases"],
        }
        row = _json_safe(row)
        with open(self.path / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(row) + "\n")
        self.history.append(row)
        self.events.add_round(row)
        self.pending = None
        self.redraw(scored=row["dice_mean"] is not None)
        return row

    def redraw(self, *, scored: bool) -> None:
        """During a run, draw ``dice.png`` after a scored round (only those move
        it) and ``report.html`` after a scored round or once
        :data:`REDRAW_SECONDS` have passed since it was last drawn; ``finish``
        draws both. Drawing them (matplotlib) after every round sat on the path
        between one round and the next, and grew with the run (the report holds
        every round): 0.3 s a round early on, 0.5 to 1 s by round 256 of a 3D
        run on 2 cores (docs/performance.md, "Between rounds")."""
        now = time.monotonic()
        if scored:
            self.plot()
        if scored or self._drawn is None or now - self._drawn >= REDRAW_SECONDS:
            self.report()
            self._drawn = now

    def finish(self, final_arrays: ArrayRecord | None, stopped: str | None = None,
               ledger: PrivacyAccount | None = None) -> dict[str, Any]:
        """Write ``final_model.pt``, ``summary.json``, ``dice.png`` and ``report.html``.
        ``stopped``: why the run ended before its planned rounds, if it did."""
        final_path = self.path / "final_model.pt"
        if not self.aggregated():  # the model is the initial one: none to use
            final_path.unlink(missing_ok=True)
            final_arrays = None
        elif final_arrays is None:
            final_arrays = self.checkpoint_arrays()
        if final_arrays is not None:
            torch.save(self.state_dict(final_arrays), final_path)
        model = ({"file": final_path.name, "sha256": hashlib.sha256(
            final_path.read_bytes()).hexdigest()} if final_arrays is not None else None)
        summary = self.summary(stopped, ledger, model)
        _atomic_write(self.path / "summary.json", json.dumps(summary, indent=2).encode())
        if model is not None:
            _atomic_write(self.path / MODEL_CARD, json.dumps(model_card(summary), indent=2
                                                             ).encode())
        else:
            (self.path / MODEL_CARD).unlink(missing_ok=True)
        self.plot()
        self.report(summary)
        self.events.close()
        return summary

    def cross_site_table(self) -> dict[str, dict[str, float | None]] | None:
        """Dice of each model (the global one, then each shareable site's last
        local model) at each site, or None without a cross-site evaluation."""
        if not self.cross_site:
            return None
        last = next((r for r in reversed(self.history) if r["sites"]), None)
        table = {"global": {s: m.get("dice") for s, m in (last["sites"] if last else {})
                            .items()}}
        for owner, row in sorted(self.cross_site.items()):
            table[f"local {owner}"] = {s: m.get("dice") for s, m in sorted(row.items())}
        return table

    def report(self, summary: dict[str, Any] | None = None) -> None:
        """``report.html``: the run as a page (server/report.py)."""
        from server.report import write_report

        write_report(self.path, self.path.name, self.settings.to_run_config(), self.history,
                     summary)

    def aggregated(self) -> bool:
        """Whether any round's update went into the model (else it is the initial one)."""
        return any(r.get("aggregated", True) for r in self.history)

    def summary(self, stopped: str | None = None, ledger: PrivacyAccount | None = None,
                model: dict[str, str] | None = None) -> dict[str, Any]:
        """``model``: the final model's file and SHA-256 (None: none was written)."""
        from common.inference import SCORE_UNITS, fedseg_version

        last = next((r for r in reversed(self.history) if r["sites"]), None)
        sites = last["sites"] if last else {}
        overall = self.across_sites(sites)
        first = self.history[0]["dice_mean"] if self.history else None
        participation = self.participation()
        return _json_safe({
            "run": self.path.name,
            "rounds_completed": self.last_round,
            "rounds_planned": self.settings.num_rounds,
            "structures": list(self.settings.structure_names),
            # a run that names none: the one structure its sites' label maps name
            "site_structure": self.site_structure,
            "final": {"round": last["round"] if last else None, "sites": sites,
                      "overall": overall},
            "dice_first_round": first,
            "dice_final": overall["dice"],
            "seconds_total": round(sum(r["seconds"] for r in self.history), 3),
            "bytes_up_total": sum(r["bytes_up"] for r in self.history),
            "bytes_down_total": sum(r["bytes_down"] for r in self.history),
            "stopped": stopped,
            "finished_at": datetime.now().astimezone().isoformat(timespec="seconds"),
            "fedseg_version": fedseg_version(),
            "final_model": model,
            "units": SCORE_UNITS,
            "rounds_aggregated": sum(1 for r in self.history if r.get("aggregated", True)),
            "participation": participation,
            "cross_site": self.cross_site_table(),
            "cases_left_out": {site: text for r in self.history  # the latest per site
                               for site, text in r.get("cases_left_out", {}).items()},
            "problems": self.problems(participation) + (
                [f"stopped before its last round: {stopped}"]
                if stopped and not stopped.startswith("privacy budget") else []),
            "privacy": {
                "secure_aggregation": self.settings.secure_aggregation,
                "dp": self.settings.dp,
                "noise_multiplier": self.settings.dp_noise_multiplier if ledger else None,
                "clipping_norm": self.settings.dp_clipping_norm if ledger else None,
                "delta": self.settings.dp_delta if ledger else None,
                "epsilon": ledger.epsilon if ledger else None,
                "max_epsilon": self.settings.dp_max_epsilon or None,
                "dp_releases": ledger.releases if ledger else None,
                "accountant": "RDP (dp-accounting), add-or-remove-one, no sampling "
                              "amplification" if ledger else None,
            },
            "harmonisation": h.to_dict() if (h := self.harmonisation) else None,
            "config": self.settings.to_run_config(),
        })

    def participation(self) -> dict[str, dict[str, int]]:
        """Per site seen in this run: rounds its update went into the model,
        rounds it had a failure in."""
        sites = sorted({s for r in self.history
                        for s in (*r.get("trained", ()), *r.get("failed_sites", ()),
                                  *r["dice"])})
        return {s: {"rounds_trained": sum(s in r.get("trained", ()) for r in self.history),
                    "rounds_failed": sum(s in r.get("failed_sites", ()) for r in self.history)}
                for s in sites}

    def problems(self, participation: dict[str, dict[str, int]]) -> list[str]:
        """What makes this run's result untrustworthy (the CLI exits non-zero)."""
        rounds = len(self.history)
        out = []
        if rounds and not any(r.get("aggregated", True) for r in self.history):
            out.append(f"no round aggregated an update ({rounds} round(s) run): no final "
                       f"model was written")
        # With fraction-train under 1 a site may never be drawn: only a site that
        # was asked to train (it replied or failed) and never counted is a problem.
        asked = {s for r in self.history
                 for s in (*r.get("train_loss_sites", {}), *r.get("failed_sites", ()))}
        every_round = self.settings.fraction_train >= 1
        for site, p in participation.items():
            if p["rounds_failed"] == rounds and rounds:
                out.append(f"site {site} failed every round ({rounds} of {rounds})")
            elif p["rounds_trained"] == 0 and rounds and (every_round or site in asked):
                out.append(f"site {site} never trained")
        return out

    def plot(self) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
        sites = sorted({s for r in self.history for s in r["dice"]})
        for site in sites:
            pts = [(r["round"], r["dice"][site]) for r in self.history
                   if r["dice"].get(site) is not None]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=site)
        pts = [(r["round"], r["dice_mean"]) for r in self.history if r["dice_mean"] is not None]
        if pts:
            ax.plot(*zip(*pts, strict=True), "k--", label="mean (case-weighted)")
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set(xlabel="round", ylabel="Dice (test cases)", ylim=(0, 1),
               title=f"fedseg run {self.path.name}")
        ax.grid(alpha=0.3)
        if sites:
            ax.legend(loc="lower right", fontsize="small")
        fig.tight_layout()
        tmp = self.path / ".dice.png.tmp.png"
        fig.savefig(tmp)
        plt.close(fig)
        os.replace(tmp, self.path / "dice.png")
