"""A Flotilla function in Python: a `wasi:http/proxy` component built by
componentize-py (from PyPI) with no Flotilla code in it. It answers every
request with `hello from python (GREETING): METHOD PATH` and echoes a
request body back after it.

Build: componentize-py -d wit/http -w flotilla:function/function \
           componentize app -o hello-py.wasm   (run in this directory)
"""

import os

from componentize_py_types import Ok
from wit_world import exports
from wit_world.imports import types
from wit_world.imports.types import (
    Fields,
    IncomingRequest,
    OutgoingBody,
    OutgoingResponse,
    ResponseOutparam,
)


def method_name(method: types.Method) -> str:
    if isinstance(method, types.Method_Other):
        return method.value
    return type(method).__name__.removeprefix("Method_").upper()


def read_body(request: IncomingRequest) -> bytes:
    data = b""
    incoming = request.consume()
    with incoming.stream() as stream:
        while True:
            try:
                data += stream.blocking_read(65536)
            except Exception:
                break
    return data


class IncomingHandler(exports.IncomingHandler):
    def handle(self, request: IncomingRequest, response_out: ResponseOutparam) -> None:
        greeting = os.environ.get("GREETING", "no greeting")
        line = f"hello from python ({greeting}): {method_name(request.method())} {request.path_with_query() or '/'}\n"
        body_in = read_body(request)
        response = OutgoingResponse(
            Fields.from_list([("content-type", b"text/plain; charset=utf-8")])
        )
        response.set_status_code(200)
        body = response.body()
        ResponseOutparam.set(response_out, Ok(response))
        with body.write() as out:
            out.blocking_write_and_flush(line.encode() + body_in)
        OutgoingBody.finish(body, None)
