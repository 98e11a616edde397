"""The completion marker (RUN_DIR/finished.json) and the check launchers run on it."""
import json
import subprocess
import sys

import pytest

from megatron_align.training.completion import (
    CompletionError,
    is_finished,
    main,
    read_finished,
    write_finished,
)


def test_marker_round_trip_and_is_finished(tmp_path):
    assert read_finished(tmp_path) is None and not is_finished(tmp_path, 1)
    write_finished(tmp_path, 20, 20480)
    record = read_finished(tmp_path)
    assert (record["iteration"], record["tokens"]) == (20, 20480) and record["time"].endswith("Z")
    assert is_finished(tmp_path, 20) and is_finished(tmp_path, 10)
    assert not is_finished(tmp_path, 30)  # the same run dir, trained further: not finished
    assert [p.name for p in tmp_path.iterdir()] == ["finished.json"]  # no temporary left


@pytest.mark.parametrize("content", ["{not json", json.dumps({"iteration": "20"}), "[]"])
def test_unreadable_marker_is_an_error_naming_the_file(tmp_path, content):
    (tmp_path / "finished.json").write_text(content)
    with pytest.raises(CompletionError, match=str(tmp_path / "finished.json")):
        is_finished(tmp_path, 1)


def test_check_command_exit_codes(tmp_path, capsys):
    run_dir = tmp_path / "run"
    config = tmp_path / "run.yaml"
    config.write_text(f"run_dir: {run_dir}\ntrain:\n  iterations: 5\n")
    assert main([str(config)]) == 1
    assert "not finished" in capsys.readouterr().out
    write_finished(run_dir, 5, 100)
    assert main([str(config)]) == 0
    assert main([str(config), "train.iterations=6"]) == 1
    assert main([f"run_dir={run_dir}", "train.iterations=5"]) == 0  # overrides only
    capsys.readouterr()
    assert main([str(config), "train.iterations=lots"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "train.iterations" in err
    (run_dir / "finished.json").write_text("{")
    assert main([str(config)]) == 2
    assert "unreadable completion marker" in capsys.readouterr().err
    # as launchers run it: its own process, the exit code is the answer
    (run_dir / "finished.json").unlink()
    write_finished(run_dir, 5, 100)
    result = subprocess.run([sys.executable, "-m", "megatron_align.training.completion", str(config)],
                            capture_output=True, text=True)
    assert result.returncode == 0 and f"finished: {run_dir}" in result.stdout
