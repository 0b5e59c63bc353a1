"""Two processes on one output folder (issue 31): before, both reported success and one result was gone (two train
runs interleaved their checkpoints; two generate runs left one prompt's images). The second is now refused in one
line naming the first one's pid; a holder that dies releases the folder."""

import os
import signal
import subprocess
import sys

import pytest

from tuneqdm.cli import main
from tuneqdm.train import TrainConfig, train
from tuneqdm import TuneQDMError
from tuneqdm.files import lock_file


@pytest.fixture
def holder(tmp_path):
    """Another process holding a folder's lock, as a running tuneqdm command does."""
    procs = []

    def hold(folder):  # what output_lock does, without importing torch
        path = lock_file(folder)
        path.parent.mkdir(parents=True, exist_ok=True)
        code = ("import fcntl, os, time\n"
                f"fd = os.open({str(path)!r}, os.O_RDWR | os.O_CREAT, 0o600); fcntl.flock(fd, fcntl.LOCK_EX)\n"
                "os.ftruncate(fd, 0); os.write(fd, str(os.getpid()).encode()); print('held', flush=True)\n"
                "time.sleep(120)")
        p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        assert p.stdout.readline().strip() == "held"
        procs.append(p)
        return p

    yield hold
    for p in procs:
        p.kill()
        p.wait()


def test_a_second_generate_into_the_same_folder_is_refused(holder, tmp_path, capsys):
    out = tmp_path / "images"
    other = holder(out)
    assert main(["generate", "--prompt", "a box", "--out", str(out)]) == 2
    assert capsys.readouterr().err == (f"tuneqdm: error: --out {out} is being written by another tuneqdm process "
                                       f"(pid {other.pid}): wait for it to finish, or choose another folder\n")
    assert not out.exists()


def test_the_run_functions_hold_their_folder_for_python_callers_too(holder, tmp_path):
    """The lock lives in each command's run function (files.writes_to), not in the CLI: ``run_generate`` called from
    Python is refused the same way, and releases the folder when it returns."""
    from tuneqdm.commands.toy import ToySubjectConfig, run_toy_subject

    out = tmp_path / "subject"
    other = holder(out)
    with pytest.raises(TuneQDMError, match=rf"^--out {out} is being written by another tuneqdm process "
                                           rf"\(pid {other.pid}\): wait for it to finish, or choose another folder$"):
        run_toy_subject(ToySubjectConfig(seed=3, out=str(out)))
    assert not out.exists()
    other.kill()
    other.wait()
    run_toy_subject(ToySubjectConfig(seed=3, out=str(out)))
    run_toy_subject(ToySubjectConfig(seed=3, out=str(out), force=True))  # released when the first call returned


def test_a_second_train_into_the_same_output_dir_is_refused(holder, photos, tmp_path):
    out = tmp_path / "run"
    other = holder(out)
    with pytest.raises(TuneQDMError, match=rf"^--output_dir {out} is being written by another tuneqdm process "
                                           rf"\(pid {other.pid}\): wait for it to finish, or choose another folder$"):
        train(TrainConfig(instance_data_dir=str(photos), output_dir=str(out), max_train_steps=1, quiet=True))
    assert not out.exists()


def test_a_holder_that_dies_releases_the_folder(holder, tmp_path, capsys):
    out = tmp_path / "subject"
    other = holder(out)
    assert main(["toy", "subject", "--seed", "3", "--out", str(out)]) == 2
    assert f"(pid {other.pid})" in capsys.readouterr().err
    os.kill(other.pid, signal.SIGKILL)
    other.wait()
    assert main(["toy", "subject", "--seed", "3", "--out", str(out)]) == 0
    assert main(["toy", "subject", "--seed", "3", "--out", str(out), "--force"]) == 0  # released after each command
