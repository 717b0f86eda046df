"""Faults the tests inject: what a crash or a full disk does to a file being written."""

from __future__ import annotations

import os
from contextlib import contextmanager


@contextmanager
def writes_fail_halfway(error: BaseException):
    """Inside the block, every file opened with os.fdopen (atomic_file's temp files) takes half of
    what it is given, then raises `error`: KeyboardInterrupt for a crash mid-write, an OSError
    for a full or failing disk."""
    real_fdopen = os.fdopen

    class HalfWriter:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            self.f.write(data[:len(data) // 2])
            raise error

    os.fdopen = lambda fd, mode: HalfWriter(real_fdopen(fd, mode))
    try:
        yield
    finally:
        os.fdopen = real_fdopen
