"""The hospital's own PACS over DICOMweb (QIDO-RS to find, WADO-RS to
retrieve, STOW-RS to store), through the ``dicomweb-client`` library.

Only the hospital's PACS is ever spoken to, by ``fedseg predict --dicomweb``
and ``fedseg site pull``; nothing here reaches the federation's server.

Credentials come from a file (``--dicomweb-auth FILE``, TOML, readable by its
owner only) or the environment (:data:`ENV_USER`, :data:`ENV_PASSWORD`,
:data:`ENV_TOKEN`), never from the command line: a URL with ``user:password@``
in it is refused. TLS is verified against ``--dicomweb-ca FILE``, else the
system's CA store. Errors say what failed and name the UID or the server,
never a password or token.
"""

from __future__ import annotations

import os
import ssl
import stat
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import requests

from common.errors import ConfigError, FedsegError

ENV_USER = "FEDSEG_DICOMWEB_USER"
ENV_PASSWORD = "FEDSEG_DICOMWEB_PASSWORD"
ENV_TOKEN = "FEDSEG_DICOMWEB_TOKEN"

# Exit codes of the PACS commands (docs/using-the-model.md)
EXIT_PARTLY = 1  # some series or studies could not be done; the others were
EXIT_USAGE = 2  # the command, a file it names or a UID is wrong
EXIT_PACS = 3  # the PACS could not be reached, refused the credentials, or failed

# what the PACS sends as stored (no transcoding): the voxels are the stored ones
ANY_TRANSFER_SYNTAX = (("application/dicom", "*"),)

# Modalities whose series hold no image to segment, and what they are
NOT_IMAGES = {
    "SEG": "a segmentation", "RTSTRUCT": "a radiotherapy structure set",
    "RTPLAN": "a radiotherapy plan", "RTDOSE": "a radiotherapy dose grid",
    "RTRECORD": "a treatment record", "SR": "a structured report",
    "PR": "a presentation state", "KO": "a key object selection", "DOC": "a document",
    "REG": "a registration", "FID": "fiducials", "RWV": "real world value maps",
    "PLAN": "a plan", "AU": "audio", "ECG": "a waveform", "HD": "a waveform",
}
LABEL_MODALITIES = ("SEG", "RTSTRUCT")


class PacsError(FedsegError):
    """The PACS could not be reached, refused us, or failed an operation."""

    kind = "PACS error"


class PacsNotFoundError(ConfigError):
    """A study or series UID the PACS does not hold (a wrong UID: exit 2)."""


@dataclass(frozen=True)
class Credentials:
    """How fedseg authenticates to the PACS, and where that came from (for
    messages: the source, never the secret)."""

    user: str | None = None
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    source: str = "none"

    def apply(self, session) -> None:
        if self.token:
            session.headers["Authorization"] = f"Bearer {self.token}"
        elif self.user is not None:
            session.auth = (self.user, self.password or "")


def read_credentials(auth_file: Path | None, env: dict[str, str] | None = None) -> Credentials:
    """The credentials: ``auth_file`` (TOML: ``user`` and ``password``, or
    ``token``) when given, else the environment, else none. A file that its
    group or others may read or write is refused (chmod 600 it)."""
    env = os.environ if env is None else env
    if auth_file is not None:
        path = Path(auth_file)
        try:
            mode = path.stat().st_mode
        except OSError as exc:
            raise ConfigError(f"--dicomweb-auth {path}: {exc.strerror}") from None
        if not stat.S_ISREG(mode):
            raise ConfigError(f"--dicomweb-auth {path} is not a file")
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigError(f"--dicomweb-auth {path} can be read or written by its group or "
                              f"others (mode {stat.S_IMODE(mode):03o}): it holds a secret; "
                              f"chmod 600 {path}")
        try:
            spec = tomllib.loads(path.read_text())
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            # the parser's message may quote the line, which may be the secret
            raise ConfigError(f"--dicomweb-auth {path} is not a TOML file of user and password, "
                              f"or token ({type(exc).__name__})") from None
        unknown = sorted(set(spec) - {"user", "password", "token"})
        if unknown or not all(isinstance(v, str) for v in spec.values()):
            raise ConfigError(f"--dicomweb-auth {path}: only the strings user, password and "
                              f"token may be set (found {', '.join(sorted(spec))})")
        return _credentials(spec.get("user"), spec.get("password"), spec.get("token"),
                            f"--dicomweb-auth {path}", ("user", "password", "token"))
    return _credentials(env.get(ENV_USER), env.get(ENV_PASSWORD), env.get(ENV_TOKEN),
                        "the environment", (ENV_USER, ENV_PASSWORD, ENV_TOKEN))


