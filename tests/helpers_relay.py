"""A TCP relay for tests of a peer (a broker, a database) that goes away or goes silent.

The relay listens on a port of its own on 127.0.0.1 and passes bytes both ways to ``target``.
What the tests make of it:

- ``cut``: every connection closed and nothing accepted (the peer is down, connections are
  refused); ``start`` again listens anew on the same port.
- ``freeze``: every connection stays open and passes nothing more, either way, until
  ``frozen`` is cleared (a peer that hangs with its connections established).
- ``silence``: every connection cut, then new ones taken and never answered (a host that has
  stopped answering without refusing).
- ``blackhole_held``: the connections held now pass nothing more, for good, and stay open,
  while new ones pass (a firewall that dropped them); ``blackhole_all`` also takes new ones
  without answering, until ``restore``.
- ``close``: ``cut``, and every blackholed connection let go.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from urllib.parse import urlsplit, urlunsplit


class Relay:
    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.port = probe.getsockname()[1]
        probe.close()
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        #: One per connection pair: set, the pair passes nothing more, for good.
        self._dead: list[threading.Event] = []
        self._answering = True
        self._listener: socket.socket | None = None
        #: Set: every connection stays open and passes nothing until it is cleared.
        self.frozen = threading.Event()

    def url(self, url: str) -> str:
        """``url`` (of the target) pointed at the relay instead."""
        parts = urlsplit(url)
        host = parts.netloc.rsplit("@", 1)
        where = f"127.0.0.1:{self.port}"
        netloc = f"{host[0]}@{where}" if len(host) == 2 else where
        return urlunsplit(parts._replace(netloc=netloc))

    def start(self) -> None:
        with self._lock:
            self._answering = True
        self._listen(self._accept)

    def freeze(self) -> None:
        self.frozen.set()

    def silence(self) -> None:
        self.cut()
        with self._lock:
            self._answering = False
        self._listen(self._accept)

    def blackhole_held(self) -> None:
        with self._lock:
            for dead in self._dead:
                dead.set()

    def blackhole_all(self) -> None:
        with self._lock:
            self._answering = False
        self.blackhole_held()

    def restore(self) -> None:
        with self._lock:
            self._answering = True

    def cut(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            sockets, self._sockets = self._sockets, []
        for sock in [*sockets, *([listener] if listener else [])]:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def close(self) -> None:
        with self._lock:
            dead, self._dead = self._dead, []
            self._answering = True
        for event in dead:
            event.set()
        self.cut()

    def _listen(self, accept: object) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen()
        self._listener = listener
        threading.Thread(target=accept, args=(listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            with self._lock:
                answering = self._answering
                self._sockets.append(client)
            if not answering:
                continue  # held open, never answered
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            dead = threading.Event()
            with self._lock:
                self._sockets.append(upstream)
                self._dead.append(dead)
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(
                    target=_pipe, args=(source, sink, dead, self.frozen), daemon=True
                ).start()


def _pipe(
    source: socket.socket, sink: socket.socket, dead: threading.Event, frozen: threading.Event
) -> None:
    """Pass bytes on (holding them while frozen) until the pair is blackholed, then hold both
    sockets open, silent; at the end of the stream, close both, as a proxy does."""
    with contextlib.suppress(OSError):
        while not dead.is_set():
            chunk = source.recv(65536)
            if not chunk:
                break
            while frozen.is_set() and not dead.is_set():
                time.sleep(0.05)
            if dead.is_set():
                break
            sink.sendall(chunk)
    if dead.is_set():
        while dead.is_set() and source.fileno() != -1:
            time.sleep(0.2)
        return
    for sock in (source, sink):
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


def relay_to(url: str, default_port: int) -> Relay:
    """A started relay to the host and port ``url`` names."""
    parts = urlsplit(url)
    relay = Relay((parts.hostname or "127.0.0.1", parts.port or default_port))
    relay.start()
    return relay
