"""bench/trace_stalls.py on a small timeline in torch.profiler's chrome-trace format: a loop thread
waiting on an event, a recorder thread capturing, autograd's thread launching the capture's backward."""

import gzip
import json
import sys
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT / "bench"))


def call(tid, name, ts_ms, dur_ms, cat="cuda_runtime"):
    return dict(ph="X", cat=cat, name=name, tid=tid, pid=1, ts=ts_ms * 1e3, dur=dur_ms * 1e3)


def test_a_capture_gap_names_the_waits_beside_it_and_the_python_call_it_sat_in(tmp_path):
    import trace_stalls

    events = [
        call("loop", "cudaGraphLaunch", 0, 2),
        call("loop", "cudaEventSynchronize", 3, 250),  # blocked: the recorder's gap lies inside it
        call("recorder", "cudaStreamBeginCapture", 8, 0.1),
        call("recorder", "cudaLaunchKernel", 10, 0.1),
        call("recorder", "cudaLaunchKernel", 110, 0.1),  # 100 ms without a CUDA call before this
        call("recorder", "cudaLaunchKernel", 111, 0.1),
        call("recorder", "cudaStreamEndCapture", 400, 1),  # the backward: autograd's thread meanwhile
        *[call("autograd", "cuLaunchKernelEx", 120 + i, 0.05, cat="cuda_driver") for i in range(200)],
        *[call("autograd", "cuLaunchKernelEx", 340 + i, 0.05, cat="cuda_driver") for i in range(50)],
        call("autograd", "_same", 320.1, 19.8, cat="python_function"),  # 20 ms between its launches
        call("recorder", "forward", 5, 104, cat="python_function"),
        call("recorder", "decoder_layer", 10.05, 100, cat="python_function"),  # the innermost span
        call("recorder", "backward", 111.05, 289, cat="python_function"),
        call("loop", "Command Buffer Full", 0.5, 1, cat="cpu_instant_event"),
    ]
    trace = tmp_path / "trace.json.gz"
    with gzip.open(trace, "wt") as handle:
        json.dump({"traceEvents": events}, handle)
    result = trace_stalls.main(trace, tmp_path / "out.json", blocked_ms=3.0, gap_ms=5.0)
    assert json.loads((tmp_path / "out.json").read_text()) == result
    assert result["threads"]["loop"]["blocked"] == [dict(at_ms=3.0, call="cudaEventSynchronize", ms=250.0)]
    assert result["command_buffer_full"] == dict(count=1, ms=1.0, sat_in={"loop cudaGraphLaunch": 1.0})
    (capture,) = result["captures"]
    assert capture["thread"] == "recorder" and capture["from_ms"] == 8.0 and capture["ms"] == 392.0
    first, second = capture["gaps"]
    assert (first["at_ms"], first["ms"]) == (10.1, 99.9)  # the first stretch of Python without CUDA
    assert first["others_blocked"] == ["loop cudaEventSynchronize 250.0 ms"] and first["others_calls"] == {}
    assert first["sat_in"] == "decoder_layer" and first["python_inside"] == {}
    # the capture's backward: no CUDA call on the recorder, 200 launches on autograd's thread
    assert (second["at_ms"], second["ms"]) == (111.1, 288.9) and second["others_calls"] == {"autograd": 250}
    assert second["sat_in"] == "backward"
    assert capture["calls"] == 5
    # beside it, autograd's thread stood 21 ms between its launches, a Python hook inside; the loop
    # made no call in the window (its synchronize began 5 ms before the capture)
    assert set(capture["beside"]) == {"autograd"}
    beside = capture["beside"]["autograd"]
    assert beside["calls"] == 250
    (stretch,) = beside["gaps"]
    assert (stretch["at_ms"], stretch["ms"], stretch["sat_in"]) == (319.1, 20.9, None)  # no call spans it
    assert stretch["python_inside"] == {"_same": 19.8}  # a saved-tensor hook ran inside it
    assert stretch["others_calls"] == {} and stretch["others_blocked"] == []  # the loop's wait ended at 253 ms


