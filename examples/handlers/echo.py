#!/usr/bin/env python3
"""The echo handler from the billing's Provisioning API docs, as a tiny HTTP server:
parse the request body and return it unchanged.

    python3 examples/handlers/echo.py 5001

Point a handler with `modifies = true` at http://127.0.0.1:5001/ and the billing gets
back what it sent, as Python's json module writes it: the same keys and values, but a
number in Python's spelling (`1.50` comes back `1.5`, `-0` as `0`, `1E3` as `1000.0`).
provisiond passes on the reply as it is, so those are this handler's changes, not
provisiond's; a handler that must keep the billing's digits answers with the bytes it
read.
"""
import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Echo(BaseHTTPRequestHandler):
    def do_POST(self):
        length = int(self.headers.get("Content-Length", 0))
        envelope = json.loads(self.rfile.read(length))
        body = json.dumps(envelope, separators=(",", ":")).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt, *args):
        pass


if __name__ == "__main__":
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 5001
    ThreadingHTTPServer(("127.0.0.1", port), Echo).serve_forever()
