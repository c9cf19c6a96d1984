"""How many cores a process may use: its affinity and its container's CPU quota, not the host's
core count."""

from __future__ import annotations

import os

import pytest

from pipeline import devices


@pytest.fixture
def host_of_64(monkeypatch, tmp_path):
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    cpu_max = tmp_path / "cpu.max"
    monkeypatch.setattr(devices, "CGROUP_CPU_MAX", cpu_max)
    return monkeypatch, cpu_max


def test_no_limit_is_every_core(host_of_64):
    assert devices.usable_cores() == 64  # no cgroup file


def test_affinity_limits_the_cores(host_of_64):
    monkeypatch, _ = host_of_64
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3, 7, 9}, raising=False)
    assert devices.usable_cores() == 3


@pytest.mark.parametrize("line, cores", [("150000 100000\n", 2), ("200000 100000\n", 2), ("50000 100000\n", 1),
                                         ("max 100000\n", 64), ("garbage\n", 64), ("", 64)])
def test_a_cpu_quota_limits_the_cores_rounded_up(host_of_64, line, cores):
    _, cpu_max = host_of_64
    cpu_max.write_text(line)
    assert devices.usable_cores() == cores


def test_extraction_loader_workers_follow_the_quota(host_of_64):
    from pipeline.config import ExtractConfig, build
    from pipeline.runners.extract import _workers

    _, cpu_max = host_of_64
    cpu_max.write_text("100000 100000\n")
    cfg = build(ExtractConfig, {"backbone": {"name": "test_vit", "weights": "none"},
                                "data": {"kind": "image_folder", "root": "x"}, "store": {"path": "s.zarr"}})
    assert _workers(cfg, on_cuda=False) == 1  # 2 (the CPU default) on 64 host cores before
