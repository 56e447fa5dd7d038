"""The sweep on Ray: a simulated two-node cluster (ray.cluster_utils.Cluster) runs the tiny-model grid
with the serial sweep's results, never times a bench beside another stage on its node, and survives a
node killed mid-sweep."""
import json
import threading
import time
from datetime import datetime

import psutil
import pytest

ray = pytest.importorskip("ray")
from ray import ray_constants  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from harness import layout, ray_executor, sweep  # noqa: E402
from harness.load import resolve_spec  # noqa: E402
from harness.recipes import load_recipe  # noqa: E402
from harness.rundir import RunDir, read_json  # noqa: E402

MODEL = "tiny-gpt2"
RECIPE = "sparseml/oneshot-magnitude"
LEVELS = [0, 50, 90]
STAGES = ["prune", "export", "bench", "eval"]
LIMIT = "lambada_openai=2"
STAGE_ARGS = {"bench": ["--dense-timings", "level0", "--batch-sizes", "1", "--seq-len", "8", "--threads", "1",
                        "--iterations", "1", "--min-time", "0", "--engines", "onnxruntime,pytorch", "--gzip-level", "1"],
              "eval": ["--benchmarks", "lambada_openai", "--engines", "pytorch"]}
# Unequal CPU counts: a bench asks for the smaller node's CPUs, so on the larger node only the
# harness_node slot keeps other stages from running beside it.
NODES = ({"num_cpus": 2}, {"num_cpus": 3})


def run_sweep(executor: str, stages=STAGES) -> dict:
    return sweep.sweep([MODEL], [RECIPE], LEVELS, stages, limit=LIMIT, stage_args=STAGE_ARGS, executor=executor)[MODEL]


@pytest.fixture(scope="module")
def cluster():
    # A fixed object store per node, not 30 % of what memory the test process left free, and no refusal
    # to spill it to a disk that is over 95 % full on a shared CI machine: the runs' archives are small.
    store = {"memory": 4 << 30, "object_store_memory": 1 << 30}
    cluster = Cluster(initialize_head=True, head_node_args={
        **NODES[0], **store, "resources": {ray_executor.SLOT: 1},
        "_system_config": {"local_fs_capacity_threshold": 1.0}})
    worker = cluster.add_node(**NODES[1], **store, resources={ray_executor.SLOT: 1})
    cluster.wait_for_nodes()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAY_ADDRESS", cluster.address)
        yield cluster, worker
    cluster.shutdown()


@pytest.fixture(scope="module")
def serial_and_ray(cluster, tmp_path_factory):
    """The same grid swept here and on the cluster, into two runs roots."""
    roots = {}
    with pytest.MonkeyPatch.context() as patch:
        for executor in ("local", "ray"):
            roots[executor] = tmp_path_factory.mktemp(f"runs-{executor}")
            patch.setenv("HARNESS_RUNS", str(roots[executor]))
            summary = run_sweep(executor)
            assert all(s["status"] == "done" for st in summary.values() for s in st.values()), summary
    return roots


def results(root, level) -> tuple:
    """What must not depend on the executor: sparsity, prune's input fingerprint, the eval metrics.
    (The later stages' fingerprints include the time prune finished, so they differ between any two sweeps;
    that they match their own run is what a rerun doing no work shows.)"""
    path = root / MODEL / RECIPE / str(level)
    metrics = {name: {m: v["value"] for m, v in result["metrics"].items()}
               for name, result in read_json(path / layout.EVAL_FILE)["benchmarks"].items()}
    prune_inputs = read_json(path / layout.MANIFEST)["stages"]["prune"]["inputs"]
    return read_json(path / layout.SPARSITY_FILE), prune_inputs, metrics


def test_ray_sweep_gives_the_serial_results(serial_and_ray):
    for level in LEVELS:
        assert results(serial_and_ray["ray"], level) == results(serial_and_ray["local"], level)
    ledger = read_json(serial_and_ray["ray"] / MODEL / layout.SWEEP_FILE)["runs"]
    nodes = {entry["bench"]["node"] for entry in ledger.values()}
    manifest = read_json(serial_and_ray["ray"] / MODEL / RECIPE / "50" / layout.MANIFEST)
    assert manifest["stages"]["bench"]["node"] in nodes  # the run says which node timed it
    assert not [p for p in serial_and_ray["ray"].rglob(".*") if p.is_dir()]  # no staging left behind


def stage_intervals(root) -> list[tuple]:
    """(node, stage, start, end) of every stage the cluster ran, from the manifests (end to the second)."""
    intervals = []
    for level in LEVELS:
        for stage, record in read_json(root / MODEL / RECIPE / str(level) / layout.MANIFEST)["stages"].items():
            end = datetime.strptime(record["finished"], "%Y-%m-%dT%H:%M:%S%z").timestamp()
            intervals.append((record["node"], f"{stage} {level}", end - record["wall_time_s"], end))
    return intervals


