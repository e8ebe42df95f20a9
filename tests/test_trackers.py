"""train.report_to: one MLflow run per cell, for real, in MLflow's local file store, and one
wandb run in offline mode; no network."""

import copy
import re

import pandas as pd
import pytest
import yaml
from test_train import QLORA_CELL, train_qlora_cell

import trackers
from conftest import TINY_CONFIG, snakemake

CELL = "_".join(f"{k}~{v}" for k, v in QLORA_CELL.items())  # a real cell of the tiny grid


def test_trainer_gets_the_external_trackers_only():
    assert trackers.trainer_report_to({}) == "none"
    assert trackers.trainer_report_to({"report_to": ["tensorboard"]}) == "none"
    assert trackers.trainer_report_to({"report_to": ["tensorboard", "mlflow"]}) == ["mlflow"]


def test_mlflow_run_per_cell_with_tags_params_and_final_numbers(pipeline_run, tiny_config, tmp_path, monkeypatch):
    import mlflow
    from mlflow.tracking import MlflowClient

    store = tmp_path / "mlruns"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file:{store}")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks for this with a file store
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("MLFLOW_EXPERIMENT_NAME", "MLFLOW_TAGS", "MLFLOW_FLATTEN_PARAMS", "WANDB_DIR", "WANDB_RUN_ID"):
        monkeypatch.delenv(name, raising=False)  # restored after the test
    for name in ("WANDB_RESUME", "WANDB_TAGS", "WANDB_PROJECT"):
        monkeypatch.delenv(name, raising=False)
    config = copy.deepcopy(tiny_config)
    config["results_dir"] = str(tmp_path / "results")  # where wandb keeps its offline runs
    config["train"].update(max_steps=2, report_to=["tensorboard", "mlflow", "wandb"])
    assert (pipeline_run / "train" / CELL).is_dir()
    tracking = trackers.identity(CELL, config)

    metrics = train_qlora_cell(pipeline_run, 64, config["train"], tmp_path / "cell", tracking=tracking)
    assert list((tmp_path / "cell" / "tb").glob("events.out.tfevents.*"))  # TensorBoard as before
    evaluation = [pipeline_run / "eval" / kind / f"{CELL}.csv" for kind in ("adapter", "merged")]
    downstream = [pipeline_run / "downstream" / kind / f"{CELL}.csv" for kind in ("adapter", "merged")]
    record = trackers.main(CELL, config, evaluation, downstream, tmp_path / "trackers.json")

    mlflow.set_tracking_uri(f"file:{store}")
    client = MlflowClient()
    experiment = client.get_experiment_by_name("qlora-snakemake")
    [run] = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == CELL and record["runs"] == {"mlflow": run.info.run_id, "wandb": tracking["run_id"]}
    assert run.data.tags["config_sha256"] == tracking["tags"]["config_sha256"]
    assert run.data.tags["git_commit"] == tracking["tags"]["git_commit"] and run.data.tags["grid.method"] == "qlora"
    assert float(run.data.params["learning_rate"]) == QLORA_CELL["learning_rate"]  # the Trainer's arguments
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2]
    assert run.data.metrics["final/final_train_loss"] == pytest.approx(metrics["final_train_loss"])
    perplexity = pd.read_csv(evaluation[0]).set_index("dataset").perplexity
    assert run.data.metrics["final/ppl_adapter_wikitext"] == pytest.approx(perplexity["wikitext"])
    assert "downstream/merged/wikitext_pipeline/word_perplexity" in run.data.metrics

    # wandb 0.31 has no reader for offline runs: their files hold the strings it logged.
    runs = sorted((tmp_path / "results" / "trackers" / "wandb").glob(f"offline-run-*-{tracking['run_id']}"))
    assert len(runs) == 2  # the training job's, then track_evaluation's resumption of the same id
    training, evaluation = (next(run.glob("run-*.wandb")).read_bytes() for run in runs)
    for expected in (
        CELL,
        f"config_sha256={tracking['tags']['config_sha256'][:16]}",
        "train/loss",
        "final/final_train_loss",
    ):
        assert expected.encode() in training, expected
    assert tracking["tags"]["config_sha256"].encode() in training  # in full in the run's config
    assert b"final/ppl_adapter_wikitext" in evaluation and b"downstream/merged/wikitext_pipeline" in evaluation


def test_rule_track_evaluation_joins_the_dag_with_an_external_tracker(tmp_path):
    config = yaml.safe_load(TINY_CONFIG.read_text())
    config["train"]["report_to"] = ["tensorboard", "mlflow"]
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    planned = snakemake("-n", config=path, results_dir=tmp_path / "results").stdout
    assert re.search(r"^track_evaluation\s+4$", planned, re.M)
