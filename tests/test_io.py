"""Crash-safe writing: a killed writer's temporary files are cleared by the next write of the same output."""

import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq

from moelang.io import atomic_dir, clear_leftovers, write_table


def test_a_killed_writers_temp_file_is_removed_by_the_next_write(tmp_path):
    target = tmp_path / "es.parquet"
    # A writer killed by SIGKILL never reaches its `finally`: leave exactly what it leaves.
    script = ("import os, signal, pyarrow as pa; from moelang.io import write_table; "
              "import moelang.io as io, pyarrow.parquet as pq; "
              "orig = pq.write_table; "
              "pq.write_table = lambda t, p, **k: (open(p, 'wb').write(b'PAR1'), os.kill(os.getpid(), signal.SIGKILL)); "
              f"write_table(pa.table({{'a': [1]}}), {str(target)!r})")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert proc.returncode == -9
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".es.parquet.tmp-")]
    assert len(leftovers) == 1 and leftovers[0].stat().st_size == 4
    assert not target.exists()

    write_table(pa.table({"a": [1, 2]}), target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["es.parquet"]
    assert pq.read_table(target).column("a").to_pylist() == [1, 2]


def test_leftover_directories_of_a_directory_output_are_removed(tmp_path):
    out = tmp_path / "step-4"
    (tmp_path / ".step-4.tmp-424242").mkdir()
    (tmp_path / ".step-4.tmp-424242" / "model.safetensors").write_bytes(b"x")
    (tmp_path / ".step-4.old-424243").mkdir()
    (tmp_path / ".step-40.tmp-424242").mkdir()  # another output's: not ours to touch
    with atomic_dir(out) as tmp:
        (tmp / "config.json").write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".step-40.tmp-424242", "step-4"]


def test_clear_leftovers_keeps_this_processes_own_temp_and_other_names(tmp_path):
    own = tmp_path / f".x.json.tmp-{os.getpid()}"
    own.write_text("writing")
    other = tmp_path / ".x.json.tmp-1"
    other.write_text("dead")
    unrelated = tmp_path / ".y.json.tmp-1"
    unrelated.write_text("dead")
    removed = clear_leftovers(tmp_path / "x.json")
    assert removed == [other]
    assert own.exists() and unrelated.exists() and not other.exists()


def test_progress_off_a_terminal_logs_a_line_every_tenth(caplog, monkeypatch):
    import logging

    from moelang.io import LogProgress, progress

    monkeypatch.setattr(LogProgress, "MIN_GAP_S", 0.0)  # a fast loop: no minimum time between lines
    caplog.set_level(logging.INFO, logger="moelang")
    bar = progress(total=1000, desc="train", unit=" steps")  # pytest's stderr is not a terminal
    assert isinstance(bar, LogProgress)
    for _ in range(1000):
        bar.update(1)
    bar.close()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("train:")]
    assert [line.split("(")[1].split(")")[0] for line in lines[:-1]] == [f"{p}%" for p in range(10, 100, 10)]
    assert lines[-1].startswith("train: 1000 steps done in")

    caplog.clear()
    assert list(progress(range(7), desc="docs")) == list(range(7))  # an iterable with a length
    assert [r.getMessage() for r in caplog.records][-1].startswith("docs: 7 it done")


def test_progress_lines_are_spaced_and_can_be_silenced(caplog, monkeypatch):
    import logging

    from moelang.io import LogProgress, progress

    caplog.set_level(logging.INFO, logger="moelang")
    clock = iter(range(0, 10_000, 1))  # one second per reading of the clock
    monkeypatch.setattr(LogProgress, "MIN_GAP_S", 25.0)
    bar = LogProgress(total=100, desc="spaced", clock=lambda: next(clock))
    for _ in range(100):
        bar.update(1)
    bar.close()
    lines = [r.getMessage() for r in caplog.records]
    # 10% steps come every 10 s here; a line needs 25 s since the last one
    assert [line.split("(")[1].split(")")[0] for line in lines[:-1]] == ["30%", "60%", "90%"]
    assert lines[-1].startswith("spaced: 100 it done in")

    caplog.clear()
    for _ in progress(range(50), desc="short"):  # shorter than MIN_GAP_S: not worth a line
        pass
    for _ in progress(range(50), desc="quiet", disable=True):
        pass
    bar = progress(total=10, desc="own lines", log_lines=False)
    bar.update(10)
    bar.close()
    assert not caplog.records


def test_a_corrupt_parquet_input_is_one_line_naming_it(tmp_path):
    from moelang import config as cfg

    config = cfg.validate({"languages": {"high_resource": ["en", "es"], "targets": {"ca": "es"}},
                           "allocation": {"new_experts": 4}})
    corpus = tmp_path / "en.parquet"
    corpus.write_bytes(b"PAR1 this was cut off")
    proc = subprocess.run([sys.executable, "-m", "moelang", "tokenizer", "--options",
                           cfg.to_json(cfg.tokenizer_options(config)), "--corpus", str(corpus),
                           "--out", str(tmp_path / "tok")], capture_output=True, text=True)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"moelang: error: '{corpus}' is not a readable Parquet file")
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "tok").exists()


def test_library_progress_bars_are_off_in_a_log(monkeypatch):
    from moelang.io import setup_logging

    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    setup_logging()  # pytest's stderr is not a terminal
    assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