def _credentials(user, password, token, source: str, names: tuple[str, str, str]
                 ) -> Credentials:
    if token and (user or password):
        raise ConfigError(f"{source} sets both {names[2]} and {names[0]}/{names[1]}: give one")
    if token:
        return Credentials(token=token, source=f"{source} ({names[2]}: a bearer token)")
    if password and not user:
        raise ConfigError(f"{source} sets {names[1]} without {names[0]}")
    if user:
        if not password:
            raise ConfigError(f"{source} sets {names[0]} without {names[1]}")
        return Credentials(user, password, source=f"{source} ({names[0]} {user!r}: basic auth)")
    return Credentials()


def check_url(url: str) -> str:
    """The DICOMweb base URL, checked: http(s), a host, and no credentials in it
    (they would show in process lists and shell history)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"--dicomweb {url!r} is not an http:// or https:// URL of the "
                          f"PACS's DICOMweb root (e.g. https://pacs.example/dicom-web)")
    if parts.username or parts.password:
        raise ConfigError("--dicomweb has credentials in the URL: give them in "
                          f"{ENV_USER}/{ENV_PASSWORD}, {ENV_TOKEN} or --dicomweb-auth FILE, "
                          "never on the command line")
    return url.rstrip("/")


def system_ca() -> str | bool:
    """The system's CA bundle (OpenSSL's default file), else requests' own."""
    paths = ssl.get_default_verify_paths()
    for candidate in (paths.cafile, paths.openssl_cafile):
        if candidate and os.path.isfile(candidate):
            return candidate
    return True


@dataclass(frozen=True)
class SeriesInfo:
    """A series as QIDO-RS lists it."""

    study: str
    series: str
    modality: str
    description: str = ""
    number: str = ""
    instances: int | None = None

    @property
    def shown(self) -> str:
        what = " ".join(x for x in (self.modality, self.description and
                                    repr(self.description)) if x)
        return f"series {self.series} ({what or 'no modality'})"

    def not_image(self) -> str | None:
        """What the series is when it holds no image to segment, else None."""
        what = NOT_IMAGES.get(self.modality.upper())
        return f"{what} ({self.modality})" if what else None


@dataclass(frozen=True)
class InstanceInfo:
    sop_instance: str
    sop_class: str
    frames: int = 1

    @property
    def is_image(self) -> bool:
        from pydicom.uid import UID

        name = UID(self.sop_class).name if self.sop_class else ""
        return "Image Storage" in name or (name == self.sop_class and bool(self.sop_class))


def _value(item: dict, tag: str, default=""):
    values = item.get(tag, {}).get("Value") or [default]
    return values[0]


