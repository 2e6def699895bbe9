"""A smoke run of the benchmark suite (bench/run.py) against our server only: tiny sizes, one run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ROWS = {
    "disk_dd",
    "upload_post",
    "upload_put",
    "upload_tus",
    "upload_put_nofsync",
    "upload_vs_dd",
    "download",
    "small_gets",
    "small_gets_w2",
    "concurrent_upload",
    "concurrent_rss",
    "idle_connection_rss",
    "manifest",
    "resume_rehash",
    "resume_patch",
}


def test_bench_quick_run_reports_every_row_for_our_server(tmp_path: Path) -> None:
    out = tmp_path / "out"
    command = [sys.executable, str(REPO / "bench" / "run.py"), "--quick", "--no-nginx"]
    proc = subprocess.run(
        [*command, "--out", str(out), "--tmpdir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    result = json.loads((out / "results.json").read_text())
    rows = {row["id"]: row for row in result["rows"]}
    assert set(rows) == ROWS
    for row in rows.values():
        assert len(row["ours"]) == 1 and row["ours"][0] > 0, row
        assert row["nginx"] == [] and row["ratio_ours_nginx"] is None
    assert result["machine"]["nproc"] >= 1 and result["machine"]["python"]
    table = (out / "results.md").read_text()
    assert "| what | unit | ours median (min" + "\N{EN DASH}" + "max) |" in table
    # The work directory (servers' roots, test files) is gone.
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


JOB_ROWS = {
    "jobs_upload_put",
    "jobs_upload_tus",
    "jobs_copy_pull",
    "jobs_copy_push",
    "jobs_small_files",
    "jobs_queue_submit",
    "jobs_queue_status",
}


def test_bench_jobs_quick_run_adds_its_rows_and_keeps_the_others(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text(json.dumps({"rows": [{"id": "upload_put"}, {"id": "jobs_stale"}]}))
    (out / "results.md").write_text("# Benchmark results\n\nearlier table\n\n## Transfer jobs\n\nstale\n")
    command = [sys.executable, str(REPO / "bench" / "jobs.py"), "--quick"]
    proc = subprocess.run(
        [*command, "--out", str(out), "--tmpdir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    rows = {row["id"]: row for row in json.loads((out / "results.json").read_text())["rows"]}
    assert set(rows) == JOB_ROWS | {"upload_put"}
    for name in JOB_ROWS:
        assert len(rows[name]["ours"]) == 1 and rows[name]["ours"][0] > 0, rows[name]
    assert rows["jobs_copy_pull"]["ratio_ours_nginx"] is not None
    table = (out / "results.md").read_text()
    assert table.startswith("# Benchmark results\n\nearlier table\n") and "stale" not in table
    assert table.count("## Transfer jobs") == 1
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_bench_cluster_quick_run_adds_its_rows_between_the_others(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text(json.dumps({"rows": [{"id": "upload_put"}, {"id": "cluster_stale"}]}))
    earlier = "# Benchmark results\n\nearlier table\n\n## Several nodes on PostgreSQL (bench/cluster.py)\n\nstale\n"
    (out / "results.md").write_text(earlier + "\n## Transfer jobs\n\njob table\n")
    command = [sys.executable, str(REPO / "bench" / "cluster.py"), "--quick", "--out", str(out)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    rows = {row["id"]: row for row in json.loads((out / "results.json").read_text())["rows"]}
    measured = {name for name in rows if name.startswith("cluster_")}
    assert "cluster_stale" not in rows and "upload_put" in rows
    assert {"cluster_put_ms", "cluster_db_put_ms", "cluster_manifest_rate", "cluster_nodes3_big"} <= measured
    # PostgreSQL in one column, SQLite in the other, for the one-node rows.
    assert rows["cluster_put_ms"]["ours"][0] > 0 and rows["cluster_put_ms"]["nginx"][0] > 0
    table = (out / "results.md").read_text()
    assert table.startswith("# Benchmark results\n\nearlier table\n") and "stale" not in table
    assert table.count("## Several nodes on PostgreSQL") == 1 and table.endswith("## Transfer jobs\n\njob table\n")
