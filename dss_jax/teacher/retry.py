"""When dss-teacher asks again: backoff delays (honouring Retry-After) and a circuit breaker on connection failures."""

from __future__ import annotations

import asyncio
import email.utils
import random
import time
from typing import Any


def parse_retry_after(headers: Any) -> float | None:
    """Seconds from ``Retry-After-Ms`` / ``Retry-After`` (seconds or an HTTP date), or None."""
    if headers is None:
        return None
    for name, scale in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        v = headers.get(name)
        if v is None:
            continue
        try:
            return max(0.0, float(v) / scale)
        except ValueError:
            pass
        try:
            return max(0.0, email.utils.parsedate_to_datetime(v).timestamp() - time.time())
        except (TypeError, ValueError, IndexError):
            return None
    return None


def backoff_delay(attempt: int, retry_after: float | None, base: float, cap: float) -> float:
    """Retry-After when the server gives one (never less, a little jitter above); else capped exponential with jitter."""
    if retry_after is not None:
        return min(retry_after, 600.0) * random.uniform(1.0, 1.1)
    return min(cap, base * 2.0**attempt) * random.uniform(0.5, 1.0)


class Breaker:
    """A circuit breaker on connection failures: ``limit`` in a row, across the whole run, stop it.

    Any answer from the endpoint (an HTTP status included) resets the count. After a connection failure the
    endpoint is probed by one request at a time, each after the next capped exponential backoff, while the other
    workers wait: an outage costs ``limit`` probes and a bounded wait, whatever the concurrency and the number of
    inputs. Requests already in flight when the outage was seen fail without counting again.
    """

    def __init__(self, limit: int, base: float, cap: float):
        self.limit, self.base, self.cap = limit, base, cap
        self.failures = 0  # in a row
        self.prober: object | None = None  # the request probing the endpoint while the breaker is open
        self.resume_at = 0.0  # monotonic time of the next probe
        self.tripped = ""  # the last failure's cause, once ``limit`` is reached
        self._cond = asyncio.Condition()

    async def turn(self, who: object) -> None:
        """Returns when ``who`` may send: at once while the endpoint answers; else as the one probe, after the backoff."""
        async with self._cond:
            while self.failures and not self.tripped:
                if self.prober is None or self.prober is who:
                    self.prober = who
                    delay = self.resume_at - time.monotonic()
                    if delay <= 0:
                        return
                    try:  # woken early if another request's answer closes the breaker
                        await asyncio.wait_for(self._cond.wait(), delay)
                    except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
                        pass
                else:
                    await self._cond.wait()

    async def reached(self) -> None:
        """The endpoint answered: close the breaker."""
        async with self._cond:
            if self.failures:
                self.failures, self.prober = 0, None
                self._cond.notify_all()

    async def failed(self, who: object, cause: str) -> None:
        """``who`` could not connect: count it if it was the first failure or the probe, and trip at the limit."""
        async with self._cond:
            if self.failures and self.prober is not who:
                return  # sent before the outage was seen: the same outage, counted already
            self.failures += 1
            self.prober = who
            if self.failures >= self.limit:
                self.tripped = cause
            else:
                self.resume_at = time.monotonic() + backoff_delay(self.failures - 1, None, self.base, self.cap)
            self._cond.notify_all()

    async def release(self, who: object) -> None:
        """``who`` gave up its request: another waiting request takes over the probing."""
        async with self._cond:
            if self.prober is who:
                self.prober = None
                self._cond.notify_all()
