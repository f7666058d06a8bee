"""One writer per run folder (an OS lock held by the run's process) and run ids that cannot collide."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from helpers import start_holder

from subjectops.config import load_params
from subjectops.errors import SubjectopsError
from subjectops.pipeline import default_run_dir, run
from subjectops.runlock import LOCK_FILE, run_lock


def test_a_second_run_into_a_locked_folder_is_refused_at_once_and_the_first_is_unharmed(tmp_path, example_subject):
    run_dir = tmp_path / "run"
    first = start_holder(run_dir)
    started = time.monotonic()
    second = subprocess.run([sys.executable, "-m", "subjectops.cli", "run", str(example_subject), "--class", "teapot",
                             "--model", "tiny-sd15", "--out", str(run_dir), "--no-track"],
                            capture_output=True, text=True, timeout=120)
    seconds = time.monotonic() - started
    print(f"second run refused after {seconds:.1f} s (interpreter start and input checks included)")
    assert second.returncode == 2
    said = " ".join((second.stdout + second.stderr).split())
    assert f"is in use by another run (pid {first.pid}" in said and "started 20" in said
    assert sorted(p.name for p in run_dir.iterdir()) == [LOCK_FILE]  # the second wrote no stage
    first.communicate("go on\n", timeout=60)
    assert first.returncode == 0
    assert (run_dir / "result.txt").read_text() == "first run's result"


def test_the_lock_dies_with_its_process(tmp_path):
    run_dir = tmp_path / "run"
    holder = start_holder(run_dir)
    with pytest.raises(SubjectopsError, match=f"pid {holder.pid}"):
        with run_lock(run_dir):
            pass
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with run_lock(run_dir) as path:  # no stale lock after a kill
        assert json.loads(path.read_text())["pid"] == os.getpid()


def test_run_holds_the_lock_while_its_stages_run(tmp_path, example_subject, tiny_params):
    run_dir = tmp_path / "run"
    with run_lock(run_dir):
        with pytest.raises(SubjectopsError, match="is in use by another run"):
            run(tiny_params, example_subject, "teapot", run_dir)
    assert not (run_dir / "refine").exists()


def test_default_run_ids_started_in_the_same_second_differ(example_subject):
    params = load_params("params.yaml", ["model.base=tiny-sd15"])
    stamp = time.strftime("%Y%m%d-%H%M")
    ids = {default_run_dir(example_subject, params).name for _ in range(2000)}
    assert len(ids) == 2000
    assert all(i.startswith(stamp) or i.startswith(time.strftime("%Y%m%d")) for i in ids)
    assert all(i.endswith("-teapot-dreambooth") for i in ids)
