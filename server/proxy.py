"""The SuperLink's public face: nginx, from the operating system's packages.

Flower 1.42 serves its Fleet API (for hospitals), Control API (runs, node
keys) and Runtime API (the ServerApp's access to every message) on one port,
and its open-source build has no account authentication: whoever reaches the
Control API can register a node key or submit an app that runs at every
hospital. So the SuperLink listens on 127.0.0.1 only (the coordinator's own
commands use that address), and nginx terminates TLS on the public port with
the federation's certificate and forwards the Fleet API calls a SuperNode
makes — and nothing else — to it. Every other path, and any method but POST,
is refused (403) at the proxy.

The Fleet calls a SuperNode makes, read from flwr 1.42's
``supernode/fleet_http_client.py``. Fleet's own ``register-node`` and
``unregister-node`` (self-registration, which Flower refuses anyway when
node authentication is on) are not among them.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from common.errors import ConfigError

FLEET_CALLS = ("activate-node", "deactivate-node", "send-node-heartbeat", "get-run",
               "get-fab", "pull-messages", "push-messages", "pull-object", "push-object",
               "confirm-message-received")
INSTALL_HINT = ("install nginx from the operating system's packages: `apt-get install "
                "nginx-light` (Debian, Ubuntu), `dnf install nginx` (Fedora, RHEL), "
                "`apk add nginx` (Alpine)")


def nginx_binary() -> str:
    """The nginx executable; a ConfigError saying how to install it when absent."""
    found = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)),
        None)
    if found is None:
        raise ConfigError(f"the SuperLink's proxy needs nginx, which is not installed: "
                          f"{INSTALL_HINT}")
    return found


def nginx_config(folder: Path, *, host: str, port: int, local_port: int,
                 certs: Path | None) -> str:
    """nginx.conf for the public port: TLS with the federation's certificate
    (none with ``certs=None``, a test on one machine), the Fleet calls
    forwarded to the SuperLink on 127.0.0.1, everything else refused."""
    folder = Path(folder).resolve()
    tls = certs is not None
    listen = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    lines = [
        "# Written by `fedseg superlink`; rewritten at each start.",
        "daemon off;",
        "worker_processes 1;",
        f"pid {folder / 'nginx.pid'};",
        f"error_log {folder / 'error.log'} warn;",
    ]
    if os.geteuid() == 0:  # the workers drop root
        user, group = unprivileged()
        lines.append(f"user {user} {group};")
    lines += [
        "events { worker_connections 256; }",
        "http {",
        "    log_format timed '$remote_addr [$time_local] \"$request\" $status "
        "$body_bytes_sent $request_length $request_time $upstream_response_time';",
        f"    access_log {folder / 'access.log'} timed;",
        *(f"    {kind}_temp_path {folder / 'tmp' / kind};"
          for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")),
        "    server_tokens off;",
        "    client_max_body_size 0;  # model weights: tens of MB per message",
        "    # Whole objects in memory (Flower moves a model as MB-sized objects, a few",
        "    # hundred requests a round): unbuffered proxying through one small buffer",
        "    # cost seconds a round; temp files are never used.",
        "    client_body_buffer_size 16m;",
        "    proxy_buffer_size 64k;",
        "    proxy_buffers 256 64k;",
        "    proxy_busy_buffers_size 1m;",
        "    proxy_max_temp_file_size 0;",
        "    proxy_read_timeout 600s;",
        "    proxy_send_timeout 600s;",
        "    upstream superlink {",
        f"        server 127.0.0.1:{local_port};",
        "        keepalive 32;  # reuse connections: a round makes hundreds of requests",
        "    }",
        "    server {",
        f"        listen {listen}{' ssl' if tls else ''};",
    ]
    if tls:
        lines += [
            f"        ssl_certificate {Path(certs).resolve() / 'server.pem'};",
            f"        ssl_certificate_key {Path(certs).resolve() / 'server.key'};",
            "        ssl_protocols TLSv1.2 TLSv1.3;",
        ]
    upstream = f"{'https' if tls else 'http'}://superlink"
    lines += [
        f"        location ~ ^/v1/fleet/({'|'.join(FLEET_CALLS)})$ {{",
        "            limit_except POST { deny all; }",
        f"            proxy_pass {upstream};",
        "            proxy_http_version 1.1;",
        "            proxy_set_header Connection \"\";",
    ]
    if tls:  # the hop to the SuperLink is TLS too, checked against the federation's CA
        lines += [
            f"            proxy_ssl_trusted_certificate {Path(certs).resolve() / 'ca.crt'};",
            "            proxy_ssl_verify on;",
            "            proxy_ssl_name localhost;",
            "            proxy_ssl_session_reuse on;",
        ]
    lines += [
        "        }",
        "        location / { return 403; }",
        "    }",
        "}",
    ]
    return "\n".join(lines) + "\n"


def unprivileged() -> tuple[str, str]:
    """The user nginx's workers run as when started by root, and its group."""
    import grp
    import pwd

    nobody = pwd.getpwnam("nobody")
    return nobody.pw_name, grp.getgrgid(nobody.pw_gid).gr_name


def write_config(folder: Path, **kwargs) -> Path:
    """Write nginx.conf (and its temp folders) into ``folder``; its path."""
    folder = Path(folder)
    for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (folder / "tmp" / kind).mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:  # the workers run as nobody: they enter, no one else does
        import pwd

        nobody = pwd.getpwnam(unprivileged()[0])
        for path in [folder / "tmp", *(folder / "tmp").iterdir()]:
            os.chown(path, nobody.pw_uid, nobody.pw_gid)
            os.chmod(path, 0o700)
        os.chown(folder, 0, nobody.pw_gid)
        os.chmod(folder, 0o710)
    conf = folder / "nginx.conf"
    conf.write_text(nginx_config(folder, **kwargs))
    return conf


def nginx_command(conf: Path) -> list[str]:
    folder = Path(conf).resolve().parent
    return [nginx_binary(), "-c", str(Path(conf).resolve()), "-p", str(folder),
            "-e", str(folder / "error.log")]
