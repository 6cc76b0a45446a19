"""The web app of ``lcm-kit serve``: a Starlette app with one page and one websocket, run by uvicorn.

Routes: ``GET /`` (the page, ``lcm_kit/assets/serve/index.html``), ``GET /healthz`` (counters, JSON) and the
websocket ``/ws``. There is no static-file route: nothing a client sends is ever read as a path.

The websocket, one per open page:

* server -> page, first: ``{"type": "config", "limits": {...}, "model": ...}`` (the ranges the inputs show);
* page -> server, text: ``{"type": "generate", "id": n, "prompt": ..., "steps": ..., "guidance": ..., "seed": ...,
  "width": ..., "height": ..., "img2img": false, "strength": ...}`` on every (debounced) change; ``id`` grows;
* page -> server, binary: the bytes of an image file for img2img (kept, shrunk to fit, for that page only);
* server -> page: ``{"type": "image", "id": n, "png": <base64>, "ms": ..., ...}`` for the newest request of the page
  (older ones still waiting are dropped by :class:`~lcm_kit.commands.serve_worker.LatestWinsWorker`),
  ``{"type": "upload", ...}`` for a kept image, or ``{"type": "error", "id": n, "field": ..., "message": ...}``.

This module imports Starlette and uvicorn at the top; :mod:`lcm_kit.commands.serve` imports it only when the server
starts, so the rest of lcm-kit works without the ``serve`` extra.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import socket
import threading
from pathlib import Path
from urllib.parse import urlsplit

import uvicorn
from starlette.applications import Starlette
from starlette.responses import HTMLResponse, JSONResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from .serve_images import ImageRenderer, RenderJob, shrink_to_fit
from .serve_requests import RequestError, ServeLimits, decode_upload, parse_generate_request, parse_message
from .serve_worker import LatestWinsWorker

PAGE = Path(__file__).resolve().parents[1] / "assets" / "serve" / "index.html"
MAX_CONNECTIONS = 32  # each page may hold one uploaded image; bound what many pages can take
# The page loads nothing from anywhere else and talks only to this server.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                               "img-src data: blob:; connect-src 'self'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
}


def origin_allowed(websocket: WebSocket) -> bool:
    """Browsers let any web site open a websocket to 127.0.0.1; only this server's own page may use it. Clients
    that are not browsers send no Origin."""
    origin = websocket.headers.get("origin")
    return origin is None or urlsplit(origin).netloc == websocket.headers.get("host")


class ServeApp:
    """The app's state: one pipeline behind one :class:`LatestWinsWorker`, the limits, the open pages."""

    def __init__(self, pipe, limits: ServeLimits, model_name: str = "", threads: int | None = None):
        import torch

        self.limits = limits
        self.model_name = model_name
        self.renderer = ImageRenderer(pipe)
        # torch's intra-op thread count is per thread: set it where the pipeline runs.
        self.worker = LatestWinsWorker(self.renderer, initializer=None if threads is None else (
            lambda: torch.set_num_threads(threads)))
        self.connections = 0
        self._client_ids = itertools.count()
        self.page = PAGE.read_text(encoding="utf-8")
        self.app = Starlette(
            routes=[Route("/", self.index), Route("/healthz", self.healthz), WebSocketRoute("/ws", self.websocket)],
            lifespan=self._lifespan,
        )

    @contextlib.asynccontextmanager
    async def _lifespan(self, app):
        yield
        self.close()  # the server is stopping: cancel waiting jobs, stop the worker thread

    def close(self) -> None:
        self.worker.close()

    async def index(self, request) -> HTMLResponse:
        return HTMLResponse(self.page, headers=PAGE_HEADERS)

    async def healthz(self, request) -> JSONResponse:
        return JSONResponse({"ok": True, "connections": self.connections, "waiting": self.worker.waiting,
                             "worker": dict(self.worker.stats)})

    async def websocket(self, websocket: WebSocket) -> None:
        if not origin_allowed(websocket):
            await websocket.close(code=1008)  # before accept: the browser sees a refused handshake (HTTP 403)
            return
        await websocket.accept()
        page = _Page(self, websocket, next(self._client_ids))
        if self.connections >= MAX_CONNECTIONS:
            await page.send_error(None, None, f"server: {self.connections} pages are open, allowed at most "
                                              f"{MAX_CONNECTIONS}; close one and reload")
            await websocket.close(code=1013)
            return
        self.connections += 1
        try:
            await page.run()
        finally:
            self.connections -= 1


