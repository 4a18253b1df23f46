"""``edgelvm serve``: an OpenAI-compatible HTTP server over one bundle (extra: ``pip install 'edgelvm[serve]'``).

    from edgelvm.runtime import VLM
    from edgelvm.runtime.engine import Engine
    from edgelvm.serve import ServeConfig, create_app

    app = create_app(Engine(VLM.load("bundle/"), max_queue=8), ServeConfig(model_id="llava"))
    uvicorn.run(app, host="127.0.0.1", port=8000)

The names are imported lazily so that ``edgelvm.serve.cli`` and ``edgelvm.serve.protocol`` load without Starlette
(the CLI then says which extra to install instead of failing with an ImportError).
"""

from __future__ import annotations

from typing import Any

__all__ = ["APIError", "ServeConfig", "create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from edgelvm.serve.app import create_app

        return create_app
    if name in ("APIError", "ServeConfig"):
        from edgelvm.serve import protocol

        return getattr(protocol, name)
    raise AttributeError(f"module 'edgelvm.serve' has no attribute {name!r}")
