# Tables, figures and the report. Figures and report read only results/tables/, so
# deleting them and rerunning rebuilds them without a model or a GPU
# (`make report-from-tables`; `make audit` names the tables they came from).


rule tables:
    input:
        metrics=expand(f"{RESULTS}/train/{{cell}}/metrics.json", cell=GRID.instance_patterns),
        checks=expand(f"{RESULTS}/merged/{{cell}}/merge_check.json", cell=GRID.instance_patterns),
        perplexity=f"{RESULTS}/tables/perplexity.csv",
        perplexity_examples=f"{RESULTS}/tables/perplexity_examples.csv.gz",
        samples=sample_files(),
    output:
        runs=report(f"{RESULTS}/tables/runs.csv", category="Tables", caption="../report/runs.rst"),
        pairs=f"{RESULTS}/tables/pairs.csv",
        gaps=f"{RESULTS}/tables/gaps.csv",
        quantisation=f"{RESULTS}/tables/quantisation.csv",
        loss_curves=f"{RESULTS}/tables/loss_curves.csv",
        samples=f"{RESULTS}/tables/samples.csv",
        environment=f"{RESULTS}/tables/environment.json",
        provenance=f"{RESULTS}/tables/tables.provenance.json",
    log:
        f"{RESULTS}/logs/tables.log",
    conda:
        ENV
    resources:
        mem_mb=per_attempt(LIGHT_MEM_MB),
        runtime=per_attempt(LIGHT_RUNTIME_MIN),
    script:
        "../scripts/tables.py"


rule figure:
    input:
        runs=f"{RESULTS}/tables/runs.csv",
        loss_curves=f"{RESULTS}/tables/loss_curves.csv",
        perplexity=f"{RESULTS}/tables/perplexity.csv",
    output:
        png=report(
            f"{RESULTS}/figures/{{figure}}.png",
            category="Figures",
            labels={"figure": "{figure}"},
            caption="../report/figure.rst",
        ),
        svg=f"{RESULTS}/figures/{{figure}}.svg",
        provenance=f"{RESULTS}/figures/{{figure}}.provenance.json",
    log:
        f"{RESULTS}/logs/figures/{{figure}}.log",
    conda:
        ENV
    resources:
        mem_mb=per_attempt(LIGHT_MEM_MB),
        runtime=per_attempt(LIGHT_RUNTIME_MIN),
    script:
        "../scripts/figures.py"


rule report:
    input:
        runs=f"{RESULTS}/tables/runs.csv",
        pairs=f"{RESULTS}/tables/pairs.csv",
        gaps=f"{RESULTS}/tables/gaps.csv",
        quantisation=f"{RESULTS}/tables/quantisation.csv",
        perplexity=f"{RESULTS}/tables/perplexity.csv",
        samples=f"{RESULTS}/tables/samples.csv",
        environment=f"{RESULTS}/tables/environment.json",
        figures=expand(f"{RESULTS}/figures/{{figure}}.png", figure=FIGURES),
        downstream=downstream_report_inputs(),
    output:
        html=report(f"{RESULTS}/report/report.html", category="Report", caption="../report/report.rst"),
        provenance=f"{RESULTS}/report/report.provenance.json",
    log:
        f"{RESULTS}/logs/report.log",
    conda:
        ENV
    resources:
        mem_mb=per_attempt(LIGHT_MEM_MB),
        runtime=per_attempt(LIGHT_RUNTIME_MIN),
    params:
        config=config,
    script:
        "../scripts/report.py"
