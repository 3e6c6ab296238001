#!/usr/bin/env python3
"""Demo upstreams of the product: every path answers 200 with a small JSON body.

`x-demo-status: 503` makes it answer with that status, `x-demo-delay-ms: 500` makes it wait
first (timeouts), `x-demo-fail-times: 1` answers 503 to the first attempt of a request (by
`x-request-id`) so that Envoy's retry succeeds. A successful `POST /api/upload` stores a
diagram (its size and owner, `x-user-id`) and names it; `DELETE /api/diagrams/<id>` of the
owner's deletes it and says the bytes freed in `x-freed-bytes` (the gateway gives them back to
the user's storage; `x-demo-freed-bytes: N` makes any delete say N). Likewise `POST
/api/team/invites` adds a member to the caller's team and `DELETE /api/team/members/<id>`
removes one, saying `x-removed-members: 1` (0 for a member already gone;
`x-demo-removed-members: N` says N). `GET /usage` is the usage page
(`demo/usage.html`), which reads the gateway's usage endpoints with the caller's token;
`GET /pricing?plan=P` stands for the product's upgrade page (plans.json's `upgrade_url`). It reads and discards request bodies (with a
Content-Length or chunked; an incomplete one is not answered), says how many bytes it read, and
marks its answers with `x-upstream: demo`. `GET /__demo/stats` tells how many 2xx answers it
gave per path and how many attempts it saw, so tests can compare counters with what really
succeeded.

The ledger, `GET /__demo/ledger`: the work it completed, per user (`x-user-id`, as the
gateway verified it) and handler (`POST /api/upload`): a handler that ran to its end with a
success counts, whether or not anyone was still there to read the answer (the client left,
Envoy gave up waiting). Tests compare it with what the gateway counted. Each request is also
listed by its `x-request-id` with its user, handler and outcome (`done`, `failed`).

Hostile answers, for the tests: `x-demo-reset: after` does the work and closes the
connection without answering; `x-demo-reset: before` closes it without doing anything;
`x-demo-hang-body: 1` does the work and answers 200 with a body that never ends (it stops
writing and keeps the connection open for `x-demo-hang-ms`, 30 s by default). Like many web
frameworks, it runs the handler of the method an `x-http-method-override` header names.
"""
import itertools
import json
import os
import re
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

successes = Counter()
# The ledger: work completed per user and handler ("POST /api/upload"), and every request's
# outcome by its request id.
done = {}
outcomes = {}
# Uploaded diagrams: id -> (owner, bytes); team members invited: id -> owner.
diagrams = {}
members = {}
attempts = Counter()
# AI teammate sessions opened (each new conversation's id).
next_session = itertools.count(1).__next__
lock = threading.Lock()
# --lenient: read paths as a lenient web framework does (no case, no `;parameters`, no trailing
# dots, %-encoded letters decoded), so its stats show what each handler really did.
lenient = "--lenient" in sys.argv