class Pacs:
    """One PACS's DICOMweb service, with fedseg's error messages."""

    def __init__(self, url: str, credentials: Credentials, ca: Path | None = None,
                 timeout: float = 60.0) -> None:
        from dicomweb_client.api import DICOMwebClient

        self.url = check_url(url)
        self.credentials = credentials
        session = _Session()
        if ca is not None:
            if not Path(ca).is_file():
                raise ConfigError(f"--dicomweb-ca {ca} is not a file (the PEM certificate of "
                                  f"the CA that signed the PACS's certificate)")
            session.verify = str(ca)
        else:
            session.verify = system_ca()
        self.ca = ca
        credentials.apply(session)
        self.client = DICOMwebClient(self.url, session=session, timeout=timeout)
        # retry only what a busy server answers (429, 503, ...), twice
        self.client.set_http_retry_params(max_attempts=3, wait_exponential_multiplier=500)

    # ------------------------------------------------------------------ errors

    def _call(self, what: str, fn: Callable, *args, missing: str | None = None, **kwargs):
        """``fn(*args, **kwargs)``, with the transport's failures as PacsError
        saying what was being done (``what``) and what to do about it."""
        try:
            return fn(*args, **kwargs)
        except requests.exceptions.SSLError as exc:
            hint = ("check that it is the CA that signed the PACS's certificate"
                    if self.ca else "give the CA that signed it with --dicomweb-ca FILE")
            raise PacsError(f"the PACS at {self.url} has a certificate that cannot be "
                            f"verified ({_reason(exc)}): {hint}") from None
        except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as exc:
            raise PacsError(f"cannot reach the PACS at {self.url} ({_reason(exc)}) while "
                            f"{what}") from None
        except requests.exceptions.HTTPError as exc:
            code = exc.response.status_code if exc.response is not None else 0
            if code == 401:
                used = ("no credentials were given: set " f"{ENV_USER}/{ENV_PASSWORD} or "
                        f"{ENV_TOKEN}, or give --dicomweb-auth FILE"
                        if self.credentials.source == "none"
                        else f"the credentials from {self.credentials.source} were refused")
                raise PacsError(f"the PACS at {self.url} refused access (HTTP 401 "
                                f"Unauthorized) while {what}: {used}") from None
            if code == 403:
                raise PacsError(f"the PACS at {self.url} does not allow this account to do "
                                f"this (HTTP 403 Forbidden) while {what}") from None
            if code == 404 and missing:
                raise PacsNotFoundError(missing) from None
            raise PacsError(f"the PACS at {self.url} answered HTTP {code} "
                            f"{getattr(exc.response, 'reason', '') or ''} while {what}"
                            ) from None
        except requests.exceptions.RequestException as exc:
            raise PacsError(f"the PACS at {self.url} failed while {what} "
                            f"({type(exc).__name__})") from None

    # ------------------------------------------------------------------ QIDO-RS

    def check(self) -> None:
        """One cheap query, so that a wrong URL or password stops at once."""
        self._call("checking access (QIDO-RS)", self.client.search_for_studies, limit=1)

    def series(self, series_uid: str, study_uid: str | None = None) -> SeriesInfo:
        """The series ``series_uid`` (in ``study_uid`` where given); a
        PacsNotFoundError naming it where the PACS does not hold it."""
        where = f" in study {study_uid}" if study_uid else ""
        found = self._call(f"looking for series {series_uid}", self.client.search_for_series,
                           study_instance_uid=study_uid,
                           search_filters={"SeriesInstanceUID": series_uid},
                           missing=f"the PACS at {self.url} has no series {series_uid}{where}")
        found = [s for s in map(_series_info, found or []) if s.series == series_uid]
        if not found:
            raise PacsNotFoundError(f"the PACS at {self.url} has no series {series_uid}{where}")
        return found[0]

    def series_of_study(self, study_uid: str) -> list[SeriesInfo]:
        """Every series of the study; PacsNotFoundError where it has none."""
        missing = f"the PACS at {self.url} has no study {study_uid}"
        found = self._call(f"listing the series of study {study_uid}",
                           self.client.search_for_series, study_instance_uid=study_uid,
                           get_remaining=True, missing=missing)
        series = [s for s in map(_series_info, found or []) if s.study in ("", study_uid)]
        if not series:
            raise PacsNotFoundError(missing)
        return sorted(series, key=lambda s: (_number(s.number), s.series))

    def instances(self, series: SeriesInfo) -> list[InstanceInfo]:
        found = self._call(f"listing the instances of series {series.series}",
                           self.client.search_for_instances, series.study, series.series,
                           fields=["SOPClassUID", "NumberOfFrames"], get_remaining=True,
                           missing=f"the PACS at {self.url} has no series {series.series}")
        out = []
        for item in found or []:
            uid = str(_value(item, "00080018"))
            if uid:
                frames = _value(item, "00280008", 1)
                out.append(InstanceInfo(uid, str(_value(item, "00080016")),
                                        int(frames) if str(frames).isdigit() else 1))
        return out

    # ------------------------------------------------------------------ WADO-RS

    def iter_series(self, series: SeriesInfo) -> Iterator:
        """The series' instances as stored (pydicom datasets), streamed."""
        what = f"retrieving series {series.series} (WADO-RS)"
        items = self._call(what, self.client.iter_series, series.study, series.series,
                           media_types=ANY_TRANSFER_SYNTAX)
        while True:  # the transfer may fail midway: each step under the same messages
            ds = self._call(what, next, items, None)
            if ds is None:
                return
            yield ds

    def instance(self, series: SeriesInfo, sop_instance: str):
        return self._call(f"retrieving instance {sop_instance} of series {series.series} "
                          f"(WADO-RS)", self.client.retrieve_instance, series.study,
                          series.series, sop_instance, media_types=ANY_TRANSFER_SYNTAX,
                          missing=f"the PACS at {self.url} no longer has instance "
                                  f"{sop_instance} of series {series.series}")

    def download(self, series: SeriesInfo, folder: Path, expected: list[InstanceInfo],
                 on_instance: Callable[[], None] | None = None) -> list[Path]:
        """The series' image instances into ``folder``, one ``<SOPInstanceUID>.dcm``
        each, each written to a temporary name and renamed (a stopped download
        leaves whole files only). Instances already there are kept: an empty
        folder streams the series; a partly filled one fetches what it lacks."""
        folder.mkdir(parents=True, exist_ok=True)
        wanted = {i.sop_instance for i in expected}
        have = {p.stem for p in folder.glob("*.dcm")}
        for stale in folder.glob("*.tmp"):
            stale.unlink()
        if not have:
            for ds in self.iter_series(series):
                uid = str(ds.get("SOPInstanceUID", "")).strip()
                if uid in wanted and uid not in have:
                    save_atomic(ds, folder / f"{uid}.dcm")
                    have.add(uid)
                    if on_instance:
                        on_instance()
        for uid in sorted(wanted - have):
            save_atomic(self.instance(series, uid), folder / f"{uid}.dcm")
            have.add(uid)
            if on_instance:
                on_instance()
        return sorted(folder / f"{uid}.dcm" for uid in wanted)

    # ------------------------------------------------------------------ STOW-RS

    def store(self, datasets: list, study_uid: str) -> None:
        """Store ``datasets`` in the study; a PacsError naming every instance
        the PACS did not accept."""
        response = self._call(f"storing {len(datasets)} instance(s) in study {study_uid} "
                              f"(STOW-RS)", self.client.store_instances, datasets,
                              study_instance_uid=study_uid)
        failed = [] if response is None else list(response.get("FailedSOPSequence") or [])
        if failed:
            shown = ", ".join(f"{f.get('ReferencedSOPInstanceUID', '?')} (failure reason "
                              f"{f.get('FailureReason', '?')})" for f in failed)
            raise PacsError(f"the PACS at {self.url} did not store {shown}")


