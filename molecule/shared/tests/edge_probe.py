"""Attack the gateway's edge from the gateway host: every unguarded vLLM endpoint, reached by every
path trick and method, in origin and absolute form, over HTTP/1.1 and HTTP/1.0, with raw bytes
(no client library normalises anything). Each request carries a marker in its query string,
which a vLLM instance's access log would show had the request reached it.

  python3 edge_probe.py PORT MARKER MODEL ENDPOINT...   -> JSON {status: count} and samples
  python3 edge_probe.py PORT MARKER MODEL --methods PUT,OPTIONS --plain ENDPOINT...
      (only those methods, only the plain path: for routes whose GET and POST do pass)
"""

import json
import socket
import sys

port, marker, model = int(sys.argv[1]), sys.argv[2], sys.argv[3]
args = sys.argv[4:]
only_methods = None
plain = False
if args[:1] == ["--methods"]:
    only_methods, args = args[1].split(","), args[2:]
if args[:1] == ["--plain"]:
    plain, args = True, args[1:]
endpoints = args

TRICKS = [
    "{e}",
    "/v1/..{e}",
    "/v1/%2e%2e{e}",
    "/v1/%2E%2E{e}",
    "/v1/.%2e{e}",
    "/v1/..%2f{n}",
    "/v1/..%2F{n}",
    "/v1/%2e%2e%2f{n}",
    "/{e}",
    "/v1//..{e}",
    "/v1/./..{e}",
    "/./{n}",
    "/v1/chat/completions/../..{e}",
    "{e}/../v1/models",
    "{e}/%2e%2e/v1/chat/completions",
    "{e}/..%2fv1/chat/completions",
    "{e}/..;/v1/models",
    "/v1\\..\\{n}",
    "/v1/%5c..%5c{n}",
    "{e}%00/v1/models",
]
METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "TRACE", "FOO"]
BODY = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}).encode()


def send(method: str, target: str, version: str) -> int:
    head = f"{method} {target} {version}\r\nHost: gateway\r\nContent-Type: application/json\r\n"
    head += f"Content-Length: {len(BODY)}\r\nConnection: close\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
        conn.sendall(head.encode() + BODY)
        data = b""
        while b"\r\n" not in data:
            chunk = conn.recv(4096)
            if not chunk:
                break
            data += chunk
    try:
        return int(data.split(b" ", 2)[1])
    except (IndexError, ValueError):
        return 0  # the connection was closed without an answer


counts: dict[str, int] = {}
samples: dict[str, str] = {}
sent = 0
for endpoint in endpoints:
    for trick in TRICKS[:1] if plain else TRICKS:
        path = trick.format(e=endpoint, n=endpoint.lstrip("/"))
        target = f"{path}?probe={marker}"
        methods = only_methods or METHODS
        plans = [(m, target, "HTTP/1.1") for m in methods]
        plans += [(m, f"http://gateway{target}", "HTTP/1.1") for m in methods if m in ("GET", "POST")]
        plans += [(m, target, "HTTP/1.0") for m in methods if m in ("GET", "POST")]
        for method, request_target, version in plans:
            status = send(method, request_target, version)
            sent += 1
            counts[str(status)] = counts.get(str(status), 0) + 1
            samples.setdefault(str(status), f"{method} {request_target} {version}")
print(json.dumps({"sent": sent, "statuses": counts, "samples": samples}))
