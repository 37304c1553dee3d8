"""The peer of the aws.status benchmark: a Starlette endpoint under the same uvicorn
configuration as `vodpush serve`, answering a constant JSON document."""

from __future__ import annotations

import sys

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

CONSTANT = {"status": "success", "message": "Found AWS Status", "handle_time": 0.0, "data": []}


async def constant(request: Request) -> JSONResponse:
    return JSONResponse(CONSTANT)


app = Starlette(routes=[Route("/stable/", constant, methods=["POST"])])

if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_config=None, access_log=False)
