"""``fedseg bench transfer``: the bytes a round moves per site, by model and
``transfer-precision``, and what they cost on a hospital's link.

No training: each model is built from the run settings, and the two messages
of a round are built as the server and a site build them (the packed global
model cast for the wire, with the round's instructions; the site's packed
weights cast for the wire, with its metrics and name), then measured as the
run's recorder measures them (``server.wire.content_bytes``, Flower's
serialised payload). tests/wiring/test_transfer.py holds these figures
equal to what a run records.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from common import wire
from common.config import RunSettings
from common.data.harmonise import Harmonisation, Intensity
from common.model import build_model
from common.packing import pack, to_wire
from server.presets import HIPPOCAMPUS
from server.wire import content_bytes

# The models of docs/performance.md's table: the default 2D U-Net and the 3D
# U-Net of the hippocampus benchmark's preset until commit 119351c (4 levels,
# 16 to 128 channels; the preset's half-width 5-level U-Net has 0.61 M
# parameters where this one has 0.60 M), with 2 and with 1 residual units per level.
HIPPOCAMPUS_MODEL = {**{k: v for k, v in HIPPOCAMPUS.items()
                        if k in ("model-spatial-dims", "structures")},
                     "model-channels": "16,32,64,128"}
MODELS: dict[str, dict[str, Any]] = {
    "2D U-Net (default)": {},
    "3D U-Net, hippocampus (2 res units)": {**HIPPOCAMPUS_MODEL, "model-res-units": 2},
    "3D U-Net, hippocampus (1 res unit)": {**HIPPOCAMPUS_MODEL, "model-res-units": 1},
}


@dataclass(frozen=True)
class RoundBytes:
    """One site's bytes in a round (the last round adds ``evaluate_*``)."""

    parameters: int
    down: int  # the train message: the global model and the round's instructions
    up: int  # the train reply: the site's weights, metrics and name
    evaluate_down: int  # the last round's evaluate message: the model again
    evaluate_up: int  # its reply: scores only


# What a harmonised run's messages carry besides (a 3D MR federation's; a few
# hundred bytes whatever the model)
TYPICAL = Harmonisation((1.0, 1.0, 1.0), {"MR": Intensity()}, 3)


def round_bytes(settings: RunSettings, harmonisation: Harmonisation | None = TYPICAL
                ) -> RoundBytes:
    """The bytes of one site's messages in a round of a run of ``settings``
    whose train and evaluate messages carry ``harmonisation`` (the run's;
    none with ``harmonise = off``)."""
    state = build_model(settings.model).state_dict()
    weights = to_wire(pack(state), settings.transfer_precision)
    arrays = ArrayRecord({k: Array(v) for k, v in weights.items()})
    harmonised = ({wire.HARMONISATION: harmonisation.to_wire()}
                  if harmonisation is not None and settings.harmonise != "off" else {})
    config = {wire.SERVER_ROUND: 2, wire.ROUNDS_DONE: 0, wire.EVALUATE_INCOMING: True,
              **harmonised}
    scores = {k: 3 if k == wire.NUM_EXAMPLES else 0.5
              for k in wire.eval_metrics(settings.structure_names)}
    down = RecordDict({wire.ARRAYS: arrays, wire.CONFIG: ConfigRecord(config)})
    up = RecordDict({
        wire.ARRAYS: arrays,
        wire.METRICS: MetricRecord({wire.NUM_EXAMPLES: 6, wire.TRAIN_LOSS: 0.5,
                                    wire.TRAIN_SECONDS: 1.5, wire.TRAIN_STEPS: 2,
                                    **{wire.GLOBAL_PREFIX + k: v for k, v in scores.items()}}),
        # in a run that names no structure the site says its own (a name like this)
        wire.SITE: ConfigRecord({wire.SITE_NAME: "hospital-a", **(
            {} if settings.named_structures else {wire.STRUCTURE: "lesion"})})})
    evaluate_down = RecordDict({wire.ARRAYS: arrays, wire.CONFIG: ConfigRecord(
        {wire.SERVER_ROUND: 2, wire.KEEP_MODEL: True, wire.FEDERATION_DICE: 0.5,
         **harmonised})})
    evaluate_up = RecordDict({wire.METRICS: MetricRecord(scores),
                              wire.SITE: ConfigRecord({wire.SITE_NAME: "hospital-a"})})
    return RoundBytes(sum(v.numel() for v in state.values()), content_bytes(down),
                      content_bytes(up), content_bytes(evaluate_down),
                      content_bytes(evaluate_up))


def table(models: Mapping[str, Mapping[str, Any]] = MODELS,
          precisions: Sequence[str] = ("float32", "float16"),
          rate_mbit: float = 50.0) -> tuple[list[dict[str, Any]], str]:
    """Rows (model, precision, bytes) and their markdown table; the seconds
    columns are the bytes at ``rate_mbit`` Mbit/s each way, the link's delay
    and protocol overhead left out."""
    rows = []
    for name, overrides in models.items():
        for precision in precisions:
            settings = RunSettings.from_run_config({**overrides,
                                                    "transfer-precision": precision})
            b = round_bytes(settings)
            rows.append({"model": name, "precision": precision, **b.__dict__})

    def seconds(n: int) -> float:
        return n * 8 / (rate_mbit * 1e6)

    lines = [
        f"| model | parameters | transfer-precision | down per site per round | up per site "
        f"per round | seconds at {rate_mbit:g} Mbit/s (down + up) | last round adds "
        f"(evaluate message down / reply up) |",
        "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['parameters']:,} | {r['precision']} | "
            f"{r['down'] / 1e6:.2f} MB ({r['down']:,} B) | {r['up'] / 1e6:.2f} MB "
            f"({r['up']:,} B) | {seconds(r['down']):.2f} + {seconds(r['up']):.2f} | "
            f"{r['evaluate_down'] / 1e6:.2f} MB / {r['evaluate_up']:,} B |")
    return rows, "\n".join(lines) + "\n"
