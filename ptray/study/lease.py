"""A running study's lease, held in the tracking store itself (an experiment tag), so that a second driver for the
same study is refused in one line, on this machine or another one sharing the tracking server: two drivers would
log every epoch twice and duplicate the transfer runs.

The lease is the experiment tag ``ptray.running.<study>`` (``layout.LEASE_TAG_PREFIX``): the owner (a random id),
its host and pid, and a heartbeat (seconds since the epoch) a thread renews every ``HEARTBEAT_S``. It is stale, and
taken over, ``STALE_S`` after the last heartbeat, or at once when its driver ran on this host and is gone (a killed
driver's ``--resume`` need not wait). MLflow has no compare-and-set: a driver writes its lease, waits
``SETTLE_S`` and reads it back; of two drivers started together, the one whose lease was overwritten gives way.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from typing import Any

from ptray import layout
from ptray.errors import PtrayError

HEARTBEAT_S = 30.0
STALE_S = 120.0  # four missed heartbeats: a driver that stopped without releasing (kill -9, a lost machine)
SETTLE_S = 2.0  # between writing the lease and reading it back: longer than a store write takes


class StudyLease:
    """The lease of ``study`` in the experiment ``experiment_id`` of ``mlflow_client``'s store; ``acquire`` it
    before anything is started, ``release`` it at the end (also a context manager)."""

    def __init__(self, mlflow_client, experiment_id: str, study: str):
        self.client, self.experiment_id, self.study = mlflow_client, experiment_id, study
        self.key = layout.LEASE_TAG_PREFIX + study
        self.me = {"owner": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid()}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def holder(self) -> dict[str, Any] | None:
        """The lease as stored (with ``heartbeat``), or None when none is held."""
        raw = self.client.get_experiment(self.experiment_id).tags.get(self.key)
        try:
            return json.loads(raw) if raw else None
        except ValueError:  # not ours to read: treated as no lease, and overwritten
            return None

    def _write(self) -> None:
        self.client.set_experiment_tag(self.experiment_id, self.key, json.dumps({**self.me, "heartbeat": time.time()}))

    def acquire(self) -> StudyLease:
        """Take the lease and start renewing it; returns self.

        Raises:
            PtrayError: another driver holds a fresh lease of the study (``refusal``), also one that took it
                while this one settled.
        """
        other = self.holder()
        if other is not None and not stale(other):
            raise refusal(self.study, other)
        self._write()
        time.sleep(SETTLE_S)
        now = self.holder()
        if now is None or now.get("owner") != self.me["owner"]:
            raise refusal(self.study, now or other or {})
        self._thread = threading.Thread(target=self._renew, name="ptray-lease", daemon=True)
        self._thread.start()
        return self

    def _renew(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self._write()
            except Exception:  # noqa: BLE001 - a store that does not answer now: the next beat tries again
                pass

    def release(self) -> None:
        """Stop renewing and remove the lease, if it is still ours (a store that does not answer: it goes stale)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            held = self.holder()
            if held is not None and held.get("owner") == self.me["owner"]:
                self.client.delete_experiment_tag(self.experiment_id, self.key)
        except Exception:  # noqa: BLE001 - it goes stale after STALE_S
            pass

    def __enter__(self) -> StudyLease:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def stale(lease: dict[str, Any], now: float | None = None) -> bool:
    """Whether a stored ``lease`` may be taken over: no heartbeat for ``STALE_S``, or its driver ran on this host
    and no longer runs."""
    now = time.time() if now is None else now
    if now - float(lease.get("heartbeat", 0)) > STALE_S:
        return True
    if lease.get("host") == socket.gethostname():
        try:
            os.kill(int(lease["pid"]), 0)
        except ProcessLookupError:
            return True
        except (PermissionError, KeyError, ValueError, OSError):  # another user's live process, or unreadable
            return False
    return False


def refusal(study: str, lease: dict[str, Any]) -> PtrayError:
    """The one line refusing a second driver of ``study`` while ``lease`` is held."""
    seen = max(0.0, time.time() - float(lease.get("heartbeat", time.time())))
    return PtrayError(f"study {study!r} is running: its driver (pid {lease.get('pid', '?')} on "
                      f"{lease.get('host', '?')}) renewed its lease {seen:.0f} s ago; wait for it to finish, or stop "
                      f"it; a driver stopped without ending (kill -9, a lost machine) frees the study "
                      f"{STALE_S:.0f} s after its last renewal, then --resume continues it")
