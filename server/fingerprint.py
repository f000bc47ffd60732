"""The start of a run: every connected site's fingerprint, and the
harmonisation the run fixes from them (``common/data/harmonise.py``).

One Flower query message per site asks for ``fingerprint``; each reply holds
only aggregates of that site's training cases (``common.wire.FINGERPRINT_METRICS``
and its modality). A reply that fails or does not read as a fingerprint is
left out, named in ``harmonisation.json``; fewer than ``min-nodes`` usable
replies stop the run before any training (resumable). A resumed run keeps the
harmonisation of its start: its sites were trained on it.
"""

from __future__ import annotations

from logging import INFO, WARNING
from typing import Any

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from common import wire
from common.config import RunSettings
from common.data.harmonise import Harmonisation, SiteFingerprint, combine, parse_spacing
from common.errors import DataError, parse_error_reason
from server.runs import RunFolder
from server.strategies import TooFewSites
from server.strategies.recorder import (
    check_structures,
    registered_names,
    said_structure,
    wait_for_sites,
)
from server.wire import audit


def harmonise_run(grid: Grid, settings: RunSettings, run: RunFolder) -> Harmonisation | None:
    """The run's harmonisation: from ``run``'s folder when it has one (a
    resumed run), else from the connected sites' fingerprints, saved there.
    None with ``harmonise = off`` (every case as read, z-scored on its own)."""
    if settings.harmonise == "off":
        return None
    saved = run.harmonisation
    if saved is not None:
        log(INFO, "harmonisation kept from the run's start: %s", saved.describe())
        return saved
    target = parse_spacing(settings.target_spacing)
    wait_for_sites(grid, settings.min_nodes, settings.node_wait, "for the fingerprint")
    nodes = sorted(grid.get_node_ids())
    messages = [Message(RecordDict({wire.CONFIG: ConfigRecord({wire.QUERY: wire.FINGERPRINT})}),
                        dst_node_id=node, message_type=MessageType.QUERY) for node in nodes]
    replies = list(grid.send_and_receive(messages, timeout=settings.round_timeout))
    names = registered_names()
    prints: dict[str, SiteFingerprint] = {}
    structures: list[tuple[str, str]] = []  # (site, wire.STRUCTURE): a run that names none
    shown: dict[str, dict[str, Any]] = {}
    failures: list[str] = []
    answered = set()
    for reply in replies:
        audit(0, wire.FINGERPRINT, reply)  # kept as received, with every round's replies
        node = reply.metadata.src_node_id
        answered.add(node)
        name = names.get(node, f"node-{node}")
        if reply.has_error():
            said, cause = parse_error_reason(reply.error.reason)
            failures.append(f"{names.get(node) or (said or name)[:64]}: {cause[:300]}")
            continue
        try:
            site = reply.content[wire.SITE]
            # the coordinator's registry names a node; a simulation's sites name themselves
            name = names.get(node) or str(site.get(wire.SITE_NAME) or name)[:64]
            metrics = {k: reply.content[wire.METRICS][k] for k in wire.FINGERPRINT_METRICS
                       if k in reply.content[wire.METRICS]}
            fingerprint = SiteFingerprint.from_metrics(metrics, str(site.get(wire.MODALITY)))
        except (DataError, KeyError, TypeError) as exc:
            failures.append(f"{name}: not a fingerprint ({exc})")
            continue
        if name in prints:
            failures.append(f"{name}: a second fingerprint under the same name, left out")
            continue
        prints[name] = fingerprint
        structure = said_structure(site.get(wire.STRUCTURE))
        if structure and not settings.named_structures:
            structures.append((name, structure))
        shown[name] = {**fingerprint.to_metrics(), "modality": fingerprint.modality}
    failures += [f"{names.get(n, f'node-{n}')}: no reply" for n in nodes if n not in answered]
    for failure in failures:
        log(WARNING, "fingerprint left out: %s", failure)
    if len(prints) < settings.min_nodes:
        run.save_harmonisation(None, shown, failures)
        raise TooFewSites(f"{len(prints)} of the {settings.min_nodes} sites needed (min-nodes) "
                          f"sent a usable fingerprint" + "".join(f"; {f}" for f in failures))
    # before any site trains on a task the others lack; the rounds hold every site to it
    run.site_structure = check_structures(structures)
    try:
        # under a robust rule no site's reported counts outweigh another's
        harmonisation = combine(prints, settings.harmonise, target,
                                each_site_once=settings.robust_aggregation)
    except DataError as exc:
        raise TooFewSites(f"the sites' fingerprints do not combine: {exc}") from None
    run.save_harmonisation(harmonisation, shown, failures)
    log(INFO, "harmonisation from %d sites' fingerprints: %s", len(prints),
        harmonisation.describe())
    return harmonisation
