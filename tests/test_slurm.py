"""The workflow through a real SLURM: a one-node cluster started on this machine
(``workflows/cluster/local_slurm.sh``: slurm-wlm 22.05 + munge, no accounting database), the cluster
profile ``workflows/profiles/slurm`` overridden only to this cluster's partition, size and no GPU, two
slides. Every job must go through sbatch and the outputs must equal a local ``--cores`` run's. Skipped,
with the reason, only where SLURM is not installed (``.ci/run`` installs it) or cannot run (not root)."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from benchmarks.synthetic import read_demo_tissue, write_pyramidal_tiff
from conftest import DEMO_SLIDE, REPO

SCRIPT = REPO / "workflows" / "cluster" / "local_slurm.sh"
PROFILE = REPO / "workflows" / "profiles" / "slurm"
TIMING = re.compile(r"(_per_s|_time_s|_s_total)$")


def test_profile_asks_for_what_the_stages_use():
    """Threads equal the CPUs asked for, GPUs asked the plugin's way, a killed job retried once, job states
    from squeue (works without accounting), failed slides kept going."""
    p = yaml.safe_load((PROFILE / "config.yaml").read_text())
    assert p["executor"] == "slurm" and p["retries"] == 1 and p["keep-going"] is True
    assert p["slurm-status-command"] == "squeue"
    for rule in ("classify", "segment"):
        assert p["set-resources"][rule]["cpus_per_task"] == p["set-threads"][rule]
        assert p["set-resources"][rule]["gpu"] == 1 and "slurm_extra" not in p["set-resources"][rule]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("the local SLURM cluster needs root (its daemons run as root)")
    state = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "GMRPATH_SLURM_DIR": str(state), "GMRPATH_SLURMCTLD_PORT": "6917", "GMRPATH_SLURMD_PORT": "6918"}
    if not all(shutil.which(c) for c in ("slurmctld", "slurmd", "sbatch", "munged")):
        pytest.skip(f"SLURM is not installed here ({SCRIPT} install, as root, installs it; .ci/run does)")
    started = subprocess.run([str(SCRIPT), "start"], env=env, capture_output=True, text=True, timeout=120)
    assert started.returncode == 0, started.stderr + started.stdout
    env["SLURM_CONF"] = str(state / "slurm.conf")
    yield env
    subprocess.run([str(SCRIPT), "stop"], env=env, capture_output=True, timeout=60)


def _slides(root: Path) -> Path:
    slides = root / "slides"
    slides.mkdir()
    shutil.copy(DEMO_SLIDE, slides / "demo.svs")
    tissue = read_demo_tissue(DEMO_SLIDE)  # a second, smaller slide: the demo's tissue re-tiled as a pyramidal TIFF
    write_pyramidal_tiff(slides / "second.tif", tissue[600:1624, 300:1324], mpp=0.499, levels=2)
    return slides


def _config(root: Path, slides: Path, out: str) -> Path:
    path = root / f"{out}.yaml"
    path.write_text(yaml.safe_dump({
        "slides": str(slides), "out": str(root / out),
        "classify": {"preset": "nct_crc", "model_kwargs": {"base_channels": 4, "kernel_sizes": [5, 5, 3, 3]}},
        "run": {"num_workers": 0}}))
    return path


def _comparable(path: Path, out: Path):
    """A file's content with what may differ between two identical runs taken out: the output folder's
    own path, and timings (run_time_s, tiles_per_s, ...)."""
    if path.suffix == ".json":  # summaries and the OME-Zarr metadata (which records the run's rates too)
        def strip(v):
            if isinstance(v, dict):
                return {k: strip(x) for k, x in v.items() if not TIMING.search(k)}
            if isinstance(v, list):
                return [strip(x) for x in v]
            return v.replace(str(out), "OUT") if isinstance(v, str) else v
        return strip(json.loads(path.read_text()))
    if path.suffix == ".csv":
        rows = list(csv.DictReader(path.read_text().replace(str(out), "OUT").splitlines()))
        return [{k: v for k, v in r.items() if not TIMING.search(k)} for r in rows]
    return path.read_bytes()


@pytest.mark.timeout(1500)  # two full workflow runs, each given 1200 s below; alone here it took about 480 s, in the suite over 600
def test_workflow_runs_through_slurm_and_matches_a_local_run(cluster, tmp_path):
    slides = _slides(tmp_path)
    overrides = ["--default-resources", "slurm_partition=local", "mem_mb=2000", "runtime=30",
                 "--set-resources", "classify:slurm_partition=local", "segment:slurm_partition=local", "classify:gpu=0",
                 "segment:gpu=0", "classify:cpus_per_task=1", "segment:cpus_per_task=1",
                 "--set-threads", "classify=1", "segment=1",
                 "--slurm-no-account", "--slurm-init-seconds-before-status-checks", "5", "--latency-wait", "5"]
    smk = [sys.executable, "-m", "snakemake", "--directory", str(REPO), "--snakefile", str(REPO / "Snakefile")]
    proc = subprocess.run(smk + ["--profile", str(PROFILE), "--configfile", str(_config(tmp_path, slides, "out_slurm"))] + overrides,
                          cwd=REPO, env=cluster, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # every job went through sbatch: 2 slides x (tissue, classify, segment, viewer tiles) + the cohort, each a SLURM job id
    submitted = re.findall(r"Job (\d+) has been submitted with SLURM jobid (\d+) \(log: (\S+)\)", proc.stderr)
    assert len(submitted) == 9, proc.stderr[-3000:]
    ids = {int(j) for _, j, _ in submitted}
    assert len(ids) == 9
    known = subprocess.run(["squeue", "-h", "-t", "all", "-o", "%i %T"], env=cluster, capture_output=True, text=True).stdout
    states = dict(line.split() for line in known.splitlines())
    assert all(states.get(str(i)) == "COMPLETED" for i in ids), known
    rules = sorted(Path(log).parent.name if "cohort" not in log else "cohort" for _, _, log in submitted)
    assert rules.count("demo") == rules.count("second") == 4 and "cohort" in rules
    # the same outputs as a local run
    local = subprocess.run(smk + ["--cores", "2", "--configfile", str(_config(tmp_path, slides, "out_local"))],
                           cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert local.returncode == 0, local.stderr[-3000:]
    a, b = tmp_path / "out_slurm", tmp_path / "out_local"
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file() and "logs" not in p.parts and ".gmrpath" not in p.parts)
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file() and "logs" not in p.parts and ".gmrpath" not in p.parts)
    assert any(f.suffix == ".geojson" for f in files) and any("nuclei.ome.zarr" in str(f) for f in files)
    for f in files:
        assert _comparable(a / f, a) == _comparable(b / f, b), f
