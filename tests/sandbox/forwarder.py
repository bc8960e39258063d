"""``python forwarder.py FD PORT``: accept on the listening socket FD, connect each to 127.0.0.1:PORT.

Started inside the pod network with a socket bound on the host's loopback (a socket keeps the network
namespace it was made in), so the test reaches a pod's port as ``kubectl port-forward`` would.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while chunk := await reader.read(65536):
            writer.write(chunk)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(ConnectionError, OSError):
            writer.close()


async def _serve(listener: socket.socket, port: int) -> None:
    async def forward(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            pod_reader, pod_writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            client_writer.close()  # nothing listens yet: a closed connection, as a probe would see
            return
        await asyncio.gather(_pipe(client_reader, pod_writer), _pipe(pod_reader, client_writer))

    server = await asyncio.start_server(forward, sock=listener)
    async with server:
        await server.serve_forever()


def main() -> None:
    listener = socket.socket(fileno=int(sys.argv[1]))
    asyncio.run(_serve(listener, int(sys.argv[2])))


if __name__ == "__main__":
    main()
