"""The listeners' HTTP/1.1 protocol: uvicorn's httptools one, with the request head bounded (431, as Envoy).

llhttp sets no limit on a request line or header block and uvicorn adds none, so a
client could make a listener hold any amount of header bytes. Envoy refuses a head over
``max_request_headers_kb`` (60 KiB by default) with 431 and closes the connection; so
does this protocol, counting both what a head has sent so far (a slow client never
finishing its headers) and the parsed head once complete.
"""

from __future__ import annotations

from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

__all__ = ["MAX_REQUEST_HEAD", "HttpProtocol"]

MAX_REQUEST_HEAD = 60 * 1024
"""Bytes of request line and headers a listener accepts (Envoy's ``max_request_headers_kb`` default)."""

_BODY = b"request header fields too large\n"
_TOO_LARGE = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
    b"content-type: text/plain; charset=utf-8\r\n"
    b"content-length: " + str(len(_BODY)).encode() + b"\r\n"
    b"connection: close\r\n"
    b"\r\n" + _BODY
)


class _HeadTooLarge(Exception):
    pass


class HttpProtocol(HttpToolsProtocol):
    max_head = MAX_REQUEST_HEAD

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = True
        self._head_bytes = 0
        self._too_large = False

    def data_received(self, data: bytes) -> None:
        if self._in_head:
            self._head_bytes += len(data)  # an upper bound: the same read may carry the start of a body
        super().data_received(data)
        if self._in_head and self._head_bytes > self.max_head and not self._too_large:
            self._too_large = True  # still no end of headers after that many bytes
            self.send_400_response("")

    def on_headers_complete(self) -> None:
        self._in_head = False
        size = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
        if size > self.max_head:
            self._too_large = True
            raise _HeadTooLarge  # httptools stops parsing; uvicorn answers through send_400_response
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_head = True
        self._head_bytes = 0

    def send_400_response(self, msg: str) -> None:
        if not self._too_large:
            super().send_400_response(msg)
            return
        if not self.transport.is_closing():
            self.transport.write(_TOO_LARGE)
            self.transport.close()
