"""tests/demo_hosts.py's ports and refusals (the hosts themselves: tests/test_walkthrough.py)."""

from __future__ import annotations

import socket

import pytest

from .demo_hosts import DemoHostsError, demo_ports, start_hosts


def test_demo_ports_default_to_the_fixed_ones_and_follow_the_manifests_variables():
    assert demo_ports({}) == {"host-a": 11534, "host-b": 11535}
    assert demo_ports({"OLLAMA_HOST_A": "http://127.0.0.1:12000"}) == {"host-a": 12000, "host-b": 11535}


@pytest.mark.parametrize("url", ["http://10.0.0.5:11434", "https://127.0.0.1:11534", "http://127.0.0.1"])
def test_demo_ports_refuse_a_host_that_is_not_a_loopback_port(url):
    with pytest.raises(DemoHostsError, match="OLLAMA_HOST_B=.*http://127.0.0.1:PORT"):
        demo_ports({"OLLAMA_HOST_B": url})


def test_a_port_in_use_is_refused_before_anything_starts(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(DemoHostsError, match=f"127.0.0.1:{port} \\(host-b\\) is in use"):
            start_hosts({"host-a": 0, "host-b": port}, tmp_path)
    assert not (tmp_path / "host-a").exists()