class _Page:
    """One open page: reads its messages, hands its requests to the worker, sends the answers."""

    def __init__(self, server: ServeApp, websocket: WebSocket, client: int):
        self.server, self.websocket, self.client = server, websocket, client
        self.image = None  # the uploaded image, RGB, shrunk to fit
        self.send_lock = asyncio.Lock()
        self.answers: set[asyncio.Task] = set()

    async def run(self) -> None:
        server = self.server
        await self.send({"type": "config", "model": server.model_name, "limits": server.limits.as_dict()})
        try:
            while True:
                message = await self.websocket.receive()
                if message["type"] == "websocket.disconnect":
                    return
                if message.get("bytes") is not None:
                    await self.upload(message["bytes"])
                elif message.get("text") is not None:
                    self.request(message["text"])
        except WebSocketDisconnect:
            return
        finally:
            server.worker.drop(self.client)
            for task in list(self.answers):
                task.cancel()

    def request(self, text: str) -> None:
        request_id = None
        try:
            message = parse_message(text)
            if isinstance(message.get("id"), int) and not isinstance(message.get("id"), bool):
                request_id = message["id"]
            request = parse_generate_request(message, self.server.limits)
            if request.img2img and self.image is None:
                raise RequestError("image", "image: none uploaded; choose a PNG, JPEG or WebP file for img2img")
        except RequestError as err:
            # A bad value also withdraws the page's waiting request: its image would hide the message.
            self.server.worker.drop(self.client)
            self._spawn(self.send_error(request_id, err.field, str(err)))
            return
        job = RenderJob(request, self.image if request.img2img else None)
        future = self.server.worker.submit(self.client, job)
        self._spawn(self.answer(request.id, future))

    async def answer(self, request_id: int, future) -> None:
        try:
            rendered = await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            return  # superseded by a newer request of this page, or the page left
        except RequestError as err:
            await self.send_error(request_id, err.field, str(err))
            return
        except Exception as err:  # noqa: BLE001 - the pipeline refused the call: tell the page, keep serving
            await self.send_error(request_id, None, f"generation failed: {type(err).__name__}: {err}")
            return
        await self.send({"type": "image", "id": rendered.id, "width": rendered.width, "height": rendered.height,
                         "ms": round(rendered.ms, 1), "png": base64.b64encode(rendered.png).decode("ascii")})

    async def upload(self, data: bytes) -> None:
        limits = self.server.limits
        try:
            # Decoding runs off the event loop (a large image takes a while), never on the pipeline's thread.
            image = await asyncio.to_thread(decode_upload, data, limits)
        except RequestError as err:
            await self.send_error(None, err.field, str(err))
            return
        original = image.size
        self.image = await asyncio.to_thread(shrink_to_fit, image, limits.max_side)
        await self.send({"type": "upload", "width": self.image.width, "height": self.image.height,
                         "original_width": original[0], "original_height": original[1]})

    async def send_error(self, request_id, field, message: str) -> None:
        await self.send({"type": "error", "id": request_id, "field": field, "message": message})

    async def send(self, payload: dict) -> None:
        async with self.send_lock:  # one frame at a time on this socket
            with contextlib.suppress(WebSocketDisconnect, RuntimeError, OSError):
                await self.websocket.send_text(json.dumps(payload))

    def _spawn(self, coroutine) -> None:
        task = asyncio.ensure_future(coroutine)
        self.answers.add(task)
        task.add_done_callback(self.answers.discard)


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (``port=0``: a free one); ``OSError`` if it cannot be had."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family)


def uvicorn_server(app: ServeApp) -> uvicorn.Server:
    limits = app.limits
    config = uvicorn.Config(
        app.app,
        ws="auto",
        # The server answers a too-large upload itself, with a message; beyond twice the cap the frame is refused.
        ws_max_size=2 * limits.max_upload_bytes,
        ws_per_message_deflate=False,  # PNG and base64 hardly compress; spend the CPU on the model
        lifespan="on",
        log_level="warning",
        access_log=False,
    )
    return uvicorn.Server(config)


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class BackgroundServer:
    """``ServeApp`` served by uvicorn on a thread of this process (tests, notebooks): ``with BackgroundServer(app)
    as server: server.url``; leaving the block stops the server and the worker."""

    def __init__(self, app: ServeApp, host: str = "127.0.0.1", port: int = 0):
        self.app = app
        self.socket = listen(host, port)
        self.url = url_of(self.socket)
        self.server = uvicorn_server(app)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]},
                                       name="lcm-kit-serve-http", daemon=True)

    def __enter__(self):
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the server thread stopped before it started serving")
            self.thread.join(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.socket.close()
        self.app.close()
