"""Every output is written under a temporary name and renamed into place, so a failure part-way leaves the old
file (or nothing) under the real name, never half a new one; and "auto" picks this process's GPU."""
import pytest
import torch

import common
from extras import atomic_files


def test_a_write_that_fails_leaves_the_old_file_and_no_temporary(tmp_path):
    """Catches writing straight to the real name (the old content would be half overwritten) and a temporary
    left behind by the failure."""
    path = tmp_path / "shard.npz"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_files.atomic_path(path) as tmp:
            tmp.write_bytes(b"half of the ne")
            raise RuntimeError("killed")
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard.npz"]


def test_the_temporary_keeps_the_suffix_and_becomes_the_file(tmp_path):
    """np.save and savefig choose their format by the suffix, so the temporary keeps it."""
    with atomic_files.atomic_path(tmp_path / "map.npy") as tmp:
        assert tmp.suffix == ".npy" and tmp.parent == tmp_path and tmp.name.startswith(".")
        tmp.write_bytes(b"new")
    assert (tmp_path / "map.npy").read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["map.npy"]


def test_a_folder_is_swapped_in_whole(tmp_path):
    """An exported model folder: the new one replaces the old one entirely (no stale file from the old one
    survives), and a failure keeps the old one whole."""
    final = tmp_path / "final"
    final.mkdir()
    (final / "model-00001-of-00002.safetensors").write_bytes(b"old shard")
    with atomic_files.atomic_path(final, folder=True) as tmp:
        (tmp / "model.safetensors").write_bytes(b"new")
    assert sorted(p.name for p in final.iterdir()) == ["model.safetensors"]
    with pytest.raises(ValueError):
        with atomic_files.atomic_path(final, folder=True) as tmp:
            (tmp / "config.json").write_text("{")
            raise ValueError("bad")
    assert sorted(p.name for p in final.iterdir()) == ["model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]


def test_auto_device_is_this_processs_gpu_under_torchrun(monkeypatch):
    """torchrun sets LOCAL_RANK: rank 3 of a node must use cuda:3, not every rank cuda:0."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert common.device("auto") == "cuda:3" and common.device("cpu") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert common.device("auto") == "cpu"
    assert common.dtype_for("cuda:0") == torch.bfloat16 and common.dtype_for("cpu") == torch.float32
