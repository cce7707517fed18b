"""`nla serve`: the explorer over HTTP, a FastAPI app on uvicorn with plain HTML/JS/CSS from `nla/static`.

    nla serve                                        # RL pair if trained, else SFT; http://127.0.0.1:8765/
    nla serve --av data/checkpoints/av_sft --ar data/checkpoints/ar_sft \\
              --av2 data/checkpoints/rl/av --ar2 data/checkpoints/rl/ar   # two pairs side by side
    curl -s localhost:8765/api/explain -d '{"text": "The Eiffel Tower is in"}'

Everything the page shows comes from the JSON API (docs/serve.md): `/api/explain` (one text,
answered when done), `/api/jobs` (the same, with progress to poll), `/api/rows` (eval view),
`/api/search` (search view) and `/api/info`. Records are `nla explain --json` records.

The server listens on loopback unless `--allow-remote` says otherwise: it has no
authentication, and every request costs model time. On loopback it also refuses requests whose
Host header names another machine (DNS rebinding). Refusals are one JSON line, {"error": "..."},
with the status that fits: 413 (too large), 422 (malformed), 404, 503 (queue full), 504 (time cap).
The page loads nothing from the network, so it works offline.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import sys
import time
from pathlib import Path
from typing import Literal

import uvicorn
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.exceptions import HTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware

from nla.errors import NLAError
from nla.explorer import Explorer, ExplorerConfig
from nla.explorer_engine import RequestError

STATIC = Path(__file__).with_name("static")
LOOPBACK_NAMES = ["localhost", "127.0.0.1", "::1", "[::1]"]
MAX_QUERY = 200  # characters of a search phrase


class ExplainBody(BaseModel):
    """Body of /api/explain and /api/jobs."""

    model_config = ConfigDict(extra="forbid")
    text: str
    positions: Literal["all", "last"] | list[int] = "all"  # 'all': every non-special token
    time_limit: float | None = None  # seconds; may only lower the server's --time-limit


def _one_line(err: ValidationError | RequestValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(str(part) for part in first.get("loc", ()) if part != "body") or "body"
    return f'bad request: {where}: {first.get("msg", "invalid")}; send JSON like {{"text": "..."}}'


async def _read_body(request: Request, limit: int) -> ExplainBody:
    """The body, refused once it passes `limit` bytes (also when the client sends no Content-Length)."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"request body is over {limit} bytes; send a shorter text")
        chunks.append(chunk)
    try:
        return ExplainBody.model_validate_json(b"".join(chunks))
    except ValidationError as err:
        raise RequestError(422, _one_line(err)) from None


