"""A TCP reverse proxy that cuts every connection idle for longer than a limit, as nginx's `proxy_read_timeout`
(60 s by default), a cloud load balancer's idle timeout or a corporate proxy do.

`IdleCuttingProxy(upstream_port, idle_s)` listens on a free loopback port in threads of the test process. A
connection on which no byte moved, either way, for `idle_s` seconds is closed on both sides: the client sees its
request answered by nothing (a dropped connection), the server sees its client go away.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading
import time


class IdleCuttingProxy:
    def __init__(self, upstream_port: int, idle_s: float, host: str = "127.0.0.1"):
        self.upstream = (host, upstream_port)
        self.idle_s = idle_s
        self.cuts = 0  # connections cut for idleness
        self._listener = socket.create_server((host, 0))
        self._listener.settimeout(0.2)
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    @property
    def url(self) -> str:
        host, port = self._listener.getsockname()[:2]
        return f"http://{host}:{port}"

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            thread = threading.Thread(target=self._pump, args=(client,), daemon=True)
            thread.start()

    def _pump(self, client: socket.socket) -> None:
        try:
            server = socket.create_connection(self.upstream, timeout=10)
        except OSError:
            client.close()
            return
        peers = {client: server, server: client}
        last = time.monotonic()
        try:
            while not self._stopping.is_set():
                readable, _, _ = select.select(list(peers), [], [], 0.1)
                for sock in readable:
                    data = sock.recv(1 << 16)
                    if not data:
                        return
                    peers[sock].sendall(data)
                    last = time.monotonic()
                if time.monotonic() - last > self.idle_s:
                    with self._lock:
                        self.cuts += 1
                    return
        except OSError:
            return
        finally:
            for sock in (client, server):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()

    def close(self) -> None:
        self._stopping.set()
        self._listener.close()
        for thread in self._threads:
            thread.join(timeout=5)
