"""`fastvlm batch --ray` lifecycle against a stand-in `ray` module (Ray itself is a large optional
extra): Ray's logs stay behind -v, and a local cluster the driver started is shut down on every
exit path Python sees — normal end, a failed job, Ctrl-C, SIGTERM, a consumer that stops early —
while a cluster it did not start is left alone. Real Ray runs are in test_batch.py (slow)."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import types
from pathlib import Path

import pytest
from test_batch import make_images, rows

import fastvlm.batch as batch
from fastvlm.batch_ray import run_ray

PROMPT = "Describe this image."


class FakeRayError(Exception):
    pass


def fake_ray(behaviour=None, initialized: bool = False) -> types.ModuleType:
    """A `ray` module whose dataset yields one row per item; `behaviour(i)` runs before row i."""
    ray = types.ModuleType("ray")
    ray.calls = []
    state = {"init": initialized}

    def init(**kw):
        ray.calls.append(("init", kw))
        state["init"] = True

    def shutdown():
        ray.calls.append(("shutdown", {}))
        state["init"] = False

    class Dataset:
        def __init__(self, items):
            self.items = items

        def map_batches(self, fn, **kw):
            ray.calls.append(("map_batches", kw))
            return self

        def iter_rows(self):
            for i, it in enumerate(self.items):
                if behaviour:
                    behaviour(i)
                yield {"row": json.dumps({"id": it["id"], "image": it["image"], "text": "x"})}

    ctx = types.SimpleNamespace(enable_progress_bars=True)
    ray.is_initialized = lambda: state["init"]
    ray.init, ray.shutdown = init, shutdown
    ray.cluster_resources = lambda: {"CPU": 2}
    ray.exceptions = types.SimpleNamespace(RayError=FakeRayError)
    ray.data = types.SimpleNamespace(
        DataContext=types.SimpleNamespace(get_current=lambda: ctx),
        from_items=lambda items, **kw: Dataset(items),
        ActorPoolStrategy=lambda size: ("pool", size),
    )
    ray.ctx = ctx
    return ray


def items(n: int) -> list[dict]:
    return [
        {"id": str(i), "image": f"{i}.png", "image_bytes": None, "prompt": "p"} for i in range(n)
    ]


OPTIONS = {"batch_size": 2, "threads": 1, "model": None, "load": {}, "sampling": {}}


def calls(ray, name: str) -> list[dict]:
    return [kw for c, kw in ray.calls if c == name]


@pytest.mark.parametrize(
    "verbosity,level,to_driver,bars",
    [
        (-1, logging.ERROR, False, False),
        (0, logging.ERROR, False, False),
        (1, logging.INFO, True, True),
    ],
)
def test_ray_logs_stay_behind_verbose(monkeypatch, verbosity, level, to_driver, bars):
    ray = fake_ray()
    monkeypatch.setitem(sys.modules, "ray", ray)
    out = list(run_ray(items(3), OPTIONS, 1, None, verbosity))
    assert [r["id"] for r in out] == ["0", "1", "2"]
    (kw,) = calls(ray, "init")
    assert kw["log_to_driver"] is to_driver and kw["logging_level"] == level
    assert kw.get("include_dashboard", None) in ((False,) if verbosity <= 0 else (None,))
    assert ray.ctx.enable_progress_bars is bars
    assert logging.getLogger("ray.data").level == level
    assert len(calls(ray, "shutdown")) == 1


def _raise(exc, at: int):
    def behaviour(i):
        if i == at:
            raise exc

    return behaviour


@pytest.mark.parametrize(
    "behaviour,expect",
    [
        (_raise(FakeRayError("actor died"), 1), "FastVLMError"),
        (_raise(KeyboardInterrupt(), 1), "KeyboardInterrupt"),
        (_raise(RuntimeError("driver bug"), 0), "RuntimeError"),
    ],
)
def test_the_local_cluster_is_shut_down_when_the_job_fails(monkeypatch, behaviour, expect):
    ray = fake_ray(behaviour)
    monkeypatch.setitem(sys.modules, "ray", ray)
    with pytest.raises(BaseException) as e:
        list(run_ray(items(3), OPTIONS, 1, None))
    assert type(e.value).__name__ == expect
    assert len(calls(ray, "shutdown")) == 1


def test_sigterm_shuts_the_cluster_down_and_restores_the_handler(monkeypatch):
    before = signal.getsignal(signal.SIGTERM)
    ray = fake_ray(lambda i: i == 1 and os.kill(os.getpid(), signal.SIGTERM))
    monkeypatch.setitem(sys.modules, "ray", ray)
    with pytest.raises(KeyboardInterrupt, match="signal"):
        list(run_ray(items(3), OPTIONS, 1, None))
    assert len(calls(ray, "shutdown")) == 1
    assert signal.getsignal(signal.SIGTERM) == before


def test_a_consumer_that_stops_early_still_shuts_down(monkeypatch):
    ray = fake_ray()
    monkeypatch.setitem(sys.modules, "ray", ray)
    gen = run_ray(items(5), OPTIONS, 1, None)
    next(gen)
    assert not calls(ray, "shutdown")
    gen.close()
    assert len(calls(ray, "shutdown")) == 1


def test_a_cluster_this_driver_did_not_start_is_left_running(monkeypatch):
    ray = fake_ray(initialized=True)
    monkeypatch.setitem(sys.modules, "ray", ray)
    assert len(list(run_ray(items(2), OPTIONS, 1, None))) == 2
    assert not calls(ray, "init") and not calls(ray, "shutdown")


def test_cli_batch_ray_quiet_and_ctrl_c(monkeypatch, tmp_path, capsys):
    make_images(tmp_path / "imgs", 3)
    ray = fake_ray()
    monkeypatch.setitem(sys.modules, "ray", ray)
    out = tmp_path / "o.jsonl"
    assert batch.main([str(tmp_path / "imgs"), str(out), "--ray", "-q"]) == 0
    assert calls(ray, "init")[0]["logging_level"] == logging.ERROR
    assert len(rows(out)) == 3 and len(calls(ray, "shutdown")) == 1
    ray2 = fake_ray(_raise(KeyboardInterrupt(), 0))
    monkeypatch.setitem(sys.modules, "ray", ray2)
    rc = batch.main([str(tmp_path / "imgs"), str(tmp_path / "o2.jsonl"), "--ray", "-q"])
    assert rc == 130 and len(calls(ray2, "shutdown")) == 1
    assert "rerun the same command" in capsys.readouterr().err


def test_run_ray_is_importable_without_ray(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails, as without the extra
    with pytest.raises(Exception, match="pip install 'fastvlm\\[batch\\]'"):
        list(run_ray(items(1), OPTIONS, 1, None))
    assert Path(batch.__file__).exists()


# ---------------------------------------------------------------------- SIGKILL: the watchdog
DRIVER = """
import subprocess, sys, time
sys.path.insert(0, sys.argv[1])
old = subprocess.Popen(["sleep", "60"])  # started before the watchdog: not its business
from fastvlm import reaper
w = reaper.start()
time.sleep(0.3)
child = subprocess.Popen(["sleep", "60"], start_new_session=True)  # like Ray's gcs_server
shell = subprocess.Popen(["sh", "-c", "sleep 60 & echo $!; wait"], stdout=subprocess.PIPE)
grandchild = int(shell.stdout.readline())  # reparented to init once `sh` dies, like Ray agents
print(old.pid, child.pid, shell.pid, grandchild, w.pid, flush=True)
if sys.argv[2] == "clean":
    reaper.stop(w)
    print("stopped", flush=True)
time.sleep(60)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the watchdog reads /proc")
@pytest.mark.parametrize("how", ["sigkill", "clean"])
def test_the_watchdog_ends_what_a_dead_driver_started(tmp_path, how):
    import subprocess
    import time

    root = str(Path(__file__).parent.parent)
    drv = subprocess.Popen(
        [sys.executable, "-c", DRIVER, root, how], stdout=subprocess.PIPE, text=True
    )
    old = None
    try:
        old, child, shell, grandchild, watchdog = map(int, drv.stdout.readline().split())
        if how == "clean":
            assert drv.stdout.readline().strip() == "stopped"
        else:
            time.sleep(1.2)  # a couple of watchdog polls see the whole tree
            drv.kill()  # SIGKILL: no cleanup code runs in the driver
            drv.wait()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(map(_alive, (child, shell, grandchild))):
            time.sleep(0.2)
        assert not any(map(_alive, (child, shell, grandchild)))
        assert _alive(old)  # existed before the watchdog started: left alone
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and _alive(watchdog):
            time.sleep(0.2)
        assert not _alive(watchdog)
    finally:
        drv.kill()
        drv.wait()
        if old is not None and _alive(old):
            os.kill(old, signal.SIGKILL)
