# GMR-Path workflow: `snakemake --cores all` runs the default config (configs/default.yaml) on the
# bundled demo slide; `snakemake --cores all --config slides=/data/wsi out=/data/gmrpath` on a folder.
# One rule per stage (tissue -> classify / segment -> cohort), so only what changed is redone;
# killed jobs resume from the chunks already written (see pipeline/predict.py).
include: "workflows/gmrpath.smk"


rule all:
    default_target: True
    input:
        OUT / "cohort.csv",
        OUT / "report.html",
        # every slide's results too: after a failed run (whose report lists the failures), the
        # next run retries the failed slides and then rewrites the report
        cohort_inputs,
