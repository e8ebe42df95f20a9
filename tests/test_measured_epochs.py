"""The measured H200 epochs in bench/results/: every row each file must hold is there, and the
memory model, replayed over the same batches, is within 10 % of each measured peak."""

import json
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parent.parent


EPOCH_ROWS = {
    ("tutorial", "seed_epoch_b1"),
    ("pipeline", "seed_epoch_b1"),
    ("tutorial", "epoch_b4"),
    ("pipeline", "epoch_b4"),
}
RESULTS = {  # each file's rows that must be there
    "epochs_h200_outside.json": {
        ("tutorial", "epoch_b4"),
        ("batch4", "epoch_b4"),
        ("batch4_budget10", "epoch_b4"),
        ("batch4_pad32", "epoch_b4"),
    },
    "epochs_h200_outside_2.json": {
        ("tutorial", "epoch_b4"),
        ("batch4", "epoch_b4"),
        ("batch4_headroom1035", "epoch_b4"),
    },
    "epochs_h200_final_save.json": {("batch4", "epoch_b4")},
    "epochs_h200_pad_up.json": {
        ("tutorial", "epoch_b4"),
        ("batch4", "epoch_b4"),
        ("batch4_pad_up", "epoch_b4"),
        ("batch4_pad32_up", "epoch_b4"),
    },
    "epochs_h200_loop_ahead.json": {
        ("tutorial", "epoch_b4"),
        ("batch4", "epoch_b4"),
        ("batch4_ahead1", "epoch_b4"),
        ("batch4_ahead2", "epoch_b4"),
        ("batch4_blocking", "epoch_b4"),
        ("batch4_ahead1_blocking", "epoch_b4"),
    },
    "epochs_h200_loop_ahead_2.json": {("tutorial", "epoch_b4"), ("batch4_ahead2", "epoch_b4")},
    "epochs_h200_shipped.json": {
        ("tutorial", "epoch_b4"),
        ("batch4", "epoch_b4"),
        ("batch4_offload", "epoch_b4"),
        ("batch4_offload_dq", "epoch_b4"),
        ("pipeline", "seed_epoch_b1"),
        ("tutorial", "seed_epoch_b1"),
    },
    "epochs_h200_causal.json": {
        ("blocks_syncing", "block_2048x4"),
        ("pipeline", "block_2048x4"),
        ("blocks_recorded", "block_2048x4"),
        ("tutorial", "epoch_b4"),
        ("batch4", "epoch_b4"),
    },
    "epochs_h200_fused_add.json": {
        ("pipeline", "block_2048x4"),
        ("blocks_fused", "block_2048x4"),
        ("tutorial", "epoch_b4"),
        ("batch4", "epoch_b4"),
        ("batch4_fused", "epoch_b4"),
    },
    "epochs_h200_direct_linear.json": {("blocks_fused", "block_2048x4"), ("blocks_fused_direct", "block_2048x4")},
    "epochs_h200_nosync.json": {
        ("pipeline", "epoch_b4"),
        ("paged_adamw", "epoch_b4"),
        ("pad128", "epoch_b4"),
        ("pad256", "epoch_b4"),
        ("pipeline", "block_2048x4"),
        ("all_recorded", "block_2048x4"),
    },
    "epochs_h200_queued.json": {("pad128", "epoch_b4"), ("tutorial", "epoch_b4")},
    "epochs_h200_flash.json": {
        ("pad128", "epoch_b4"),
        ("pad128_flash", "epoch_b4"),
        ("pad64_flash", "epoch_b4"),
        ("pipeline", "epoch_b4"),
        ("tutorial", "epoch_b4"),
    },
    "epochs_h200_b1_layers.json": {("pipeline", "seed_epoch_b1"), ("tutorial", "seed_epoch_b1")},
    "epochs_h200_capture.json": {
        ("pad128", "epoch_b4"),
        ("pad128_queued", "epoch_b4"),
        ("pad128_queued_flash", "epoch_b4"),
        ("tutorial", "epoch_b4"),
    },
    # the first sitting's recorded-ahead rows trained eagerly (their first capture failed)
    "epochs_h200_recorder_1.json": {("pad128_ahead", "epoch_b4"), ("pad128", "epoch_b4"), ("ahead", "epoch_b4")},
    "epochs_h200_recorder.json": {("pad128_ahead", "epoch_b4"), ("tutorial", "epoch_b4")},
    "epochs_h200_recorder_warm.json": {
        ("pad128", "epoch_b4"),
        ("pad128_ahead", "epoch_b4"),
        ("pad64_ahead", "epoch_b4"),
        ("tutorial", "epoch_b4"),
    },
    "epochs_h200_recorder_event.json": {
        ("pad128_ahead", "epoch_b4"),
        ("pad64_ahead", "epoch_b4"),
        ("tutorial", "epoch_b4"),
    },
    # this sitting's recorded-ahead rows trained eagerly too (the loop's first capture failed)
    "epochs_h200_ahead_b1.json": {("pipeline", "seed_epoch_b1"), ("ahead", "seed_epoch_b1")},
    "epochs_h200_ahead_b4.json": {
        ("pad128_ahead", "epoch_b4"),
        ("pad128_ahead_h105", "epoch_b4"),
        ("tutorial", "epoch_b4"),
    },
    "epochs_h200_ahead_started.json": {("pad128_ahead_h105", "epoch_b4")},  # graph headroom 1.05
    "epochs_h200_ahead_warm_b1.json": {("pipeline", "seed_epoch_b1"), ("ahead", "seed_epoch_b1")},
    "epochs_h200_ahead_warm_b4.json": {
        ("tutorial", "epoch_b4"),
        ("pad128_ahead", "epoch_b4"),
        ("pad128", "epoch_b4"),
        ("pad64_ahead", "epoch_b4"),
    },
    "epochs_h200_recorder_split_b1.json": {("pipeline", "seed_epoch_b1"), ("ahead", "seed_epoch_b1")},
    "epochs_h200_recorder_split_b4.json": {("pad128_ahead", "epoch_b4")},
    # the *_4x_unapplied rows ran with the default queues (CUDA had started before the setting)
    "epochs_h200_launch_queues_b4.json": {
        ("tutorial", "epoch_b4"),
        ("pad128_ahead_4x_unapplied", "epoch_b4"),
        ("pad128_ahead_default", "epoch_b4"),
        ("pad64_ahead_4x_unapplied", "epoch_b4"),
    },
    "epochs_h200_launch_queues_b1.json": {
        ("pipeline_4x_unapplied", "seed_epoch_b1"),
        ("pipeline_default", "seed_epoch_b1"),
    },
    "epochs_h200_launch_queues_env_b4.json": {
        ("tutorial", "epoch_b4"),
        ("pad128_ahead_4x_env", "epoch_b4"),
        ("pad128_ahead_default", "epoch_b4"),
    },
    "epochs_h200_layers.json": {
        ("pad128", "epoch_b4"),
        ("pad128_every", "epoch_b4"),
        ("pipeline", "epoch_b4"),
        ("tutorial", "epoch_b4"),
    },
    "epochs_h200_dequantize.json": {
        ("pad128", "epoch_b4"),
        ("pad128_bnb", "epoch_b4"),
        ("pad128_expandable", "epoch_b4"),
        ("pad128_expandable_warps8", "epoch_b4"),
        ("pipeline", "epoch_b4"),
        ("pipeline", "block_2048x4"),
        ("blocks_bnb", "block_2048x4"),
        ("blocks_warps8", "block_2048x4"),
        ("tutorial", "epoch_b4"),
    },
    "epochs_h200.json": EPOCH_ROWS,
    "epochs_h200_folded.json": EPOCH_ROWS,
    "epochs_h200_offload.json": {("pipeline", "epoch_b4"), ("lean_4.84", "epoch_b4"), ("lean_5.75", "block_2048x4")},
    "epochs_h200_offload_graphs.json": {("lean_4.84", "epoch_b4"), ("lean_4.2", "seed_epoch_b1")},
    "epochs_h200_unsloth_peak.json": {("lean_4.84", "epoch_b4"), ("lean_4.2", "seed_epoch_b1")},
    "epochs_h200_allocator.json": {
        ("lean_4.84_torch_default", "epoch_b4"),
        ("lean_4.2_workspace_8mib", "seed_epoch_b1"),
    },
    "epochs_h200_allocator_b4_100steps.json": {("lean_4.84_workspace_8mib_all_recorded", "epoch_b4")},
    "epochs_h200_recorded.json": {
        ("pipeline", "epoch_b4"),
        ("all_recorded", "epoch_b4"),
        ("all_recorded", "block_2048x4"),
        ("lean_yaml", "epoch_b4"),
        ("lean_yaml_5.75", "block_2048x4"),
    },
    "epochs_h200_cudnn.json": {("all_recorded", "epoch_b4"), ("all_recorded", "block_2048x4")},
    "epochs_h200_gc_b4.json": {
        ("tutorial", "epoch_b4"),
        ("pad128_ahead", "epoch_b4"),
        ("pad128_ahead_gc_freeze", "epoch_b4"),
        ("pad128_gc_freeze", "epoch_b4"),
    },
    "epochs_h200_gc_b1.json": {("pipeline", "seed_epoch_b1"), ("pipeline_gc_freeze", "seed_epoch_b1")},
    # cuda_graphs_capture ahead_padded: removed after this sitting (slower)
    "epochs_h200_padded_b4.json": {
        ("pad128_ahead_padded", "epoch_b4"),
        ("pad128_ahead", "epoch_b4"),
        ("tutorial", "epoch_b4"),
    },
    # cuda_graphs_switch_interval: removed after this sitting (no gain)
    "epochs_h200_switch_b4.json": {
        ("tutorial", "epoch_b4"),
        ("pad128_ahead", "epoch_b4"),
        ("pad128_ahead_switch_0.5ms", "epoch_b4"),
        ("pad64_coarse128_ahead", "epoch_b4"),
        ("pad64_coarse128_100_ahead", "epoch_b4"),
    },
    "epochs_h200_headroom_probe.json": {("batch4_headroom_1.05", "epoch_b4"), ("batch4", "epoch_b4")},
    "epochs_h200_batch4.json": {
        ("tutorial", "epoch_b4"),
        ("batch4", "epoch_b4"),
        ("batch4_headroom_1.05", "epoch_b4"),
    },
    "epochs_h200_lean_blocks.json": {("lean_yaml_5.75", "block_2048x4")},
    "epochs_h200_lean_blocks_2.json": {
        ("lean_yaml_5.75", "block_2048x4"),
        ("lean_5.75_cublas_32mib", "block_2048x4"),
        ("lean_5.75_eager", "block_2048x4"),
    },
    "epochs_h200_coarse_levels.json": {("batch4_levels_256_128", "epoch_b4"), ("batch4", "epoch_b4")},
    "epochs_h200_unsloth_same.json": {
        ("lean_yaml_5.75", "block_2048x4"),
        ("lean_yaml", "epoch_b4"),
        ("lean_yaml_4.2", "seed_epoch_b1"),
    },
    "epochs_h200_unsloth_current.json": {
        ("lean_yaml_5.75", "block_2048x4"),
        ("pipeline", "block_2048x4"),
        ("lean_yaml", "epoch_b4"),
        ("lean_yaml_4.2", "seed_epoch_b1"),
    },
    # the offloaded inputs prefetched (one input more), first from the side stream's pool
    "epochs_h200_offload_prefetch.json": {("lean_yaml_5.75", "block_2048x4"), ("lean_5.75_in_line", "block_2048x4")},
    "epochs_h200_offload_pool.json": {("lean_yaml_5.75", "block_2048x4"), ("lean_5.75_in_line", "block_2048x4")},
    "epochs_h200_offload_unsloth.json": {("lean_yaml_5.75", "block_2048x4")},
    # two layers kept whole with offloaded inputs: 13.8 % over under revision 1 of the memory model
    "epochs_h200_offload_8gib.json": {("pipeline", "block_2048x4"), ("pipeline_offloaded", "block_2048x4")},
    # planned by revision 2: one layer more whole where revision 1 over-counted
    "epochs_h200_revision2.json": {("tutorial", "epoch_b4"), ("batch4", "epoch_b4")},
    "epochs_h200_revision2_b4.json": {("tutorial", "epoch_b4"), ("batch4", "epoch_b4")},
    "epochs_h200_revision2_blocks.json": {("pipeline", "block_2048x4"), ("pipeline_offloaded", "block_2048x4")},
    # train.offload_layers: every k-th layer the plan recomputes kept whole, its activations in host
    # memory (the plan's recomputed layers less those, replayed); the first sitting's peaks left
    # out the tensors still being copied (record_stream), so only the two after it
    "epochs_h200_offload_layers_2.json": {
        ("offloaded", "block_2048x4"),
        ("offloaded_layers3", "block_2048x4"),
        ("offloaded_layers4", "block_2048x4"),
        ("layers3", "block_2048x4"),
    },
    "epochs_h200_offload_layers_3.json": {
        ("pipeline", "block_2048x4"),
        ("layers3", "block_2048x4"),
        ("layers4", "block_2048x4"),
    },
    # train.warm_up_beside_load: removed after this sitting (no gain); the plan as config/batch4.yaml's
    "epochs_h200_warm_up.json": {("tutorial", "epoch_b4"), ("batch4", "epoch_b4"), ("batch4_warm_up", "epoch_b4")},
    # revision 2's plans with offloaded layers under the allocation history ("offloaded": the 7B
    # config ships offload_layers 3, so it repeats offloaded_layers3); then revision 3's plans
    "epochs_h200_offload_peak.json": {
        ("offloaded_layers3", "block_2048x4"),
        ("layers3", "block_2048x4"),
        ("offloaded", "block_2048x4"),
    },
    "epochs_h200_revision3.json": {("pipeline", "block_2048x4"), ("offloaded", "block_2048x4")},
    # revision 3's plans at SmolLM2-135M's shape over their budgets (1 and 0.5 GiB), under the
    # allocation history, and the 7B config's batch 4; then revision 4's plans (graph headroom 1.02)
    "memory_h200_head_smollm2.json": {("smollm2_b4", "epoch_b4"), ("smollm2_b1", "seed_epoch_b1")},
    "memory_h200_head_7b.json": {("batch4", "epoch_b4")},
    "epochs_h200_revision4_smollm2.json": {("smollm2_b4", "epoch_b4"), ("smollm2_b1", "seed_epoch_b1")},
    "epochs_h200_revision4.json": {("pipeline", "seed_epoch_b1"), ("tutorial", "epoch_b4"), ("batch4", "epoch_b4")},
    "epochs_h200_eager_long.json": {
        ("batch4", "epoch_b4"),
        ("eager_over_640", "epoch_b4"),
        ("eager_over_768", "epoch_b4"),
        ("tutorial", "epoch_b4"),
    },
    "memory_h200_mixed.json": {("eager_over_640", "epoch_b4")},
    # the same 60 steps with each block's step (revision 4's plans); the batch-4 epoch against the
    # tutorial's on a sixth machine; revision 5's plans with the folded lora_A casting its own weight
    "memory_h200_steps.json": {("eager_over_640", "epoch_b4")},
    "epochs_h200_goal2.json": {("batch4", "epoch_b4"), ("tutorial", "epoch_b4")},
    "epochs_h200_revision5.json": {("eager_over_640", "epoch_b4"), ("batch4", "epoch_b4")},
    "epochs_h200_goal2_cast.json": {("batch4", "epoch_b4"), ("tutorial", "epoch_b4")},  # the code as it is
    # both recipes twice, interleaved, on an eighth machine
    "epochs_h200_goal2_median.json": {("batch4", "epoch_b4"), ("tutorial", "epoch_b4")},
}


