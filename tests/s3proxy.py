"""An HTTP proxy in front of the local S3 server that records requests and can inject faults.

Tests point AWS_ENDPOINT_URL_S3 at it to count what a step sends (a rerun of finished
work must send no write), and to fail a seeded random fraction of requests the way a
remote object store does: 503 SlowDown, 500 InternalError, a reset connection, or a stall
past the client's read timeout. Faults happen before the request reaches the server.
"""

import http.client
import http.server
import random
import socket
import struct
import threading
import time

WRITE_METHODS = ("PUT", "POST", "DELETE")
FAULTS = ("503", "500", "reset", "stall")
ERROR_BODY = ('<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
              '<Message>injected fault</Message></Error>')


class S3Proxy:
    def __init__(self, upstream_port, fault_rate=0.0, seed=0, stall_seconds=0.0, key_id=None):
        """key_id: the only access key id accepted (others get 403 InvalidAccessKeyId, as a
        real store answers; the local server accepts any key)."""
        proxy = self
        self.requests = []  # (method, path) of every request that reached the server
        self.faults = []  # (fault, method, path) of every injected fault
        self.fault_rate, self.stall_seconds = fault_rate, stall_seconds
        self.random = random.Random(seed)
        self.lock = threading.Lock()

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _body(self):
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    body = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return body
                        body += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _fault(self):
                with proxy.lock:
                    if proxy.random.random() >= proxy.fault_rate:
                        return None
                    fault = proxy.random.choice(FAULTS if proxy.stall_seconds else FAULTS[:3])
                    proxy.faults.append((fault, self.command, self.path))
                return fault

            def _inject(self, fault):
                if fault == "reset":  # RST instead of a response
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                               struct.pack("ii", 1, 0))
                    self.close_connection = True
                    self.connection.close()
                    return
                if fault == "stall":
                    time.sleep(proxy.stall_seconds)
                    self.close_connection = True
                    return
                code = "SlowDown" if fault == "503" else "InternalError"
                body = ERROR_BODY.format(code=code).encode()
                self.send_response(int(fault))
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _wrong_key(self):
                authorization = self.headers.get("Authorization", "")
                given = authorization.split("Credential=", 1)[1].split("/", 1)[0] \
                    if "Credential=" in authorization else None
                if key_id is None or given == key_id:
                    return False
                body = ERROR_BODY.format(code="InvalidAccessKeyId").encode()
                self.send_response(403)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", "0" if self.command == "HEAD" else str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)
                return True

            def _forward(self):
                body = self._body()
                if self._wrong_key():
                    return
                fault = self._fault()
                if fault:
                    return self._inject(fault)
                with proxy.lock:
                    proxy.requests.append((self.command, self.path))
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("transfer-encoding", "content-length", "connection")}
                upstream = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=60)
                upstream.request(self.command, self.path, body=body, headers=headers)
                response = upstream.getresponse()
                data = response.read()
                self.send_response(response.status, response.reason)
                for key, value in response.getheaders():  # send_response wrote Date, Server
                    if key.lower() not in ("transfer-encoding", "content-length", "connection",
                                           "date", "server"):
                        self.send_header(key, value)
                # A HEAD response has no body but tells the object's length.
                self.send_header("Content-Length", response.getheader("Content-Length", "0")
                                 if self.command == "HEAD" else str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                upstream.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def writes(self):
        with self.lock:
            return [r for r in self.requests if r[0] in WRITE_METHODS]

    def clear(self):
        with self.lock:
            self.requests.clear()
            self.faults.clear()

    def close(self):
        self.server.shutdown()
        self.server.server_close()
