"""The files a serve worker counts in: their disk blocks allocated before they are written."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from engine import metrics


def _allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def test_a_counts_file_has_its_blocks_before_it_is_written_and_as_it_grows(
    tmp_path: Path,
) -> None:
    path = tmp_path / "counter_1.db"

    counts = metrics._AllocatedMmapedDict(str(path))
    first = _allocated(path)
    for n in range(1000):  # about 100 kB of keys: the file doubles past its first 64 kB
        counts.write_value(f'["tagrelay_test", "series {n:04}", {{}}, "help"]', 1.0, 0.0)
    counts.close()

    # A page of a sparse file written through the memory map on a full disk is a SIGBUS.
    assert first >= 65536
    assert os.stat(path).st_size > 65536
    assert _allocated(path) >= os.stat(path).st_size


def test_a_full_disk_is_an_os_error_and_leaves_no_empty_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    path = tmp_path / "counter_2.db"

    # An OSError is what metrics.inc and metrics.observe log as a lost count.
    with pytest.raises(OSError) as raised:
        metrics._AllocatedMmapedDict(str(path))

    assert raised.value.errno == errno.ENOSPC
    assert not path.exists()  # an empty file would fail every scrape that reads it