class _Session(requests.Session):
    """A session whose ``verify`` is the one set on it: requests otherwise puts
    REQUESTS_CA_BUNDLE or CURL_CA_BUNDLE from the environment in its place on
    every request, silently ignoring --dicomweb-ca."""

    def merge_environment_settings(self, url, proxies, stream, verify, cert):
        settings = super().merge_environment_settings(url, proxies, stream, verify, cert)
        settings["verify"] = self.verify
        return settings


def save_atomic(ds, path: Path) -> None:
    """``ds`` to ``path`` through a temporary file in the same folder."""
    tmp = path.with_name(path.name + ".tmp")
    ds.save_as(tmp, enforce_file_format=False)
    os.replace(tmp, path)


def _series_info(item: dict) -> SeriesInfo:
    count = _value(item, "00201209", None)
    return SeriesInfo(str(_value(item, "0020000D")), str(_value(item, "0020000E")),
                      str(_value(item, "00080060")).strip(), str(_value(item, "0008103E")),
                      str(_value(item, "00200011")),
                      int(count) if str(count).isdigit() else None)


def _number(text: str) -> int:
    return int(text) if str(text).lstrip("-").isdigit() else 1 << 30


def _reason(exc: Exception) -> str:
    """The innermost reason of a transport error, without the URL's query."""
    inner = exc
    while inner.args and isinstance(inner.args[0], Exception):
        inner = inner.args[0]
    text = str(getattr(inner, "reason", None) or inner)
    return text.split(": ", 1)[-1][:300] if "Max retries" in text else text[:300]


def connect(url: str, auth_file: str | None, ca: str | None) -> Pacs:
    """The PACS of the command line's ``--dicomweb``, ``--dicomweb-auth``, ``--dicomweb-ca``."""
    return Pacs(url, read_credentials(Path(auth_file) if auth_file else None),
                Path(ca) if ca else None)


def add_options(p) -> None:
    """The options every PACS command takes."""
    p.add_argument("--dicomweb-auth", metavar="FILE",
                   help=f"TOML file (mode 600) of user and password, or token, for the PACS "
                        f"(default: {ENV_USER}/{ENV_PASSWORD} or {ENV_TOKEN} from the "
                        f"environment; never on the command line)")
    p.add_argument("--dicomweb-ca", metavar="FILE",
                   help="CA certificate (PEM) the PACS's TLS certificate is verified "
                        "against (default: the system's CA store)")
