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
