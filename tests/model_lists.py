"""A local stand-in for OpenRouter's public model list (``GET /api/v1/models``) that also
answers a provider's ``GET /v1/models``: a real HTTP server on loopback whose answers a test
changes while it runs."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["ModelLists"]


class ModelLists:
    def __init__(self) -> None:
        self.openrouter: list[dict[str, Any]] = []
        self.provider_ids: list[str] = []
        self.status = 200  # anything else: every answer is that error
        self.hits: list[str] = []
        lists = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                lists.hits.append(self.path)
                if lists.status != 200:
                    body, status = b'{"error": {"message": "down"}}', lists.status
                elif self.path.startswith("/api/v1/models"):
                    body, status = json.dumps({"data": lists.openrouter}).encode(), 200
                elif self.path.endswith("/models"):
                    body, status = json.dumps({"object": "list", "data": [
                        {"id": i, "object": "model", "owned_by": "x"}
                        for i in lists.provider_ids]}).encode(), 200
                else:
                    body, status = b"{}", 404
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> ModelLists:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
