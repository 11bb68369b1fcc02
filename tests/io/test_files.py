"""Atomic writes: files and directories get the usual permissions, not mkstemp's private ones."""
from __future__ import annotations

import os
import stat

import pytest
import torch

from deltakit.io.files import atomic_dir, save_tensors, write_json


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_atomic_outputs_have_the_modes_of_a_plain_write(tmp_path):
    old = os.umask(0o022)
    try:
        write_json(tmp_path / "a.json", {"x": 1})
        save_tensors(tmp_path / "t.safetensors", {"w": torch.zeros(2)})
        with atomic_dir(tmp_path / "d") as d:
            (d / "f").write_text("x")
        with open(tmp_path / "plain", "w"):
            pass
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(tmp_path / "a.json") == mode(tmp_path / "plain") == 0o644
    assert mode(tmp_path / "t.safetensors") == 0o644
    assert mode(tmp_path / "d") == 0o755
