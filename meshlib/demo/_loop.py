"""An event loop in a thread of its own, for the demo's in-process servers and its control plane.

Each in-process "service" of the demo would be its own process in production. Giving
them their own loop (in their own thread) keeps them honest: the traffic the demo
drives from the main loop reaches them over real sockets, and a slow step in the
driver never stalls them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["LoopThread"]

T = TypeVar("T")


class LoopThread:
    """``run(coro)`` runs a coroutine on the thread's loop and returns its result (from any other thread)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._main, name=f"meshlib-demo-{name}", daemon=True)
        self._thread.start()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            try:
                pending = [t for t in asyncio.all_tasks(self.loop) if not t.done()]
                for task in pending:
                    task.cancel()
                if pending:
                    self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
                self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            finally:
                self.loop.close()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    async def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        """Await ``coro`` running on this thread's loop, from another loop."""
        return await asyncio.wait_for(asyncio.wrap_future(self.submit(coro)), timeout)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the loop (its remaining tasks are cancelled) and join the thread."""
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout)
