"""Bad bytes never crash a reader (issue 17, item 5).

Mutated and truncated DICOM (many transfer syntaxes, multi-frame, RGB, series
folders with one slice mutated), DICOM SEG, NIfTI, PNG and JPEG files go through
``load_case`` in child processes (3 GiB address-space limit, a 10 s alarm per
input, a watchdog); see tests/fuzz_readers.py for the seeds and mutations. Every
outcome must be a usable case or the project's own data error naming the case:
no other exception, no hang, no child killed, no memory error. Seeds are fixed:
the same inputs every run. ``pytest -s`` prints the counts.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import pytest

from tests import fuzz_readers as fuzz

ADDRESS_SPACE = 3 * fuzz.GIB
MASTER_SEED = 17


@pytest.fixture
def scratch():
    """Mutated copies go to the system's temporary folder, never into the project."""
    folder = Path(tempfile.mkdtemp(prefix="fedseg-fuzz-"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def fuzz_readers(seeds: list[dict], per_target: int, scratch: Path) -> dict:
    inputs = fuzz.plan(seeds, per_target, MASTER_SEED)
    start = time.monotonic()
    report = fuzz.run(seeds, inputs, scratch / "run", shards=2, per_input_s=10, total_s=150,
                      address_space=ADDRESS_SPACE)
    print(f"\n{fuzz.describe(report)}; {time.monotonic() - start:.1f} s")
    return report


def check(report: dict, at_least: int) -> None:
    def show(rows: list[dict]) -> str:
        return "\n".join(
            f"  input {r['i']}: {r['seed']} {r['target']} {r['mutation']} {r.get('note') or ''}"
            f" -> {r['outcome']} {r['type']}: {r['message'][:300]}"
            f"{' (from ' + r['cause'] + ': ' + r['cause_message'] + ')' if 'cause' in r else ''}"
            f"{chr(10) + '    ' + r['where'].strip() if r.get('where') else ''}"
            for r in rows)

    assert not report["timed_out"], f"the fuzz run passed its overall time limit: {report}"
    assert not report["unmutated_not_loaded"], "a seed case does not load:\n" + show(
        report["unmutated_not_loaded"])
    assert not report["hangs"], "inputs hung a reader:\n" + show(report["hangs"])
    assert not report["other"], ("outcomes other than a case or a data error naming the "
                                 "case:\n" + show(report["other"]))
    assert not report["memory_errors"], "inputs ran out of memory:\n" + show(
        report["memory_errors"])
    assert report["peak_rss_bytes"] < ADDRESS_SPACE // 2, (
        f"peak RSS {report['peak_rss_bytes'] >> 20} MiB at {report['peak_rss_input']}")
    assert len(report["skipped"]) <= report["mutated"] // 20, "mutations that did not apply:\n" + (
        show(report["skipped"]))
    assert report["mutated"] >= at_least
    assert report["loaded"] > 0 and report["data_errors"] > 0


def test_mutated_synthetic_files(scratch):
    """DICOM series + DICOM SEG, series + NIfTI label, NIfTI images (gzip and raw),
    a single DICOM slice, 8- and 16-bit PNG, RGB JPEG, palette PNG labels."""
    seeds = fuzz.build_seeds(scratch / "seeds")
    check(fuzz_readers(seeds, 16, scratch), at_least=280)


@pytest.mark.slow  # with the drills: keeps the default suite under 8 min (issue 27 added ~70 s)
def test_mutated_real_files(scratch, dicom_dir, retina_dir):
    """pydicom's and highdicom's files in ../shared/data (uncompressed, RLE, JPEG
    baseline and lossless, JPEG-LS, JPEG 2000, big endian, implicit VR, deflated,
    multi-frame, RGB), highdicom's DICOM SEGs with their CT series, retina images."""
    seeds = fuzz.build_seeds(scratch / "seeds", dicom_dir, retina_dir)
    check(fuzz_readers(seeds, 12, scratch), at_least=500)


# ------------------------------------------------------------------------------------
# The size guards, one hostile file each (found by the fuzzer or written to its brief);
# in process, so they show the error each file gets.

def _synthetic_slice(folder: Path) -> Path:
    from common.data.synthetic import write_site

    site = write_site(folder / "site", 1, n_train=1, n_test=0, seed=5)
    return sorted((site / "imagesTr" / "case_tr000").iterdir())[0]


def _png_chunks(data: bytes) -> list[list]:
    import struct

    chunks, pos = [], 8
    while pos + 8 <= len(data):
        length, ctype = struct.unpack(">I4s", data[pos: pos + 8])
        chunks.append([ctype, data[pos + 8: pos + 8 + length]])
        pos += 12 + length
    return chunks


def _png(chunks: list[list], lengths: dict | None = None) -> bytes:
    import struct
    import zlib

    lengths = lengths or {}
    return b"\x89PNG\r\n\x1a\n" + b"".join(
        struct.pack(">I", lengths.get(t, len(p))) + t + p + struct.pack(">I", zlib.crc32(t + p))
        for t, p in chunks)


def test_dicom_claiming_a_huge_frame_count_is_refused_unread(scratch):
    import pydicom

    from common.data.readers import read_image
    from common.errors import UnsupportedFormatError

    ds = pydicom.dcmread(_synthetic_slice(scratch))
    ds.Rows = ds.Columns = 65535
    ds.NumberOfFrames = 1000
    ds.save_as(scratch / "huge.dcm")
    with pytest.raises(UnsupportedFormatError, match="65535 x 65535 pixels x 1000 frames"):
        read_image(scratch / "huge.dcm")