def test_no_stage_runs_beside_a_bench_on_its_node(serial_and_ray):
    intervals = stage_intervals(serial_and_ray["ray"])
    benches = [i for i in intervals if i[1].startswith("bench")]
    assert len(benches) == len(LEVELS)
    for node, name, start, end in benches:
        beside = [i[1] for i in intervals if i[0] == node and i[1] != name and i[2] < end - 1 and i[3] > start + 1]
        assert not beside, f"{beside} ran beside {name} on {node}"


def test_rerun_on_ray_does_no_work(serial_and_ray, monkeypatch):
    monkeypatch.setenv("HARNESS_RUNS", str(serial_and_ray["ray"]))
    before = {level: RunDir(MODEL, RECIPE, level).manifest() for level in LEVELS}
    summary = run_sweep("ray")
    assert all(s["status"] == "done" and "node" not in s for st in summary.values() for s in st.values())
    assert {level: RunDir(MODEL, RECIPE, level).manifest() for level in LEVELS} == before


def test_a_composed_recipe_on_ray_starts_from_its_earlier_part_from_the_grid_or_the_driver(cluster, monkeypatch,
                                                                                            tmp_path):
    monkeypatch.setenv("HARNESS_RUNS", str(tmp_path))
    composed = load_recipe(f"{RECIPE}+distil@tokens=768,train_seq_len=32,batch_size=2,accumulation=1").name
    sweep.sweep([MODEL], [RECIPE], [50], ["prune"])  # 50 % is on the driver already, 90 % is pruned on Ray first
    summary = sweep.sweep([MODEL], [composed, RECIPE], [50, 90], ["prune"], executor="ray")
    assert all(s["status"] == "done" for st in summary[MODEL].values() for s in st.values()), summary
    for level in (50, 90):
        started_from = RunDir(MODEL, composed, level).stage_record("prune").get("started_from")
        assert started_from == RunDir(MODEL, RECIPE, level).relative, level


def test_memory_estimate_keeps_two_full_size_prunes_off_one_24_gib_node():
    assert ray_executor.estimated_memory(resolve_spec("gpt2xl-shape")) > 12 * 2**30
    assert ray_executor.estimated_memory(resolve_spec(MODEL)) == ray_executor.MIN_MEMORY


def test_a_node_without_the_benchmark_data_fails_its_task_with_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("HARNESS_DATA", str(tmp_path / "absent"))
    missing = ray_executor.missing_input(resolve_spec(MODEL), ["eval"])
    assert str(tmp_path / "absent") in missing and "\n" not in missing
    assert ray_executor.missing_input(resolve_spec(MODEL), ["prune", "export"]) is None


def harness_stage_processes(node) -> list[psutil.Process]:
    """The `python -m harness` stage processes under a node's raylet."""
    raylet = psutil.Process(node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid)
    return [p for p in raylet.children(recursive=True) if p.cmdline()[1:3] == ["-m", "harness"]]


def test_a_node_killed_mid_sweep_leaves_complete_or_failed_runs_and_a_rerun_completes(cluster, monkeypatch, tmp_path):
    head, worker = cluster
    monkeypatch.setenv("HARNESS_RUNS", str(tmp_path))
    orphans, swept = [], threading.Event()

    def kill_worker_once_it_runs_a_stage():
        # Ray spreads the three runs' first tasks over both nodes (the head is half busy with one)
        while not harness_stage_processes(worker) and not swept.is_set():
            time.sleep(0.2)
        orphans.extend(p for p in harness_stage_processes(worker) for p in [p, *p.children(recursive=True)])
        if orphans:
            head.remove_node(worker, allow_graceful=False)
        for process in orphans:  # a stage process outlives its killed worker; stop it like the node would
            process.kill()

    killer = threading.Thread(target=kill_worker_once_it_runs_a_stage)
    killer.start()
    try:
        summary = run_sweep("ray", STAGES[:3])
    finally:
        swept.set()
        killer.join()
    assert orphans, "the worker node never ran a stage, so none was killed"
    for level in LEVELS:
        statuses = summary[f"{RECIPE}/{level}"]
        complete = all(s["status"] == "done" for s in statuses.values())
        assert complete or any(s["status"] == "failed" for s in statuses.values()), statuses
        if complete:
            assert RunDir(MODEL, RECIPE, level).require(*STAGES[:3])
    assert not [p for p in tmp_path.rglob(".*") if p.is_dir()]  # nothing half-written

    rerun = run_sweep("ray", STAGES[:3])
    assert all(s["status"] == "done" for st in rerun.values() for s in st.values()), rerun
    assert json.loads((tmp_path / MODEL / layout.SWEEP_FILE).read_text())["runs"].keys() >= set(rerun)
