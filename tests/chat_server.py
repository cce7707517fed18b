"""A tiny OpenAI-compatible chat server for fault tests, run in a thread of the test process.

`ChatServer(plan)`: `plan(n)` says what to do with the n-th request (0-based), one of

    ("answer", delay_s)          wait, then answer with the request's last user turn (an echo)
    ("status", code, delay_s)    wait, then answer with that HTTP status and a JSON error body
    ("hang",)                    never answer; the handler only returns when the client hangs up

It counts what a real server would see: every request received (`requests`, with arrival
times), and the requests in flight at once (`peak_inflight`), i.e. read and neither answered
nor closed by the client. A request the client gave up on but did not close keeps counting:
that is the abandoned-request leak the labeler must not have. Before a new request is
counted, requests whose connection the client has already closed are dropped (their FIN
arrived first), so the count never lags behind the client.
"""

from __future__ import annotations

import json
import select
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

Plan = Callable[[int], tuple]


def echo(body: dict) -> str:
    return body["messages"][-1]["content"]


def client_closed(sock: socket.socket) -> bool:
    """True when the peer has closed the connection (readable, and a peek reads nothing)."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


class ChatServer:
    def __init__(self, plan: Plan):
        self.plan = plan
        self.lock = threading.Lock()
        self.arrivals: list[float] = []  # time.monotonic() of each request
        self.inflight: set[socket.socket] = set()
        self.peak_inflight = 0
        self.closing = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as httpx expects

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                n = server._arrive(self.connection)
                try:
                    action = server.plan(n)
                    if not server._wait(self.connection, None if action[0] == "hang" else action[-1]):
                        self.close_connection = True
                        return  # the client hung up (or the server is closing)
                    if action[0] == "answer":
                        self._send(200, {"choices": [{"message": {"role": "assistant", "content": echo(body)}}]})
                    else:
                        self._send(action[1], {"error": {"message": f"injected HTTP {action[1]}", "code": action[1]}})
                finally:
                    server._leave(self.connection)

            def _send(self, code: int, payload: dict) -> None:
                data = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address):
                pass  # a client that hung up mid-request (an interrupted labeler) is expected here

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"

    def _arrive(self, sock: socket.socket) -> int:
        with self.lock:
            self.inflight = {s for s in self.inflight if not client_closed(s)}
            self.inflight.add(sock)
            self.peak_inflight = max(self.peak_inflight, len(self.inflight))
            self.arrivals.append(time.monotonic())
            return len(self.arrivals) - 1

    def _leave(self, sock: socket.socket) -> None:
        with self.lock:
            self.inflight.discard(sock)

    def _wait(self, sock: socket.socket, seconds: float | None) -> bool:
        """Sleep `seconds` (None: forever) unless the client hangs up first; False if it did."""
        deadline = None if seconds is None else time.monotonic() + seconds
        while not self.closing.is_set():
            left = 0.05 if deadline is None else min(0.05, deadline - time.monotonic())
            if left <= 0:
                return True
            readable, _, _ = select.select([sock], [], [], left)
            if readable and client_closed(sock):
                return False
        return False

    @property
    def requests(self) -> int:
        with self.lock:
            return len(self.arrivals)

    def requests_after(self, t: float) -> int:
        with self.lock:
            return sum(a > t for a in self.arrivals)

    def open_requests(self) -> int:
        """Requests in flight now (a hung request whose client has gone is not)."""
        with self.lock:
            self.inflight = {s for s in self.inflight if not client_closed(s)}
            return len(self.inflight)

    def stop(self) -> None:
        self.closing.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> ChatServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def always(action: tuple) -> Plan:
    return lambda n: action