def handler_path(path):
    path = path.split("?")[0].split("#")[0]
    if not lenient:
        return path
    path = re.sub(r"%([0-9A-Fa-f]{2})",
                  lambda m: chr(int(m.group(1), 16)) if re.match(r"[A-Za-z0-9._~-]", chr(int(m.group(1), 16))) else m.group(0),
                  path)
    segments = [s.split(";")[0] for s in path.split("/")]
    segments = [s if set(s) <= {"."} else s.rstrip(".") for s in segments]
    path = "/".join(segments).lower()
    return path[:-1] if len(path) > 1 and path.endswith("/") else path


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes: without this, Nagle's algorithm and delayed ACKs
    # hold every answer for 40 ms.
    disable_nagle_algorithm = True

    def log_message(self, *args):
        pass

    def read_exactly(self, length):
        """Reads and discards `length` bytes; False if the connection ended first."""
        while length > 0:
            chunk = self.rfile.read(min(length, 1 << 20))
            if not chunk:
                return False
            length -= len(chunk)
        return True

    def read_body(self):
        """The body's size, or None if it did not arrive whole."""
        if "chunked" in (self.headers.get("transfer-encoding") or "").lower():
            total = 0
            while True:
                line = self.rfile.readline(1024)
                if not line:
                    return None
                size = int(line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return total
                if not self.read_exactly(size) or not self.rfile.readline(1024):
                    return None
                total += size
        length = int(self.headers.get("content-length") or 0)
        return length if self.read_exactly(length) else None

    def handle_any(self):
        # As many web frameworks do (Express's method-override, Rails's _method): a header
        # names the method the handler runs. The gateway must never let a client's through.
        for name in ("x-http-method-override", "x-http-method", "x-method-override"):
            if self.headers.get(name):
                self.command = self.headers[name].upper()
                break
        body_bytes = self.read_body()
        if body_bytes is None:
            self.close_connection = True
            return
        if self.command == "GET" and self.path.split("?")[0] in ("/usage", "/usage/"):
            self.page(os.path.join(os.path.dirname(os.path.abspath(__file__)), "usage.html"))
            return
        if self.command == "GET" and self.path.split("?")[0] == "/pricing":
            # The product's upgrade page (plans.json's upgrade_url): says which plan was chosen.
            chosen = re.sub(r"[^a-z0-9_-]", "", (self.path.split("plan=") + [""])[1].split("&")[0])
            body = (f'<!doctype html><title>Pricing</title><h1 data-testid="pricing">Choose a plan</h1>'
                    f'<p>Upgrading to <strong data-testid="chosen">{chosen}</strong></p>').encode()
            self.send_response(200)
            self.send_header("content-type", "text/html; charset=utf-8")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        if self.path == "/__demo/stats":
            with lock:
                self.answer(200, {"successes": dict(successes), "attempts": sum(attempts.values())})
            return
        if self.path == "/__demo/ledger":
            with lock:
                self.answer(200, {"done": done, "requests": outcomes})
            return
        request_id = self.headers.get("x-request-id") or ""
        with lock:
            attempts[request_id] += 1
            attempt = attempts[request_id]
        delay_ms = int(self.headers.get("x-demo-delay-ms") or 0)
        if delay_ms:
            time.sleep(delay_ms / 1000)
        reset = self.headers.get("x-demo-reset")
        if reset == "before":
            self.record(request_id, 0)
            self.close_connection = True
            self.connection.shutdown(2)
            return
        status = int(self.headers.get("x-demo-status") or 200)
        if attempt <= int(self.headers.get("x-demo-fail-times") or 0):
            status = 503
        # What the gateway told it about the caller (set by the filter, never the client's).
        identity = {name: self.headers.get(name)
                    for name in ("x-user-id", "x-user-plan", "x-org-id", "x-user-features")}
        payload = {"upstream": "demo", "method": self.command, "path": self.path,
                   "status": status, "identity": identity, "body_bytes": body_bytes}
        headers = {}
        path = self.path.split("?")[0]
        if 200 <= status < 300 and self.command == "POST" and path == "/api/upload":
            with lock:
                payload["diagram_id"] = f"d{len(diagrams) + 1}"
                diagrams[payload["diagram_id"]] = (identity["x-user-id"], body_bytes)
        elif (200 <= status < 300 and self.command == "DELETE" and path.startswith("/api/diagrams/")
              and not self.headers.get("x-demo-freed-bytes")):
            with lock:
                owner, size = diagrams.get(path.rsplit("/", 1)[-1], (None, 0))
                if owner is None or owner != identity["x-user-id"]:
                    status = payload["status"] = 404
                else:
                    del diagrams[path.rsplit("/", 1)[-1]]
                    headers["x-freed-bytes"] = str(size)
        elif 200 <= status < 300 and self.command == "POST" and path == "/api/teammate":
            # The AI teammate's conversation: the caller's, or a new one it opens.
            payload["session"] = headers["x-session-id"] = (
                self.headers.get("x-session-id") or f"s{next_session()}")
        elif 200 <= status < 300 and self.command == "POST" and path == "/api/team/invites":
            with lock:
                payload["member_id"] = f"m{len(members) + 1}"
                members[payload["member_id"]] = identity["x-user-id"]
        elif (200 <= status < 300 and self.command == "DELETE" and path.startswith("/api/team/members/")
              and not self.headers.get("x-demo-removed-members")):
            with lock:
                member = path.rsplit("/", 1)[-1]
                if members.get(member) == identity["x-user-id"]:
                    del members[member]
                    headers["x-removed-members"] = "1"
                else:
                    headers["x-removed-members"] = "0"  # already gone: idempotent, frees nothing
        for told, says in (("x-demo-freed-bytes", "x-freed-bytes"),
                           ("x-demo-removed-members", "x-removed-members")):
            if 200 <= status < 300 and self.headers.get(told):  # tests: say what was given back
                headers[says] = self.headers[told]
        if 200 <= status < 300:
            with lock:
                successes[handler_path(self.path)] += 1
        self.record(request_id, status)
        if reset == "after":
            self.close_connection = True
            self.connection.shutdown(2)
            return
        if self.headers.get("x-demo-hang-body"):
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body) + 1000))
            self.end_headers()
            self.wfile.write(body)
            self.wfile.flush()
            time.sleep(int(self.headers.get("x-demo-hang-ms") or 30000) / 1000)
            self.close_connection = True
            return
        self.answer(status, payload, headers)

    def record(self, request_id, status):
        """Writes the handler's outcome in the ledger, before anyone reads the answer."""
        user = self.headers.get("x-user-id") or ""
        handler = f"{self.command} {handler_path(self.path)}"
        ok = 200 <= status < 300
        with lock:
            if ok:
                by_user = done.setdefault(user, {})
                by_user[handler] = by_user.get(handler, 0) + 1
            if request_id:
                outcomes[request_id] = {"user": user, "handler": handler,
                                        "outcome": "done" if ok else "failed"}

    def page(self, path):
        with open(path, "rb") as f:
            body = f.read()
        self.send_response(200)
        self.send_header("content-type", "text/html; charset=utf-8")
        self.send_header("x-upstream", "demo")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def answer(self, status, payload, headers=None):
        body = json.dumps(payload).encode()
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("content-type", "application/json")
        self.send_header("x-upstream", "demo")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = handle_any


if __name__ == "__main__":
    port = int(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1].isdigit() else 10080
    ThreadingHTTPServer.request_queue_size = 256  # the default backlog of 5 drops connections under load
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    print(f"demo upstream on 127.0.0.1:{port}", flush=True)
    server.serve_forever()
