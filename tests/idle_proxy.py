"""A TCP reverse proxy that cuts every connection idle for longer than a limit, as nginx's `proxy_read_timeout`
(60 s by default), a cloud load balancer's idle timeout or a corporate proxy do.

`IdleCuttingProxy(upstream_port, idle_s)` listens on a free loopback port in threads of the test process. A
connection on which no byte moved, either way, for `idle_s` seconds is closed on both sides: the client sees its
request answered by nothing (a dropped connection), the server sees its client go away.

It also counts the bytes it carries: `sent` (client to upstream) and `received` (upstream to client), over all
connections, what a byte counter on the link would see (`counts()` reads both at once, `reset_counts()` zeroes
them). `CountingProxy(upstream_port)` is the same proxy with no idle limit: put one in front of a registry or a
host to measure what crosses to it.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading
import time


class IdleCuttingProxy:
    def __init__(self, upstream_port: int, idle_s: float | None, host: str = "127.0.0.1"):
        self.upstream = (host, upstream_port)
        self.idle_s = idle_s  # None: never cut
        self.cuts = 0  # connections cut for idleness
        self.sent = 0  # bytes from clients to the upstream
        self.received = 0  # bytes from the upstream to clients
        self.connections = 0
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

    def counts(self) -> tuple[int, int]:
        """(sent, received) so far."""
        with self._lock:
            return self.sent, self.received

    def reset_counts(self) -> None:
        with self._lock:
            self.sent = self.received = 0

    def _pump(self, client: socket.socket) -> None:
        try:
            server = socket.create_connection(self.upstream, timeout=10)
        except OSError:
            client.close()
            return
        with self._lock:
            self.connections += 1
        peers = {client: server, server: client}
        last = time.monotonic()
        try:
            while not self._stopping.is_set():
                readable, _, _ = select.select(list(peers), [], [], 0.1)
                for sock in readable:
                    data = sock.recv(1 << 16)
                    if not data:
                        return
                    with self._lock:
                        if sock is client:
                            self.sent += len(data)
                        else:
                            self.received += len(data)
                    peers[sock].sendall(data)
                    last = time.monotonic()
                if self.idle_s is not None and time.monotonic() - last > self.idle_s:
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


class CountingProxy(IdleCuttingProxy):
    """A byte-counting TCP proxy that never cuts: CountingProxy(upstream_port).url, .sent, .received, .counts()."""

    def __init__(self, upstream_port: int, host: str = "127.0.0.1"):
        super().__init__(upstream_port, None, host)
