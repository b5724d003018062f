"""Logging to the journal with fields, or to stderr without one. The only module using
systemd-python (``systemd.journal``, ``systemd.daemon``).

Records carry structured fields through ``extra=``: ``VM``, ``STEP``, ``PHASE``,
``DURATION_MS``, ``CODE`` (journal field names: upper case, digits, ``_``; systemd.journal-fields(7)).
``JournalHandler`` turns them into journal fields; its ``sender_function`` parameter lets tests
record what would be sent. Without a journal socket (CI, containers) records go to stderr as
``vfio-hookd[VM=win11 STEP=units DURATION_MS=812.3]: message``, because ``journal.send``
silently drops messages when no journald runs (FIELD-NOTES §4).
"""

from __future__ import annotations

import logging
import os
import sys

FIELDS = ("VM", "STEP", "PHASE", "DURATION_MS", "CODE")
JOURNAL_SOCKET = "/run/systemd/journal/socket"


class FieldFormatter(logging.Formatter):
    """``vfio-hookd[FIELD=value ...] LEVEL: message`` for stderr."""

    def format(self, record: logging.LogRecord) -> str:
        fields = " ".join(f"{k}={getattr(record, k)}" for k in FIELDS if hasattr(record, k))
        text = super().format(record)
        return f"vfio-hookd[{fields}] {record.levelname}: {text}" if fields else \
            f"vfio-hookd {record.levelname}: {text}"


def setup(level: int = logging.INFO, journal: bool | None = None, sender=None) -> logging.Handler:
    """Attach one handler to the ``vfio_hookd`` logger and return it.

    :param journal: True = journal, False = stderr, None = journal when its socket exists and
        ``$VFIO_HOOKD_LOG`` is not ``stderr``.
    :param sender: for tests, a callable used instead of ``systemd.journal.send``.
    """
    logger = logging.getLogger("vfio_hookd")
    for h in list(logger.handlers):
        logger.removeHandler(h)
    if journal is None:
        journal = os.path.exists(JOURNAL_SOCKET) and os.environ.get("VFIO_HOOKD_LOG") != "stderr"
    if journal or sender is not None:
        from systemd.journal import JournalHandler
        kwargs = {"sender_function": sender} if sender is not None else {}
        handler: logging.Handler = JournalHandler(SYSLOG_IDENTIFIER="vfio-hookd", **kwargs)
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(FieldFormatter())
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    return handler


def notify(state: str) -> bool:
    """Send ``state`` (e.g. ``"READY=1"``) to systemd when run as a Type=notify service
    (``$NOTIFY_SOCKET`` set); does nothing otherwise. sd_notify(3).

    A message that cannot be delivered (the socket is gone, nobody listens, a full queue) is
    logged, never raised: the daemon keeps serving without its supervisor's socket.

    :returns: True when sent (or nothing to send to), False when it could not be delivered.
    """
    where = os.environ.get("NOTIFY_SOCKET")
    if not where:
        return True
    try:
        from systemd import daemon
        sent = daemon.notify(state)
    except Exception as exc:   # OSError from sd_notify; ImportError without systemd-python
        logging.getLogger("vfio_hookd").warning("cannot send %s to systemd at %s: %s",
                                                state, where, exc)
        return False
    if sent is False:
        logging.getLogger("vfio_hookd").warning("cannot send %s to systemd at %s", state, where)
        return False
    return True
