"""A real PACS for the tests: Debian's Orthanc with its DICOMweb plugin
(packages ``orthanc`` and ``orthanc-dicomweb``; ``.ci/run`` installs them),
started on 127.0.0.1 at a free port with its storage in a temporary folder,
authentication on (one registered user), no DICOM port, no remote access;
behind nginx for HTTPS. Tests skip, saying why, where Orthanc or
its DICOMweb plugin is absent."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from common.processes import stop_group

USER, PASSWORD = "fedseg-test", "orthanc-test-password-9f1c"
PLUGINS = (Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so"),
           Path("/usr/lib/orthanc/libOrthancDicomWeb.so"))
START_TIMEOUT = 60.0  # seconds for Orthanc to answer


def orthanc_binary() -> str:
    found = shutil.which("Orthanc") or next(
        (str(p) for p in (Path("/usr/sbin/Orthanc"), Path("/usr/bin/Orthanc")) if p.is_file()),
        None)
    if found is None:
        pytest.skip("Orthanc is not installed (a real PACS for the DICOMweb tests): "
                    "apt-get install orthanc orthanc-dicomweb")
    return found


def dicomweb_plugin() -> Path:
    found = next((p for p in PLUGINS if p.is_file()), None)
    if found is None:
        found = next(iter(sorted(Path("/usr/lib/orthanc").glob("libOrthancDicomWeb.so*"))), None)
    if found is None:
        pytest.skip("Orthanc's DICOMweb plugin is not installed: apt-get install "
                    "orthanc-dicomweb")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process(process: subprocess.Popen) -> None:
    """End a server this test started in its own process group, and reap it."""
    if process.poll() is None:
        stop_group(process.pid, grace=20.0)
    process.wait(timeout=10)


@dataclass
class Orthanc:
    root: Path
    process: subprocess.Popen
    url: str  # the DICOMweb root
    base: str  # Orthanc's own REST API

    def log(self) -> str:
        path = self.root / "orthanc.log"
        return path.read_text(errors="replace")[-3000:] if path.is_file() else ""

    def stop(self) -> None:
        stop_process(self.process)


def start_orthanc(root: Path) -> Orthanc:
    """Orthanc serving ``root``'s storage over HTTP on 127.0.0.1 (a free port)."""
    import requests

    binary, plugin = orthanc_binary(), dicomweb_plugin()
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = {
        "Name": "fedseg-test", "StorageDirectory": str(root / "storage"),
        "IndexDirectory": str(root / "storage"), "HttpPort": port,
        "DicomServerEnabled": False, "DicomPort": free_port(),
        "RemoteAccessAllowed": False, "AuthenticationEnabled": True,
        "RegisteredUsers": {USER: PASSWORD}, "Plugins": [str(plugin)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        "SaveJobs": False, "HttpThreadsCount": 8, "ConcurrentJobs": 1,
    }
    (root / "orthanc.json").write_text(json.dumps(config, indent=1))
    base = f"http://127.0.0.1:{port}"
    with open(root / "orthanc.log", "wb") as log:
        process = subprocess.Popen([binary, str(root / "orthanc.json")], stdout=log,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True)
    server = Orthanc(root, process, f"{base}/dicom-web", base)
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if process.poll() is not None:
            pytest.fail(f"Orthanc exited with {process.returncode} at start:\n{server.log()}")
        try:
            answer = requests.get(f"{base}/dicom-web/studies", auth=(USER, PASSWORD),
                                  timeout=2)
            if answer.status_code == 200:
                return server
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            server.stop()
            pytest.fail(f"Orthanc did not answer within {START_TIMEOUT:.0f} s:\n{server.log()}")
        time.sleep(0.2)


@dataclass
class TlsProxy:
    """nginx terminating TLS in front of a PACS, as hospitals put one (Debian's
    Orthanc 1.10 dies on its own HTTPS's first connection)."""

    root: Path
    process: subprocess.Popen
    url: str

    def stop(self) -> None:
        stop_process(self.process)


def start_tls_proxy(root: Path, orthanc: Orthanc, certificate: Path, key: Path,
                    ca: Path) -> TlsProxy:
    """nginx on 127.0.0.1 (a free port) with ``certificate`` forwarding to
    ``orthanc``; skips the test, saying why, where nginx is absent."""
    import requests

    binary = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)),
        None)
    if binary is None:
        pytest.skip("nginx is not installed (the TLS proxy in front of the test PACS): "
                    "apt-get install nginx-light")
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    upstream = orthanc.base.split("://", 1)[1]
    temp = " ".join(f"{kind}_temp_path {root / kind};"
                    for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    (root / "nginx.conf").write_text(f"""
daemon off;
pid {root / 'nginx.pid'};
error_log {root / 'error.log'} warn;
events {{ worker_connections 64; }}
http {{
  access_log off;
  {temp}
  server {{
    listen 127.0.0.1:{port} ssl;
    ssl_certificate {certificate};
    ssl_certificate_key {key};
    client_max_body_size 0;
    # streamed both ways: no temporary files (the workers may not reach this folder)
    proxy_buffering off;
    proxy_request_buffering off;
    location / {{ proxy_pass http://{upstream}; proxy_set_header Host $host; }}
  }}
}}
""")
    with open(root / "nginx.log", "wb") as log:
        process = subprocess.Popen([binary, "-c", str(root / "nginx.conf"), "-p", str(root)],
                                   stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    proxy = TlsProxy(root, process, f"https://127.0.0.1:{port}/dicom-web")
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if process.poll() is not None:
            pytest.fail(f"nginx exited with {process.returncode}: "
                        f"{(root / 'nginx.log').read_text()}{(root / 'error.log').read_text()}")
        try:
            if requests.get(f"{proxy.url}/studies", auth=(USER, PASSWORD), timeout=2,
                            verify=str(ca)).status_code == 200:
                return proxy
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            proxy.stop()
            pytest.fail(f"nginx did not answer within {START_TIMEOUT:.0f} s")
        time.sleep(0.2)
