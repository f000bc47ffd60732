"""Secure aggregation (SecAgg+, Flower's own protocol code) with the real apps
on the in-process grid: the same aggregate as plain FedAvg within the
quantisation bound, masked uploads, and a site that drops out after sharing
its keys."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

from common.data.synthetic import write_federation
from server.runs import read_metrics
from server.wire import AUDIT_DIR_ENV
from tests.grid import audited_replies, federation, run_server

CLIP, MAX_WEIGHT, CASES = 8.0, 10.0, 2
SMALL = {"num-rounds": 1, "seed": 0, "secagg-max-weight": MAX_WEIGHT,
         "secagg-clipping-range": CLIP, "min-nodes": 3, "model-channels": "16,32,64",
         "patch-size": 32, "batch-size": 2, "patches-per-image": 1}


@pytest.fixture(scope="module")
def four_sites(tmp_path_factory):
    folders = write_federation(tmp_path_factory.mktemp("sa"), 4, n_train=CASES, n_test=1,
                               seed=5)
    # The last site cannot train (its training labels are missing): it drops out
    # of the secure round after the key exchange, when training is asked for.
    for label in (folders[3] / "labelsTr").iterdir():
        label.unlink()
    return [(f"site-{i}", f) for i, f in enumerate(folders)]


def test_secure_aggregate_is_fedavgs_and_uploads_are_masked(four_sites, tmp_path,
                                                            monkeypatch):
    run_server(federation(four_sites, {**SMALL, "run-name": "plain"}), tmp_path)
    audit = tmp_path / "audit"
    monkeypatch.setenv(AUDIT_DIR_ENV, str(audit))
    run_server(federation(four_sites, {**SMALL, "run-name": "secure",
                                       "secure-aggregation": True}), tmp_path)
    # The site that cannot train dropped out after sharing keys; the others count.
    row = read_metrics(tmp_path / "secure")[0]
    assert any("dropped out" in f for f in row["failures"])
    assert set(row["train_loss_sites"]) == {"site-0", "site-1", "site-2"}
    # Same aggregate as FedAvg of the three, within the quantisation bound:
    # sites * (2 * clip / 2^22) * max_weight / total cases.
    bound = 3 * (2 * CLIP / 2**22) * MAX_WEIGHT / (3 * CASES)
    a, b = (torch.load(tmp_path / name / "final_model.pt", weights_only=True)
            for name in ("plain", "secure"))
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert 0 < worst <= bound
    # What the server received in the secure round: no plaintext weights, and
    # each site's upload is masked: spread uniformly over [0, 2^32), where its
    # quantised weights would all lie below 2^22.
    uploads = []
    for msg in audited_replies(audit, "round0001-secagg*"):
        assert all(len(rec) == 0 for rec in msg.content.array_records.values())
        cfg = msg.content.config_records[RECORD_KEY_CONFIGS]
        if Key.MASKED_PARAMETERS in cfg:
            uploads.append(np.concatenate(
                [bytes_to_ndarray(b).ravel() for b in cfg[Key.MASKED_PARAMETERS]]))
    assert len(uploads) == 3
    for upload in uploads:
        values = upload.astype(np.float64)
        assert upload.size > 50_000
        assert np.mean(values < 2**22) < 0.01
        assert abs(values.mean() / 2**32 - 0.5) < 0.01
    assert abs(np.corrcoef(uploads[0][:100_000], uploads[1][:100_000])[0, 1]) < 0.02
    shutil.rmtree(audit)
