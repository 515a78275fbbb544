"""SIGTERM and SIGINT as a request to stop, from the trainer's first instruction on.

Imports nothing heavy: `python -m trainpilot_trainer` installs these handlers before it imports
pydantic, torch or DeepSpeed (seconds of start-up), so a pod deleted while it starts exits with
EXIT_STOPPED and its result line, not with a traceback or the default signal death.
"""

from __future__ import annotations

import signal

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """Set from a signal handler; read by the loop between steps (a handler must not do the work)."""

    def __init__(self) -> None:
        self.signals: list[str] = []
        self._seen = 0

    def __call__(self, signum: int, _frame: object) -> None:
        self.signals.append(signal.Signals(signum).name)

    def check(self) -> bool:
        """Whether a stop was asked for; the signals so far count as handled by the loop."""
        self._seen = len(self.signals)
        return self._seen > 0

    @property
    def unhandled(self) -> bool:
        """A signal arrived after the loop last looked: nobody acted on it (it cuts the linger)."""
        return len(self.signals) > self._seen

    def describe(self) -> str:
        return ", ".join(self.signals)


def install_stop_handlers() -> StopRequest:
    stop = StopRequest()
    for signum in STOP_SIGNALS:
        signal.signal(signum, stop)
    return stop
