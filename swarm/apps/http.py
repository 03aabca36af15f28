"""Serving a FastAPI app from a command: the socket is bound before "ready" is printed, so that whoever waits for
that line can connect at once (and `--port 0` reports the port it got)."""
import socket
from typing import Callable

LOG_LEVEL = "warning"
DISTRIBUTION = "cocoon-swarm"


def require_api_extras(what: str) -> None:
    """FastAPI and uvicorn are an extra: say how to get them instead of "No module named 'fastapi'"."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise SystemExit(f"{what} needs {e.name or 'fastapi'}: pip install '{DISTRIBUTION}[api]' (or, in a clone, "
                         f"pip install -e '.[api]')") from None


def serve_app(app, host: str, port: int, ready: Callable[[str], str]) -> None:
    """Binds host:port, prints `ready(url)`, then serves until interrupted."""
    import uvicorn

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise SystemExit(f"cannot listen on {host}:{port} ({e.strerror}): choose another --port or --host") from None
    sock.listen(128)
    bound_port = sock.getsockname()[1]
    shown = f"[{host}]" if family == socket.AF_INET6 else host
    print(ready(f"http://{shown}:{bound_port}"), flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level=LOG_LEVEL))
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
