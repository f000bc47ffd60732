"""fedseg bench memory at a tiny size: the site is written, every worker runs
in its own process, the table comes out, and nothing is left on disk."""

import pytest

from server.cli import main


@pytest.mark.slow
def test_bench_memory_at_a_tiny_size(tmp_path, capsys):
    work = tmp_path / "bench"
    assert main(["bench", "memory", "--size-gib", "0.004", "--shape", "64,64,64",
                 "--steps", "2", "--fit-cases", "2", "--repeat", "1", "--threads", "1",
                 "--work", str(work)]) == 0
    out = capsys.readouterr().out
    assert "| big | disk | 5 |" in out and "| fits | memory | 2 |" in out
    assert "x the steps a second" in out and "command: fedseg bench memory" in out
    table = (work / "memory.md").read_text()
    assert table.startswith("| site |") and table.count("\n| ") == 3  # three rows
    assert sorted(p.name for p in work.iterdir()) == ["memory.json", "memory.md"]
