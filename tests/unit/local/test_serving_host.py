"""What the version servers and the gateway share in local mode."""

from __future__ import annotations

import socket
from pathlib import Path

from kubetune.local.serving_host import LOOPBACK, ServingHost


def test_a_server_whose_port_was_taken_moves_to_a_free_one_and_says_so(tmp_path: Path) -> None:
    notices: list[str] = []
    host = ServingHost(home=tmp_path, notify=notices.append)
    port = host.ports.allocate()
    assert host.free_port_for("the gateway", port) == port
    assert notices == []

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        squatter.bind((LOOPBACK, port))
        squatter.listen()
        moved = host.free_port_for("the gateway", port)

    assert moved != port
    assert notices == [f"the gateway: port {port} is taken, moving to {moved}"]
