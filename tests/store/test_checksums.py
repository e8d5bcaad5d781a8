"""store.checksums against zlib.crc32 of the bytes themselves."""
from __future__ import annotations

import os
import zlib
from pathlib import Path

import numpy as np
import pytest

from dist_hooks.store.checksums import fd_crc32, file_crc32


@pytest.mark.parametrize("size", [0, 1, (1 << 18) - 1, 1 << 18, (1 << 18) * 3 + 17])
def test_prefix_crc32(tmp_path: Path, size: int) -> None:
    data = np.random.default_rng(size).integers(0, 256, size + 100, dtype=np.uint8).tobytes()
    f = tmp_path / "f"
    f.write_bytes(data)
    assert file_crc32(f, size) == zlib.crc32(data[:size])
    fd = os.open(f, os.O_RDONLY)
    try:
        assert fd_crc32(fd, size) == zlib.crc32(data[:size])
    finally:
        os.close(fd)


def test_shorter_file_is_an_error(tmp_path: Path) -> None:
    f = tmp_path / "short"
    f.write_bytes(b"x" * 1000)
    with pytest.raises(ValueError, match="short: shorter than 1001 bytes"):
        file_crc32(f, 1001)