def create_app(explorer: Explorer, *, loopback_only: bool = True) -> FastAPI:
    """The app: static page, JSON API, one-line errors. `explorer` must be open."""
    # No /docs or /redoc: FastAPI's pages load Swagger from a CDN; /openapi.json stays.
    app = FastAPI(title="nla explorer", docs_url=None, redoc_url=None)
    if loopback_only:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=LOOPBACK_NAMES)
    engine = explorer.engine
    body_limit = 8 * explorer.cfg.max_chars + 4096  # JSON escapes may take 6 bytes per character

    @app.exception_handler(RequestError)
    async def refused(request: Request, err: RequestError) -> JSONResponse:
        return JSONResponse({"error": str(err)}, status_code=err.status)

    @app.exception_handler(NLAError)
    async def bad_input(request: Request, err: NLAError) -> JSONResponse:
        return JSONResponse({"error": str(err)}, status_code=422)

    @app.exception_handler(RequestValidationError)
    async def malformed(request: Request, err: RequestValidationError) -> JSONResponse:
        return JSONResponse({"error": _one_line(err)}, status_code=422)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException) -> JSONResponse:
        return JSONResponse({"error": f"{err.detail}: {request.url.path}"}, status_code=err.status_code)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/api/info")
    async def info() -> dict:
        return explorer.info()

    @app.post("/api/explain")
    async def explain(request: Request) -> dict:
        """Explain one text; answers when every position is explained (or with 504 at the time cap)."""
        body = await _read_body(request, body_limit)
        job = explorer.explain(body.text, body.positions, body.time_limit)
        return await asyncio.wrap_future(job.future)

    @app.post("/api/jobs", status_code=202)
    async def submit(request: Request) -> dict:
        """The same as /api/explain, answered at once with a job id to poll."""
        body = await _read_body(request, body_limit)
        return explorer.explain(body.text, body.positions, body.time_limit).progress()

    @app.get("/api/jobs/{job_id}")
    async def poll(job_id: str) -> dict:
        """Progress, and the result so far (the explained prefix of positions; all of it once done)."""
        job = engine.job(job_id)
        return job.progress() | {"result": engine.result(job)}

    @app.get("/api/rows")
    async def rows(
        split: str | None = None,
        q: str | None = None,
        sort: str | None = None,
        order: Literal["asc", "desc"] = "asc",
        limit: int = Query(100, ge=1, le=1000),
        offset: int = Query(0, ge=0),
    ):
        """The eval table, filtered (split, substring q) and sorted; 202 with progress while it is computed."""
        table = explorer.rows
        if table is None:
            raise RequestError(404, explorer.notes["rows"])
        if table.rows is None:
            job = table.job()
            if job.error is not None:
                raise job.error
            return JSONResponse({"status": "running", "job": job.progress()}, status_code=202)
        return table.query(split=split, q=q, sort=sort, order=order, limit=limit, offset=offset)

    @app.get("/api/search")
    async def search(q: str = "", limit: int = Query(50, ge=1, le=500)) -> dict:
        """Positions of the corpus whose explanation contains the word or phrase q; explains the corpus on demand."""
        corpus = explorer.corpus
        if corpus is None:
            raise RequestError(404, explorer.notes["corpus"])
        if len(q) > MAX_QUERY:
            raise RequestError(413, f"query has {len(q)} characters; the limit is {MAX_QUERY}")
        corpus.start()
        return corpus.search(q, limit)

    return app


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve anywhere


def _bind(host: str, port: int) -> socket.socket:
    """Listen before loading the models: a port in use fails in a second, and port 0 picks a free one."""
    bare = host.strip("[]")
    family = socket.AF_INET6 if ":" in bare else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((bare, port))
    except OSError as err:
        sock.close()
        raise NLAError(f"cannot listen on {host}:{port} ({err.strerror}); pick another --port") from None
    sock.listen(128)  # connections wait in the backlog until uvicorn accepts them: 'ready' is true when printed
    return sock


def serve(cfg: ExplorerConfig, *, host: str = "127.0.0.1", port: int = 8765, allow_remote: bool = False) -> None:
    """Load the models once and serve until interrupted. Prints the URL when ready."""
    if not is_loopback(host):
        if not allow_remote:
            raise NLAError(
                f"--host {host} is not a loopback address and the explorer has no authentication; "
                "pass --allow-remote to serve it on the network anyway"
            )
        print(
            f"nla serve: warning: listening on {host}, reachable from other machines, without authentication; "
            "anyone who can reach this port can run the models",
            file=sys.stderr,
        )
    with _bind(host, port) as sock:
        start = time.perf_counter()
        print("nla serve: loading the subject model and checkpoints (once)", flush=True)
        explorer = Explorer.open(cfg)
        try:
            for note in explorer.notes.values():
                print(f"nla serve: {note}", flush=True)
            pairs = ", ".join(
                f"{p['name']}: {p['av']}" + (f" + {p['ar']}" if p["ar"] else "") for p in explorer.info()["checkpoints"]
            )
            shown = f"[{host.strip('[]')}]" if ":" in host else host
            url = f"http://{shown}:{sock.getsockname()[1]}/"
            print(f"nla serve: {pairs}; ready in {time.perf_counter() - start:.1f} s at {url}", flush=True)
            app = create_app(explorer, loopback_only=not allow_remote)
            uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
        finally:
            explorer.close()