def test_python_stacks_cover_every_thread_running_when_the_profile_starts(tmp_path):
    """bench/profile_step.py --python-stacks: the recorder thread starts before the profiled steps;
    its Python calls are in the timeline beside the main thread's."""
    import threading

    import torch
    from torch.profiler import ProfilerActivity, profile

    from profile_step import stack_options

    go = threading.Event()

    def work():
        go.wait()
        for _ in range(20):
            torch.ones(32, 32) @ torch.ones(32, 32)

    worker = threading.Thread(target=work)
    worker.start()
    with profile(activities=[ProfilerActivity.CPU], **stack_options(True)) as timeline:
        go.set()
        work()
        worker.join()
    timeline.export_chrome_trace(str(tmp_path / "trace.json"))
    events = json.loads((tmp_path / "trace.json").read_text())["traceEvents"]
    python_threads = {e["tid"] for e in events if e.get("cat") == "python_function"}
    assert {threading.main_thread().native_id, worker.native_id} <= python_threads
    assert stack_options(False) == {}


def test_card_idle_splits_the_gaps_by_whether_the_host_launched_late(tmp_path):
    """Three kernels after a first: one launched while the card still ran (no idle), one launched
    2 ms after the card ran dry while the host sat in a Python call, after a stream sync; one
    launched early but started 1 ms after the previous kernel (waiting on the card)."""
    import trace_stalls

    def kernel(ts_ms, dur_ms, correlation):
        return dict(call("card", "gemm", ts_ms, dur_ms, cat="kernel"), args={"correlation": correlation})

    def launch(ts_ms, correlation):
        return dict(call("loop", "cudaLaunchKernel", ts_ms, 0.01), args={"correlation": correlation})

    events = [
        launch(0, 1),
        kernel(0.1, 5, 1),  # runs to 5.1
        launch(1, 2),
        kernel(5.1, 1, 2),  # at once: no gap
        call("loop", "cudaStreamSynchronize", 1.5, 4.61),  # drains the queue, returns at 6.11
        call("loop", "recompute_fn", 5.0, 3.5, cat="python_function"),  # spans the host's stretch 6.1-8.1
        call("loop", "liger_rms_norm", 6.2, 1.7, cat="python_function"),  # inside it: spans no whole stretch
        launch(8.1, 3),
        kernel(8.15, 1, 3),  # 2.05 ms after the card ran dry at 6.1
        launch(8.5, 4),
        kernel(10.15, 1, 4),  # queued at 8.5, started 1 ms after 9.15: waited on the card
    ]
    trace = tmp_path / "trace.json"
    trace.write_text(json.dumps({"traceEvents": events}))
    idle = trace_stalls.main(trace, None, idle_us=20.0)["card_idle"]
    assert idle["gaps"] == 2 and idle["idle_ms"] == 3.0
    assert idle["by_cause"] == {"launched after the card ran dry": 2.0, "launched before the card ran dry": 1.0}
    assert idle["host_sat_in"] == {"recompute_fn": 2.0}  # the innermost call spanning the stretch
    assert idle["after_blocking_call"] == {"cudaStreamSynchronize": 2.0}


def test_matmul_sustained_times_a_burst_and_windows_after_it(tmp_path):
    """bench/matmul_sustained.py on the CPU (float32, small shapes): a burst rate, then windows of
    back-to-back calls whose median over the second half is the sustained rate."""
    import matmul_sustained

    out = tmp_path / "sustained.json"
    # windows of ~0.02 s (30 in the 0.6 s): each is sized from the burst's rate, and on a loaded
    # 2-core CI machine one ran 6x slower than its burst (0.1 s windows: one window in 0.6 s, ci19)
    result = matmul_sustained.main(0.6, out, device="cpu", shapes=((64, 128, 96),), window=0.02)
    assert json.loads(out.read_text()) == result
    (row,) = result["rows"]
    assert row["shape"] == dict(tokens=64, inner=128, out=96) and row["burst_tflops"] > 0
    assert len(row["windows"]) >= 2 and all(w["tflops"] > 0 for w in row["windows"])
    steady = sorted(w["tflops"] for w in row["windows"][len(row["windows"]) // 2 :])
    assert steady[0] <= row["sustained_tflops"] <= steady[-1]