@pytest.mark.parametrize("results", sorted(RESULTS))
def test_memory_model_within_ten_percent_of_every_measured_epoch_row(rows_dir, results):
    """The measured H200 epochs (bench/results/): every row's prediction, recomputed here from
    the rows and the config (the per-batch plan replayed over the same batches, with the row's
    dropout layout and graph headroom), is within 10 % of its measured peak."""
    import epoch_results

    report = json.loads((PROJECT / "bench" / "results" / results).read_text())
    config = PROJECT / "config" / "llama2-7b.yaml"
    configs = epoch_results.shape_configs(rows_dir)
    measured = [r for r in report["rows"] if r["status"] == "ok" and r["kind"] != "unsloth"]  # its own model
    assert {(r["recipe"], r["job"]) for r in measured} >= RESULTS[results]
    for row in measured:
        model_config = configs[epoch_results.row_shape(row)]
        replayed = epoch_results.replayed_plan(row, rows_dir, config, model_config)
        predicted = replayed[0] if replayed else epoch_results.row_prediction_gib(row, rows_dir, config, model_config)
        assert predicted == pytest.approx(row["predicted_peak_gib"], abs=1e-3), row["recipe"]
        assert abs(predicted - row["peak_allocated_gib"]) / row["peak_allocated_gib"] < 0.10, row["recipe"]
        if row.get("checkpoint_steps_by_layers"):  # the replay planned the layers the row ran
            steps_by_layers = replayed[1]
            ran = {int(layers): steps for layers, steps in row["checkpoint_steps_by_layers"].items()}
            if "rows" not in epoch_results.JOBS[row["job"]]:  # a block row: one shape, replayed once
                ran = dict.fromkeys(ran, 1)
            assert steps_by_layers == ran, row["recipe"]
