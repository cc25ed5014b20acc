"""A stop asked by the scheduler or the user, honoured where the writer's state is whole.

Within `StopSignals()`, SIGTERM (what Slurm, Kubernetes and most schedulers send before killing a job) and SIGINT
(Ctrl-C) only set `requested`; the writer checks it at its safe points (training: after an optimizer step;
extraction: between batches), saves what it must and raises `Stopped`, which the command lines turn into one line and
exit code STOPPED_EXIT. A second signal ends the process at once. The previous handlers come back on exit; outside
the main thread, where Python allows no handler, nothing is installed.
"""

import signal
import threading

STOPPED_EXIT = 75  # EX_TEMPFAIL: a temporary failure, run the same command again
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Stopped(Exception):
    """A run stopped on request at a safe point; the same command resumes it."""


class StopSignals:
    def __init__(self):
        self.requested: str | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame):
        if self.requested is not None:  # the second one: stop now
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            signal.raise_signal(signum)
            return
        self.requested = signal.Signals(signum).name

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}