def _peak_traced(read) -> int:
    """Peak bytes Python's allocators held while ``read()`` ran (a DataError is fine)."""
    import tracemalloc

    from common.errors import DataError

    tracemalloc.start()
    try:
        read()
    except DataError:
        pass
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


def test_length_fields_claiming_gigabytes_allocate_nothing_of_the_sort(scratch):
    """pydicom reads an element, Pillow a PNG chunk, by its length field: a corrupt
    length of 4 GB had them allocate 4 GB (a MemoryError under the fuzzer's limit)."""
    import struct

    import numpy as np
    from PIL import Image

    from common.data.readers import read_image

    data = bytearray(_synthetic_slice(scratch).read_bytes())
    pos = data.rfind(b"\xe0\x7f\x10\x00OW\x00\x00")  # Pixel Data, explicit VR: 4-byte length
    struct.pack_into("<I", data, pos + 8, 0xFFFFFFF0)
    (scratch / "long.dcm").write_bytes(bytes(data))
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(scratch / "p.png")
    chunks = _png_chunks((scratch / "p.png").read_bytes())
    (scratch / "long.png").write_bytes(_png(chunks, {b"IDAT": 0xD6FFFF2F}))
    for path in (scratch / "long.dcm", scratch / "long.png"):
        assert _peak_traced(lambda path=path: read_image(path)) < 64 << 20, path.name


def test_deflate_bomb_dicom_is_refused_before_pydicom_inflates_it(scratch, monkeypatch):
    import zlib

    import pydicom

    from common.data import readers
    from common.errors import UnsupportedFormatError

    ds = pydicom.dcmread(_synthetic_slice(scratch))
    ds.file_meta.TransferSyntaxUID = readers.DEFLATED_SYNTAX
    ds.save_as(scratch / "deflated.dcm", enforce_file_format=True)
    readers.read_image(scratch / "deflated.dcm")  # a genuine deflated file reads
    monkeypatch.setattr(readers, "MAX_BYTES", 1 << 20)  # so a small bomb is enough
    data = (scratch / "deflated.dcm").read_bytes()
    meta_end = len(data) - len(fuzz.deflated_body(data))
    bomb = zlib.compressobj(9, zlib.DEFLATED, -15)
    body = bomb.compress(zlib.decompress(data[meta_end:], -15) + bytes(4 << 20)) + bomb.flush()
    (scratch / "bomb.dcm").write_bytes(data[:meta_end] + body)
    with pytest.raises(UnsupportedFormatError, match="inflates to more than"):
        readers.read_image(scratch / "bomb.dcm")


def test_jpeg_in_dicom_claiming_another_size_is_refused_before_decoding(dicom_dir, scratch):
    import struct

    from common.data.readers import read_image
    from common.errors import UnreadableFileError

    # The fuzzer's find: this SOF made libjpeg allocate ~3 GiB and work for 12 s.
    data = bytearray((dicom_dir / fuzz.PD / "JPGLosslessP14SV1_1s_1f_8b.dcm").read_bytes())
    sof = data.index(b"\xff\xc3")
    struct.pack_into(">HH", data, sof + 5, 65535, 32767)
    (scratch / "sof.dcm").write_bytes(bytes(data))
    with pytest.raises(UnreadableFileError, match="holds a 65535 x 32767 image"):
        read_image(scratch / "sof.dcm")


def test_nifti_headers_claiming_more_than_the_file_holds(scratch):
    import gzip

    import nibabel as nib
    import numpy as np

    from common.data.readers import read_image
    from common.errors import UnreadableFileError, UnsupportedFormatError

    raw = bytearray(nib.Nifti1Image(np.zeros((8, 8, 4), np.int16), np.eye(4)).to_bytes())
    for dims, error, match in (((32767, 32767, 32767), UnsupportedFormatError, "at most"),
                               ((1000, 1000, 100), UnreadableFileError, "can hold")):
        raw[40:56] = np.array([3, *dims, 1, 1, 1, 1], "<i2").tobytes()
        path = scratch / f"claims-{dims[0]}.nii.gz"
        path.write_bytes(gzip.compress(bytes(raw)))
        with pytest.raises(error, match=match):
            read_image(path)


def test_png_bombs_are_refused_before_decoding(scratch):
    import struct
    import zlib

    import numpy as np
    from PIL import Image

    from common.data.readers import read_image
    from common.errors import UnsupportedFormatError

    Image.fromarray(np.zeros((4, 4), np.uint8)).convert("P").save(scratch / "p.png")
    chunks = _png_chunks((scratch / "p.png").read_bytes())
    # a palette PNG of 12000 x 12000 zeros: 300 kB that Pillow would expand to RGB
    struct.pack_into(">II", ihdr := bytearray(chunks[0][1]), 0, 12000, 12000)
    zeros = zlib.compressobj(1)
    stream = b"".join(zeros.compress(bytes(12001 * 1000)) for _ in range(12)) + zeros.flush()
    bomb = [[b"IHDR", bytes(ihdr)]] + [c for c in chunks[1:] if c[0] != b"IDAT"]
    bomb.insert(-1, [b"IDAT", stream])
    (scratch / "bomb.png").write_bytes(_png(bomb))
    with pytest.raises(UnsupportedFormatError, match="12000 x 12000 pixels x 3 channel"):
        read_image(scratch / "bomb.png")
    # a size past Pillow's own decompression-bomb limit
    struct.pack_into(">II", ihdr, 0, 100000, 100000)
    (scratch / "huge.png").write_bytes(_png([[b"IHDR", bytes(ihdr)], *chunks[1:]]))
    with pytest.raises(UnsupportedFormatError, match="decompression-bomb limit"):
        read_image(scratch / "huge.png")
