"""fedseg and a real PACS: Orthanc with its DICOMweb plugin, authentication
on (tests/orthanc.py). Real series from ../shared/data are uploaded through
Orthanc's own REST API; ``fedseg predict --dicomweb`` reads them over
QIDO-RS/WADO-RS and stores its DICOM SEG with STOW-RS; the SEG read back from
Orthanc (its REST API again) is valid by dciodvfy and the same, voxel for
voxel, as ``fedseg predict`` on the same series in a folder.
``fedseg site pull`` builds a site from studies of images and their SEG or
RTSTRUCT, stops midway and resumes; ``fedseg site check`` reads it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests
from pydicom.uid import generate_uid

from client.dicomweb import ENV_PASSWORD, ENV_TOKEN, ENV_USER, Credentials, Pacs
from client.pacs import pull_site
from server.cli import main
from tests.orthanc import PASSWORD, USER, start_orthanc, start_tls_proxy
from tests.unit.test_inference import dicom_errors, saved_model
from tests.unit.test_label_readers import SERIES

GE_SEG = "highdicom_seg/test_files/seg_image_ct_binary.dcm"  # drawn on SERIES
RT = "rtutils_ct_rtstruct/mock_data"  # ct_1.dcm, ct_2.dcm and rt.dcm drawn on them


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    server = start_orthanc(tmp_path_factory.mktemp("orthanc"))
    yield server
    server.stop()


@pytest.fixture
def credentials(monkeypatch):
    monkeypatch.delenv(ENV_TOKEN, raising=False)
    monkeypatch.setenv(ENV_USER, USER)
    monkeypatch.setenv(ENV_PASSWORD, PASSWORD)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return saved_model(tmp_path_factory.mktemp("run"))


def upload(orthanc, files) -> None:
    """Through Orthanc's own REST API, byte for byte (not fedseg's code)."""
    for f in files:
        answer = requests.post(f"{orthanc.base}/instances", data=Path(f).read_bytes(),
                               auth=(USER, PASSWORD), timeout=30)
        assert answer.status_code == 200, answer.text


def stored_file(orthanc, sop_instance_uid: str, into: Path) -> Path:
    """The instance as Orthanc stores it, through its REST API."""
    found = requests.post(f"{orthanc.base}/tools/find", auth=(USER, PASSWORD), timeout=30,
                          json={"Level": "Instance",
                                "Query": {"SOPInstanceUID": sop_instance_uid}}).json()
    assert len(found) == 1, found
    data = requests.get(f"{orthanc.base}/instances/{found[0]}/file", auth=(USER, PASSWORD),
                        timeout=30).content
    into.write_bytes(data)
    return into


def fresh_copy(files, out: Path, tag: str, **values) -> Path:
    """A copy of a real series as another study (new study, series and
    instance UIDs, so that Orthanc keeps it apart) with header values changed."""
    out.mkdir(parents=True)
    study, series = generate_uid(entropy_srcs=[tag, "study"]), generate_uid(
        entropy_srcs=[tag, "series"])
    for f in sorted(files):
        ds = pydicom.dcmread(f)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = generate_uid(entropy_srcs=[tag, str(ds.SOPInstanceUID)])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        for keyword, value in values.items():
            setattr(ds, keyword, value)
        ds.save_as(out / Path(f).name)
    return out


def fedseg(capsys, *args: str) -> tuple[int, str]:
    """The command in this process (as `fedseg ARGS`): exit code and output."""
    capsys.readouterr()
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def stored_segs(output: str) -> list[tuple[str, str]]:
    return re.findall(r"SEG SOP Instance UID ([0-9.]+), Series Instance UID ([0-9.]+)", output)


def test_predict_from_and_to_orthanc_matches_the_folder_path(tmp_path, dicom_dir, orthanc,
                                                             model, credentials, capsys):
    """The GE CT series with an empty Specific Character Set, as real archives
    hold it: segmented from the PACS and stored back; the stored SEG is valid
    and the same as predict on the folder; then --study does its image series
    and skips the SEG it just stored."""
    series = fresh_copy((dicom_dir / SERIES).iterdir(), tmp_path / "ct", "empty-charset",
                        SpecificCharacterSet="")
    upload(orthanc, series.iterdir())
    first = pydicom.dcmread(next(series.iterdir()))
    code, out = fedseg(capsys, "predict", str(model), "--dicomweb", orthanc.url,
                       "--series", first.SeriesInstanceUID, "--store")
    assert code == 0, out
    assert PASSWORD not in out
    ((sop, seg_series),) = stored_segs(out)
    stored = pydicom.dcmread(stored_file(orthanc, sop, tmp_path / "stored.dcm"))
    assert stored.Modality == "SEG" and stored.SeriesInstanceUID == seg_series
    assert stored.StudyInstanceUID == first.StudyInstanceUID
    assert dicom_errors(tmp_path / "stored.dcm") == []
    # the folder path on the same files
    code, out = fedseg(capsys, "predict", str(model), str(series), "--out",
                       str(tmp_path / "folder"))
    assert code == 0, out
    (local,) = (tmp_path / "folder").iterdir()
    local = pydicom.dcmread(local)
    assert np.array_equal(stored.pixel_array, local.pixel_array)
    assert stored.pixel_array.any()

    def frames(seg):  # each frame's source slice
        return [f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
                for f in seg.PerFrameFunctionalGroupsSequence]

    assert frames(stored) == frames(local)

    # --study: the CT series again; the SEG just stored is skipped, saying why
    code, out = fedseg(capsys, "predict", str(model), "--dicomweb", orthanc.url,
                       "--study", first.StudyInstanceUID, "--store")
    assert code == 0, out
    assert f"skipped series {seg_series} (SEG" in out and "not an image" in out
    assert len(stored_segs(out)) == 1
    # a SEG named as the series to segment: refused, naming it
    code, out = fedseg(capsys, "predict", str(model), "--dicomweb", orthanc.url,
                       "--series", seg_series, "--store")
    assert code == 2 and f"series {seg_series} is a segmentation (SEG), not an image" in out


def test_wrong_credentials_unknown_uids_and_unsafe_files_are_clear_errors(
        tmp_path, orthanc, model, monkeypatch, capsys):
    monkeypatch.delenv(ENV_TOKEN, raising=False)
    monkeypatch.setenv(ENV_USER, USER)
    monkeypatch.setenv(ENV_PASSWORD, "not-the-password")
    args = ("predict", str(model), "--dicomweb", orthanc.url, "--series", "1.2.3", "--store")
    code, out = fedseg(capsys, *args)
    assert code == 3 and "HTTP 401" in out and "refused" in out, out
    assert "not-the-password" not in out and PASSWORD not in out
    monkeypatch.delenv(ENV_USER)
    monkeypatch.delenv(ENV_PASSWORD)
    code, out = fedseg(capsys, *args)
    assert code == 3 and "no credentials were given" in out, out
    # the file: refused while others may read it; then the unknown series, named
    auth = tmp_path / "pacs.toml"
    auth.write_text(f'user = "{USER}"\npassword = "{PASSWORD}"\n')
    auth.chmod(0o644)
    code, out = fedseg(capsys, *args, "--dicomweb-auth", str(auth))
    assert code == 2 and "chmod 600" in out, out
    auth.chmod(0o600)
    code, out = fedseg(capsys, *args, "--dicomweb-auth", str(auth))
    assert code == 2 and "has no series 1.2.3" in out, out
    # credentials in the URL are refused before anything is sent
    url = orthanc.url.replace("://", f"://{USER}:{PASSWORD}@")
    code, out = fedseg(capsys, "predict", str(model), "--dicomweb", url, "--series", "1.2.3",
                       "--store")
    assert code == 2 and "credentials in the URL" in out and PASSWORD not in out
    # nothing listens: exit 3, the server named
    code, out = fedseg(capsys, "predict", str(model), "--dicomweb",
                       "http://127.0.0.1:9/dicom-web", "--series", "1.2.3", "--out",
                       str(tmp_path / "o"))
    assert code == 3 and "cannot reach the PACS at http://127.0.0.1:9/dicom-web" in out


def test_site_pull_stopped_midway_resumes_and_site_check_reads_it(
        tmp_path, dicom_dir, orthanc, model, credentials, capsys):
    """Two real studies: the GE CT series with its highdicom SEG, and a CT
    with its RTSTRUCT; a SEG made by fedseg predict is not taken as a label."""
    ct = fresh_copy((dicom_dir / SERIES).iterdir(), tmp_path / "ge", "pull-ge")
    seg = pydicom.dcmread(dicom_dir / GE_SEG)  # drawn on the original UIDs: follow the copy
    originals = {str(pydicom.dcmread(f).SOPInstanceUID): str(pydicom.dcmread(ct / f.name)
                                                             .SOPInstanceUID)
                 for f in (dicom_dir / SERIES).iterdir()}
    first = pydicom.dcmread(next(ct.iterdir()))
    seg.StudyInstanceUID = first.StudyInstanceUID
    seg.ReferencedSeriesSequence[0].SeriesInstanceUID = first.SeriesInstanceUID
    for item in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence:
        item.ReferencedSOPInstanceUID = originals[item.ReferencedSOPInstanceUID]
    for frame in seg.PerFrameFunctionalGroupsSequence:
        for source in frame.DerivationImageSequence[0].SourceImageSequence:
            source.ReferencedSOPInstanceUID = originals[source.ReferencedSOPInstanceUID]
    seg.save_as(tmp_path / "ge-seg.dcm")
    upload(orthanc, [*ct.iterdir(), tmp_path / "ge-seg.dcm",
                     *sorted((dicom_dir / RT).glob("*.dcm"))])
    code, out = fedseg(capsys, "predict", str(model), "--dicomweb", orthanc.url, "--series",
                       first.SeriesInstanceUID, "--store")
    assert code == 0, out
    rt_study = str(pydicom.dcmread(dicom_dir / RT / "rt.dcm").StudyInstanceUID)
    studies = tmp_path / "studies.txt"
    studies.write_text(f"# the site's studies\n{first.StudyInstanceUID}\n{rt_study}\n")
    site = tmp_path / "site"

    seen: list[str] = []

    def stop(event, **details):  # stopped (as by Ctrl-C) at the second study's first instance
        if event == "instance":
            seen.append(event)
            if len(seen) == 5:
                raise KeyboardInterrupt

    pacs = Pacs(orthanc.url, Credentials(USER, PASSWORD))
    with pytest.raises(KeyboardInterrupt):
        pull_site(pacs, [first.StudyInstanceUID, rt_study], site, test_fraction=0.5,
                  report=stop)
    assert len(seen) == 5  # the GE series' 4 slices, then one of the RT study's
    assert (site / "images" / first.SeriesInstanceUID).is_dir()
    assert not list(site.rglob("*.tmp")) and not (site / "dataset.json").exists()
    assert [p.name for p in (site / "images").iterdir() if not p.name.startswith(".")] == [
        first.SeriesInstanceUID]  # the RT series is not there as if whole

    code, out = fedseg(capsys, "site", "pull", str(site), "--dicomweb", orthanc.url,
                       "--studies", str(studies), "--test-fraction", "0.5")
    assert code == 0, out
    assert f"study {first.StudyInstanceUID}: already pulled" in out
    assert f"study {rt_study}: pulled (1 case(s))" in out
    record = json.loads((site / ".fedseg-pull" / f"{first.StudyInstanceUID}.json").read_text())
    assert any("made by fedseg predict" in note for note in record["notes"])  # not a label
    spec = json.loads((site / "dataset.json").read_text())
    assert len(spec["training"]) == 1 and len(spec["test"]) == 1
    assert spec["label_names_found"] == {"first segment": {"cases": 1, "in": ["SEG"]},
                                         "ROI-1": {"cases": 1, "in": ["RTSTRUCT"]}}
    assert "labels" not in spec  # no name common to both: the hospital fills it in
    assert not [p for p in (site / "images").iterdir() if p.name.startswith(".")]
    assert len(list((site / "images" / first.SeriesInstanceUID).iterdir())) == 4
    # the hospital names its structure, then site check reads the site as a run would
    spec["labels"] = {"0": "background", "1": "lesion"}
    spec["label_aliases"] = {"lesion": ["first segment", "ROI-1"]}
    (site / "dataset.json").write_text(json.dumps(spec))
    code, out = fedseg(capsys, "site", "check", str(site), "--strict")
    assert code == 0, out
    # pulled again: nothing fetched, the hospital's map kept
    code, out = fedseg(capsys, "site", "pull", str(site), "--dicomweb", orthanc.url,
                       "--studies", str(studies), "--test-fraction", "0.5")
    assert code == 0 and out.count("already pulled") == 2, out
    kept = json.loads((site / "dataset.json").read_text())
    assert kept["labels"] == spec["labels"] and kept["label_aliases"] == spec["label_aliases"]


@pytest.mark.slow  # the default suite's 8 minutes
def test_tls_is_verified_against_the_given_ca(tmp_path, dicom_dir, orthanc, model,
                                              credentials, capsys):
    """The PACS behind an HTTPS proxy whose certificate a private CA signed:
    refused against the system's CA store, accepted with --dicomweb-ca."""
    from server.provision import provision

    provision(tmp_path / "certs", ["127.0.0.1"], [])
    link = tmp_path / "certs" / "superlink"
    ca = link / "ca.crt"
    proxy = start_tls_proxy(tmp_path / "nginx", orthanc, link / "server.pem",
                            link / "server.key", ca)
    try:
        upload(orthanc, [dicom_dir / RT / "ct_1.dcm"])
        uid = str(pydicom.dcmread(dicom_dir / RT / "ct_1.dcm").SeriesInstanceUID)
        args = ("predict", str(model), "--dicomweb", proxy.url, "--series", uid)
        code, out = fedseg(capsys, *args, "--out", str(tmp_path / "a"))
        assert code == 3 and "certificate that cannot be verified" in out, out
        assert "--dicomweb-ca" in out
        code, out = fedseg(capsys, *args, "--out", str(tmp_path / "b"), "--dicomweb-ca",
                           str(ca))
        assert code == 0, out
        (written,) = (tmp_path / "b").iterdir()
        assert pydicom.dcmread(written).Modality == "SEG"
    finally:
        proxy.stop()


def test_a_token_goes_as_a_bearer_header_and_never_into_messages(monkeypatch):
    session = requests.Session()
    monkeypatch.setenv(ENV_TOKEN, "tok-123")
    monkeypatch.delenv(ENV_USER, raising=False)
    monkeypatch.delenv(ENV_PASSWORD, raising=False)
    from client.dicomweb import read_credentials

    creds = read_credentials(None)
    creds.apply(session)
    assert session.headers["Authorization"] == "Bearer tok-123"
    assert "tok-123" not in creds.source and "tok-123" not in repr(creds)
