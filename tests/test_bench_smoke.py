"""A smoke run of the benchmark suite (bench/run.py) against our server only: tiny sizes, one run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ROWS = {
    "disk_dd",
    "hashlib_md5",
    "upload_put",
    "upload_put_cpu",
    "upload_put_sha256",
    "upload_put_sha256_cpu",
    "upload_put_sha256_after_cpu",
    "upload_tus1_sha256",
    "upload_tus1_sha256_cpu",
    "upload_tus8_sha256",
    "upload_tus8_sha256_cpu",
    "upload_post_md5",
    "upload_post_md5_cpu",
    "upload_post_md5_vs_md5",
    "upload_put_sha256_nofsync",
    "upload_put_sha256_vs_dd",
    "download",
    "small_gets",
    "small_gets_w2",
    "small_gets_w2_info",
    "concurrent_upload",
    "concurrent_upload_cpu",
    "concurrent_rss",
    "tls_upload_put_sha256",
    "tls_upload_put_sha256_cpu",
    "tls_download",
    "idle_connection_rss",
    "manifest",
    "resume_rehash",
    "resume_patch",
}


#: What bench/jobs.py and bench/cluster.py merged into results.md after run.py's head; run.py keeps it.
OTHER_SECTIONS = (
    "## Transfer jobs\n\n| jobs table |\n\nNotes:\n\n- a job note\n\n\n"
    "## Several nodes on PostgreSQL (bench/cluster.py)\n\n| cluster table |\n"
)
OTHER_ROWS = [{"id": "jobs_copy_pull", "ours": [271.0]}, {"id": "cluster_put_ms", "ours": [8.7], "nginx": [2.9]}]


def test_bench_quick_run_reports_every_row_for_our_server_and_keeps_the_other_sections(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    earlier = {
        "machine": {"date": "stale"},
        "plan": {},
        "our_env": {},
        "rows": [{"id": "upload_put", "ours": [1.0]}, {"id": "retired_row"}, *OTHER_ROWS],
        "jobs": {"machine": {"date": "jobs day"}},
        "cluster": {"plan": {"runs": 3}},
    }
    (out / "results.json").write_text(json.dumps(earlier))
    (out / "results.md").write_text("# Benchmark results\n\nstale head table\n\n" + OTHER_SECTIONS)
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
    # run.py's keys first, then the others' as they were; its rows replace its earlier ones (first), theirs stay.
    assert list(result) == ["machine", "plan", "our_env", "rows", "jobs", "cluster"]
    assert (result["jobs"], result["cluster"]) == (earlier["jobs"], earlier["cluster"])
    assert result["rows"][-2:] == OTHER_ROWS
    rows = {row["id"]: row for row in result["rows"][:-2]}
    assert set(rows) == ROWS and len(result["rows"]) == len(ROWS) + 2
    for row in rows.values():
        # CPU time comes in clock ticks (10 ms): a 4 MiB upload may cost less than one.
        [value] = row["ours"]
        assert value > 0 or (row["unit"] == "CPU-s/GiB" and value == 0), row
        assert row["nginx"] == [] and row["ratio_ours_nginx"] is None
    assert result["machine"]["nproc"] >= 1 and result["machine"]["python"]
    table = (out / "results.md").read_text()
    head, sep, others = table.partition("\n## ")
    assert sep + others == "\n" + OTHER_SECTIONS  # byte for byte
    assert head.startswith("# Benchmark results\n") and table.count("# Benchmark results") == 1
    assert "stale" not in head and head.count("| what | unit | ours median (min" + "\N{EN DASH}" + "max) |") == 1
    assert head == proc.stdout[proc.stdout.index("# Benchmark results") :].rstrip("\n") + "\n"
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
