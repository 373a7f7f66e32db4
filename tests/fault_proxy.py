"""A fault-injecting HTTP proxy on loopback, in front of a real server (tests and benchmarks).

Each distinct image (the ``data:`` URL of a chat completion request) gets the next fault script
of ``scripts`` in order of first appearance, so the outcomes are exact whatever order Ray sends
the images in. A script is a list of faults its image meets on its first requests, one per
request; after the script the image's requests are forwarded. Faults:

- ``"429"``: 429 with ``Retry-After: <retry_after>`` (seconds);
- ``"500"``: a 500 with a JSON error body;
- ``"400"``: a 400 (a request the server refuses);
- ``"junk"``: a 200 whose body is JSON but not a chat completion;
- ``"stall"``: the request is held ``stall_s`` seconds, then the connection is dropped;
- ``"500*"``: a 500 on every request of that image, forever;
- ``"echo"``: a 500 whose body echoes the request's ``Authorization`` header, as sent and inside
  JSON (escaped), as a careless server's error page does.

``kill_after``/``on_kill``: after that many forwarded 200 responses, ``on_kill`` is called (the
tests kill the real server there), and from then on a request whose upstream is down has its
connection dropped, as a dead server's would be.

The proxy counts requests per outcome (``counts``) and 200 responses per image
(``ok_per_image``), so a test can check that every image was described exactly once.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import threading
from collections import Counter
from collections.abc import Callable

from tests.llama_server import free_port


class FaultProxy:
    def __init__(self, upstream: str, scripts: list[list[str]] | None = None, retry_after: float = 1.0,
                 stall_s: float = 5.0, kill_after: int | None = None, on_kill: Callable[[], None] | None = None):
        self.upstream = upstream.rstrip("/")
        self.scripts = list(scripts or [])
        self.retry_after = retry_after
        self.stall_s = stall_s
        self.kill_after = kill_after
        self.on_kill = on_kill
        self.port = free_port()
        self.counts: Counter[str] = Counter()
        self.ok_per_image: Counter[str] = Counter()
        self._assigned: dict[str, list[str]] = {}
        self._seen: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner = None
        self._session = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FaultProxy:
        started = threading.Event()

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self._loop)
            self._loop.run_until_complete(self._serve())
            started.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="fault-proxy", daemon=True)
        self._thread.start()
        if not started.wait(30):
            raise RuntimeError("the fault proxy did not start")
        return self

    async def _serve(self) -> None:
        import aiohttp
        from aiohttp import web

        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300))
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    def _fault_for(self, image: str | None) -> str | None:
        """The fault this request meets (None: forward it)."""
        if image is None:
            return None
        with self._lock:
            if image not in self._assigned:
                index = len(self._assigned)
                self._assigned[image] = self.scripts[index] if index < len(self.scripts) else []
            script = self._assigned[image]
            n = self._seen[image]
            self._seen[image] += 1
        if script == ["500*"]:
            return "500"
        return script[n] if n < len(script) else None

    async def _handle(self, request):
        import aiohttp
        from aiohttp import web

        body = await request.read()
        image = _image_key(body) if request.method == "POST" else None
        fault = self._fault_for(image)
        with self._lock:
            self.counts["requests"] += 1
            if fault:
                self.counts[fault] += 1
        if fault == "429":
            return web.json_response({"error": {"message": "slow down"}}, status=429,
                                     headers={"Retry-After": f"{self.retry_after:g}"})
        if fault == "500":
            return web.json_response({"error": {"message": "injected server error"}}, status=500)
        if fault == "echo":
            auth = request.headers.get("Authorization", "")
            return web.Response(text=f"bad credentials {auth} " + json.dumps({"error": {"authorization": auth}}),
                                status=500)
        if fault == "400":
            return web.json_response({"error": {"message": "injected bad request"}}, status=400)
        if fault == "junk":
            return web.json_response({"object": "list", "data": []})
        if fault == "stall":
            await asyncio.sleep(self.stall_s)
            request.transport.close()
            raise ConnectionResetError("stalled")
        headers = {k: v for k, v in request.headers.items() if k.lower() in ("content-type", "authorization")}
        try:
            async with self._session.request(request.method, self.upstream + request.path_qs, data=body,
                                             headers=headers) as upstream:
                payload = await upstream.read()
                status = upstream.status
                content_type = upstream.headers.get("Content-Type", "application/json")
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError):
            # The upstream is down: drop the client's connection, as the dead server would have.
            with self._lock:
                self.counts["upstream_down"] += 1
            if request.transport is not None:
                request.transport.close()
            raise ConnectionResetError("upstream down")
        kill = False
        with self._lock:
            self.counts[f"forwarded_{status}"] += 1
            if status == 200 and image is not None:
                self.ok_per_image[image] += 1
                self.counts["ok"] += 1
                kill = self.kill_after is not None and self.counts["ok"] == self.kill_after
        if kill and self.on_kill is not None:
            # Before this response leaves: the requests still in flight meet the dead server.
            await asyncio.get_running_loop().run_in_executor(None, self.on_kill)
        return web.Response(body=payload, status=status, headers={"Content-Type": content_type})

    def reset(self, scripts: list[list[str]] | None = None, kill_after: int | None = None) -> None:
        with self._lock:
            self.scripts = list(scripts or [])
            self.kill_after = kill_after
            self.counts.clear()
            self._assigned.clear()
            self._seen.clear()

    def stop(self) -> None:
        if self._loop is None:
            return

        async def shutdown():
            await self._runner.cleanup()
            await self._session.close()

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _image_key(body: bytes) -> str | None:
    """A short hash of the request's image data URL (None when it carries no image)."""
    try:
        messages = json.loads(body)["messages"]
    except (ValueError, KeyError, TypeError):
        return None
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and part.get("type") == "image_url":
                    url = part["image_url"]["url"] if isinstance(part["image_url"], dict) else part["image_url"]
                    return hashlib.sha256(url.encode()).hexdigest()[:16]
    return None
