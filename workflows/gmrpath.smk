"""Rules of the GMR-Path workflow. The config is validated (pipeline.config) before any job runs,
written resolved to OUT/.gmrpath/config.yaml, and every rule calls the `gmrpath` CLI with it,
so the workflow and the command line always run the same configuration."""

import sys
from pathlib import Path

import yaml

from pipeline.config import ConfigError, config_from_dict, config_to_dict, scan_slides
from pipeline.report import clear_failure, collect_failures, record_failure, write_cohort

configfile: "configs/default.yaml"

try:
    CFG = config_from_dict(dict(config), "Snakemake config (configs/default.yaml + --config/--configfile)", base=Path.cwd())
    SLIDES, SKIPPED = scan_slides(CFG.slides)
except ConfigError as err:
    raise WorkflowError(f"invalid configuration: {err}")

OUT = Path(CFG.out)
for _fail in collect_failures(OUT):  # entries skipped last time and since fixed or removed
    if _fail["stage"] == "find":
        clear_failure(OUT, _fail["path"], "find")
for _path, _why in SKIPPED:  # reported and skipped, not a MissingInputException that stops every slide
    print(f"gmrpath: skipping {_path}: {_why}", file=sys.stderr)
    record_failure(OUT, _path, "find", _why)
if not SLIDES:
    raise WorkflowError(f"{CFG.slides}: no readable slides found")
RESOLVED = OUT / ".gmrpath" / "config.yaml"
RESOLVED.parent.mkdir(parents=True, exist_ok=True)
_text = yaml.safe_dump(config_to_dict(CFG), sort_keys=False)
if not RESOLVED.is_file() or RESOLVED.read_text() != _text:  # rewrite only on change: its mtime drives reruns
    _tmp = RESOLVED.with_name(".config.yaml.tmp")
    _tmp.write_text(_text)
    _tmp.replace(RESOLVED)
GMRPATH = f"{sys.executable} -m gmrpath"  # the interpreter running snakemake, so its environment
try:  # classify and segment of one slide run side by side, each on half the local cores
    STAGE_THREADS = max(1, workflow.cores // 2)
except WorkflowError:  # a cluster executor without --cores: its profile's set-threads decides
    STAGE_THREADS = 2


def slide_path(wildcards):
    return str(SLIDES[wildcards.slide])


def cohort_inputs(wildcards):
    files = []
    for sid in SLIDES:
        if CFG.classify is not None:
            files.append(OUT / sid / f"{sid}.summary.json")
        if CFG.segment is not None:
            files.append(OUT / sid / f"{sid}.nuclei.summary.json")
        if CFG.run.viewer:  # the cohort step writes each viewer's page, and the report links it
            files.append(OUT / sid / "viewer" / "slide.json")
    return files


wildcard_constraints:
    slide="[^/]+",


rule tissue:
    input:
        slide=slide_path,
        config=RESOLVED,
    output:
        OUT / "{slide}" / "{slide}.tissue.png",
    log:
        OUT / "logs" / "{slide}.tissue.log",
    shell:
        "{GMRPATH} tissue {input.slide:q} --out {OUT:q} --config {input.config:q} > {log:q} 2>&1"


rule classify:
    input:
        slide=slide_path,
        tissue=OUT / "{slide}" / "{slide}.tissue.png",
        config=RESOLVED,
    output:
        summary=OUT / "{slide}" / "{slide}.summary.json",
        geojson=OUT / "{slide}" / "{slide}.tiles.geojson",
        overlay=OUT / "{slide}" / "{slide}.overlay.png",
    log:
        OUT / "logs" / "{slide}.classify.log",
    threads: STAGE_THREADS
    resources:
        gpu=1 if CFG.run.device.startswith("cuda") else 0,
    shell:
        "OMP_NUM_THREADS={threads} {GMRPATH} predict {input.slide:q} --out {OUT:q} --config {input.config:q} --no-viewer > {log:q} 2>&1"


rule segment:
    input:
        slide=slide_path,
        tissue=OUT / "{slide}" / "{slide}.tissue.png",
        config=RESOLVED,
    output:
        summary=OUT / "{slide}" / "{slide}.nuclei.summary.json",
        geojson=OUT / "{slide}" / "{slide}.nuclei.geojson",
    log:
        OUT / "logs" / "{slide}.segment.log",
    threads: STAGE_THREADS
    resources:
        gpu=1 if CFG.run.device.startswith("cuda") else 0,
    shell:
        "OMP_NUM_THREADS={threads} {GMRPATH} segment {input.slide:q} --out {OUT:q} --config {input.config:q} --no-viewer > {log:q} 2>&1"


rule viewer_tiles:
    # the slide's Deep Zoom tiles, while classify/segment run; the page is written by the cohort step
    input:
        slide=slide_path,
        tissue=OUT / "{slide}" / "{slide}.tissue.png",
        config=RESOLVED,
    output:
        OUT / "{slide}" / "viewer" / "slide.json",
    log:
        OUT / "logs" / "{slide}.viewer.log",
    shell:
        "{GMRPATH} viewer {input.slide:q} --out {OUT:q} --config {input.config:q} --tiles-only > {log:q} 2>&1"


# The OME-Zarr stores are written (atomically, resumably) by the commands and are not declared as
# directory() outputs, which would make Snakemake put a .snakemake_timestamp file inside them.


onerror:
    # some slides failed (their one-line errors are recorded): still write the table and report
    try:
        write_cohort(OUT)
        print(f"gmrpath: wrote {OUT / 'report.html'} listing the failed slides", file=sys.stderr)
    except (ValueError, OSError) as err:
        print(f"gmrpath: no cohort report: {err}", file=sys.stderr)


rule cohort:
    input:
        cohort_inputs,
    output:
        csv=OUT / "cohort.csv",
        html=OUT / "report.html",
        viewers=[OUT / sid / "viewer" / "index.html" for sid in SLIDES] if CFG.run.viewer else [],
    shell:
        "{GMRPATH} cohort {OUT:q}"


rule train:
    """`snakemake --cores all results/train/nuclei_gmr/summary.json` trains configs/train_nuclei_gmr.yaml
    (its `out` must be results/train/<name>); a killed run continues from its last.pt."""
    input:
        config="configs/train_{name}.yaml",
    output:
        summary="results/train/{name}/summary.json",
    log:
        "results/train/{name}.snakemake.log",
    threads: 2
    resources:
        gpu=1 if CFG.run.device.startswith("cuda") else 0,
    shell:
        "{GMRPATH} train {input.config:q} --threads {threads} $([ -f results/train/{wildcards.name}/last.pt ] && echo --resume) > {log:q} 2>&1"
