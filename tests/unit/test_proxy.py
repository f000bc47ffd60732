"""The proxy's configuration, checked by nginx itself (skipped without nginx);
the real proxy in front of a real SuperLink is tested in tests/deployment."""

import subprocess

import pytest

from common.errors import ConfigError
from server.provision import provision
from server.proxy import FLEET_CALLS, nginx_command, nginx_config, write_config


@pytest.fixture
def nginx(tmp_path):
    try:
        return nginx_command(tmp_path / "nginx.conf")[0]
    except ConfigError as exc:
        pytest.skip(str(exc))


def test_only_the_fleet_calls_are_forwarded(tmp_path):
    text = nginx_config(tmp_path, host="0.0.0.0", port=9093, local_port=9092, certs=tmp_path)
    forwarded = [line for line in text.splitlines() if "location" in line]
    assert forwarded == [f"        location ~ ^/v1/fleet/({'|'.join(FLEET_CALLS)})$ {{",
                         "        location / { return 403; }"]
    assert "register-node" not in text  # Fleet's self-registration is not a node's call
    assert "server 127.0.0.1:9092;" in text and "keepalive 32;" in text
    assert "proxy_pass https://superlink;" in text and "proxy_ssl_verify on;" in text
    assert "listen 0.0.0.0:9093 ssl;" in text


@pytest.mark.parametrize("tls", [True, False])
def test_nginx_accepts_the_configuration(tmp_path, nginx, tls):
    certs = None
    if tls:
        provision(tmp_path / "certs", ["127.0.0.1", "localhost"], [])
        certs = tmp_path / "certs" / "superlink"
    conf = write_config(tmp_path / "proxy", host="127.0.0.1", port=19093, local_port=19092,
                        certs=certs)
    out = subprocess.run([*nginx_command(conf), "-t"], capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0, out.stderr
    assert "syntax is ok" in out.stderr
