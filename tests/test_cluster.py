"""Indexing and optimize on a real Ray cluster (#15).

One Ray instance serves the whole session (`ray_cluster`: two CPUs, no dashboard, a small
object store), kept on 127.0.0.1 by RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (Ray otherwise
binds to the machine's own address), on the session's own token (RAY_AUTH_TOKEN_PATH,
tests/conftest.py). The two-node test runs head, node and driver inside a network namespace
of its own, each with a fresh home, the token handed out as the README says (tests/ray_nodes.py).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import uuid
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest

from clipdex.indexer import index_paths
from clipdex.indexer.cluster import ClusterOptions
from clipdex.search.errors import ClusterError
from clipdex.search.library import Library
from clipdex.search.encoders.model import ModelSpec
from tests.conftest import write_image

LOOPBACK_ONLY = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": Ray stays on 127.0.0.1, one node only
ROW_FIELDS = ("path", "content_hash", "size", "mtime_ns", "width", "height", "taken_at", "camera_make", "camera_model",
              "device", "inode", "kind")


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[Any]:
    before = os.environ.get(LOOPBACK_ONLY)
    os.environ[LOOPBACK_ONLY] = "0"  # read when Ray is imported: set it first
    ray = pytest.importorskip("ray", reason="Ray is not installed: pip install -e '.[dev]'")
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False  # in case Ray was imported before this fixture ran
    temp_dir = tempfile.mkdtemp(prefix="cdx-ray-")  # Ray's session files, not /tmp/ray; short: socket paths are limited
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=80 << 20, log_to_driver=False,
             configure_logging=False, _temp_dir=temp_dir)
    try:
        assert {node["NodeManagerAddress"] for node in ray.nodes()} == {"127.0.0.1"}, "Ray left the loopback"
        yield ray
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
        if before is None:
            os.environ.pop(LOOPBACK_ONLY, None)
        else:
            os.environ[LOOPBACK_ONLY] = before


def test_ray_runs_on_the_sessions_token_and_writes_nothing_into_home(ray_cluster: Any) -> None:
    """Ray 2.60 turns token authentication on for a cluster that `ray.init` starts, and makes
    ~/.ray/auth_token when it finds no token: here it finds the session's."""
    assert os.environ.get("RAY_AUTH_MODE") == "token"
    assert not (Path.home() / ".ray").exists()
    assert ray_cluster.get(ray_cluster.remote(lambda: 1 + 1).remote()) == 2


def test_a_driver_without_the_clusters_token_is_told_where_to_put_it(tmp_path: Path, make_images,
                                                                      model_args: list[str]) -> None:
    pytest.importorskip("ray", reason="Ray is not installed: pip install -e '.[dev]'")
    make_images(tmp_path / "pics", 1)
    fresh = tmp_path / "home"  # a machine that never had the token
    fresh.mkdir()
    environment = {**os.environ, "HOME": str(fresh), "RAY_AUTH_MODE": "token"}
    for variable in ("RAY_AUTH_TOKEN_PATH", "RAY_AUTH_TOKEN"):
        environment.pop(variable, None)
    clipdex = str(Path(sys.executable).with_name("clipdex"))
    done = subprocess.run([clipdex, "index", str(tmp_path / "pics"), "--library", str(tmp_path / "lib"), *model_args,
                           "--ray", "127.0.0.1:1", "-q"], capture_output=True, text=True, env=environment, timeout=300)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert ("Error: cannot connect to the Ray cluster at '127.0.0.1:1': Token authentication is enabled but no "
            "authentication token was found; put the cluster's token (the head's ~/.ray/auth_token, made by "
            "`ray get-auth-token --generate`) at ~/.ray/auth_token here") in " ".join(done.stderr.split())
    assert list(fresh.iterdir()) == []


def catalog_rows(library: Library) -> dict[int, tuple[Any, ...]]:
    ids, _ = library.catalog.all_vectors()
    items = library.catalog.get_items(ids.tolist())
    return {item_id: tuple(getattr(item, name) for name in ROW_FIELDS) for item_id, item in items.items()}


def vectors_by_id(library: Library) -> dict[int, np.ndarray]:
    ids, vectors = library.catalog.all_vectors()
    return dict(zip(ids.tolist(), vectors.reshape(len(ids), library.dim)))


def assert_same_libraries(cluster: Library, local: Library) -> None:
    assert catalog_rows(cluster) == catalog_rows(local)
    ours, theirs = vectors_by_id(cluster), vectors_by_id(local)
    assert ours.keys() == theirs.keys()
    for item_id, vector in ours.items():
        assert float(vector @ theirs[item_id]) >= 0.999, item_id
    assert cluster.check()["ok"]


def test_cluster_run_indexes_as_the_local_run_does(ray_cluster: Any, tmp_path: Path, tiny_model: ModelSpec, make_images) -> None:
    pics = tmp_path / "pics"
    paths = make_images(pics, 7)
    write_image(pics / "big.png", 99, size=(300, 200))
    (pics / "broken.jpg").write_bytes(b"not a jpeg")
    (pics / "empty.jpg").write_bytes(b"")
    on_cluster = Library.open(tmp_path / "cluster", model=tiny_model, create=True, device="cpu")
    local = Library.open(tmp_path / "local", model=tiny_model, create=True, device="cpu")
    cluster = ClusterOptions("auto")

    first = index_paths(on_cluster, [pics], batch_size=3, cluster=cluster)
    expected = index_paths(local, [pics], batch_size=3)
    assert (first.added, first.updated, first.moved) == (expected.added, expected.updated, expected.moved) == (8, 0, 0)
    assert [failure.to_json() for failure in first.failed] == [failure.to_json() for failure in expected.failed]
    assert len(first.failed) == 2
    assert not on_cluster.encoders.model_loaded  # the driver never loaded the model
    assert_same_libraries(on_cluster, local)

    # a local run after the cluster's finds nothing to do
    again = index_paths(Library.open(on_cluster.path, device="cpu"), [pics])
    assert (again.added, again.updated, again.moved, again.removed, again.unchanged) == (0, 0, 0, 0, 8)

    # moves keep their ids, copies and touched files reuse stored vectors, changed files are re-embedded
    (pics / "sub").mkdir()
    shutil.move(paths[0], pics / "sub" / "moved.jpg")
    shutil.copy(paths[1], pics / "copy.jpg")
    os.utime(paths[2], ns=(1, 1))
    write_image(paths[3], 1234)
    paths[4].unlink()
    second = index_paths(on_cluster, [pics], batch_size=3, cluster=cluster)
    expected = index_paths(local, [pics], batch_size=3)
    counts = lambda report: (report.added, report.updated, report.moved, report.removed, report.unchanged)  # noqa: E731
    assert counts(second) == counts(expected) == (1, 2, 1, 1, 4)
    assert_same_libraries(on_cluster, local)


def test_stop_ends_a_cluster_run_after_the_committed_batches(ray_cluster: Any, library: Library, tmp_path: Path, make_images) -> None:
    make_images(tmp_path / "pics", 9)
    stop = threading.Event()
    report = index_paths(library, [tmp_path / "pics"], batch_size=2, cluster=ClusterOptions("auto"),
                         progress=lambda done, total: stop.set() if done >= 3 else None, stop=stop)
    assert report.interrupted and report.added == 3  # the files received before the stop, as the local runner does
    resumed = index_paths(library, [tmp_path / "pics"], batch_size=2)  # resumed here: the same catalog either way
    assert (resumed.added, resumed.unchanged, resumed.interrupted) == (6, 3, False)
    assert library.check()["ok"]


def test_a_path_a_node_cannot_see_is_one_clear_error(ray_cluster: Any, library: Library, tmp_path: Path, make_images) -> None:
    from clipdex.search.ray_cluster import check_paths_visible

    check_paths_visible(ray_cluster, [str(tmp_path)])
    with pytest.raises(ClusterError, match=r"Ray node 127\.0\.0\.1 cannot see /nowhere/photos: .* same path"):
        check_paths_visible(ray_cluster, [str(tmp_path), "/nowhere/photos"])


def test_without_ray_the_option_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, make_images,
                                                       model_args: list[str]) -> None:
    from tests.test_cli import run as cli

    make_images(tmp_path / "pics", 1)
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as when it is not installed
    result = cli("index", str(tmp_path / "pics"), "--library", str(tmp_path / "lib"), *model_args, "--ray", "auto", "-q")
    assert result.exit_code == 1
    assert "Ray is not installed: pip install 'clipdex[ray]'" in result.output


def test_a_model_the_workers_cannot_load_is_one_clear_error(ray_cluster: Any, tmp_path: Path, tiny_model: ModelSpec,
                                                            make_images) -> None:
    make_images(tmp_path / "pics", 3)
    checkpoint = tmp_path / "weights.pt"
    shutil.copy(tiny_model.pretrained, checkpoint)
    library = Library.open(tmp_path / "lib", model=ModelSpec(tiny_model.name, str(checkpoint)), create=True, device="cpu")
    with open(checkpoint, "ab") as handle:
        handle.write(b"changed")
    with pytest.raises(ClusterError, match=r"the Ray pipeline failed: .*checkpoint file .* is not the one this library was built with"):
        index_paths(library, [tmp_path / "pics"], cluster=ClusterOptions("auto"))
    assert library.stats()["items"] == 0


def test_gpu_workers_on_a_cluster_without_gpus_is_one_clear_error(ray_cluster: Any, library: Library, tmp_path: Path,
                                                                   make_images) -> None:
    make_images(tmp_path / "pics", 2)
    with pytest.raises(ClusterError, match="--ray-gpus-per-worker was given, but the Ray cluster has no GPUs"):
        index_paths(library, [tmp_path / "pics"], cluster=ClusterOptions("auto", gpus_per_worker=1))
    assert library.stats()["items"] == 0


def test_random_weights_are_refused_before_any_work(tmp_path: Path, make_images) -> None:
    make_images(tmp_path / "pics", 1)
    library = Library.open(tmp_path / "lib", model=ModelSpec("RN50", "none"), create=True, device="cpu")
    with pytest.raises(ClusterError, match="random weights .* each Ray worker would draw weights of its own"):
        index_paths(library, [tmp_path / "pics"], cluster=ClusterOptions("auto"))
    assert library.stats()["items"] == 0


def test_the_local_path_never_imports_ray(tmp_path: Path, tiny_model: ModelSpec, make_images) -> None:
    make_images(tmp_path / "pics", 2)
    script = (
        "import sys\n"
        "from clipdex.indexer import index_paths\n"
        "from clipdex.search.library import Library\n"
        "from clipdex.search.encoders.model import ModelSpec\n"
        f"library = Library.open({str(tmp_path / 'lib')!r}, model=ModelSpec({tiny_model.name!r}, {tiny_model.pretrained!r}), "
        "create=True, device='cpu')\n"
        f"assert index_paths(library, [{str(tmp_path / 'pics')!r}]).added == 2\n"
        "import clipdex.cli.main\n"
        "print(sorted(name for name in sys.modules if name == 'ray' or name.startswith('ray.')))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.slow
def test_two_nodes_index_through_the_cli(tmp_path: Path, tiny_model: ModelSpec, make_images, model_args: list[str]) -> None:
    """A head and a second node, each a `ray start` process with one CPU, in a network namespace."""
    pytest.importorskip("ray", reason="Ray is not installed: pip install -e '.[dev]'")
    from tests.ray_nodes import TwoNodeCluster, netns_unavailable

    reason = netns_unavailable()
    if reason:
        pytest.skip(f"no network namespace for a two-node cluster: {reason}")
    make_images(tmp_path / "pics", 12)
    (tmp_path / "pics" / "broken.jpg").write_bytes(b"not a jpeg")
    nodes = TwoNodeCluster(f"clipdex-test-{uuid.uuid4().hex[:8]}", tmp_path)
    try:
        nodes.start()
        clipdex = str(Path(sys.executable).with_name("clipdex"))
        done = subprocess.run(
            nodes.command(clipdex, "index", str(tmp_path / "pics"), "--library", str(tmp_path / "cluster"), *model_args,
                          "--batch-size", "4", "--ray", nodes.address, "--json", "-q"),
            capture_output=True, text=True, env=nodes.environment("driver"), timeout=300,
        )
    finally:
        nodes.stop()
    assert not nodes.pids()
    assert done.returncode == 0, done.stderr[-2000:]
    assert '"added": 12' in done.stdout and "broken.jpg" in done.stdout
    local = Library.open(tmp_path / "local", model=tiny_model, create=True, device="cpu")
    index_paths(local, [tmp_path / "pics"], batch_size=4)
    assert_same_libraries(Library.open(tmp_path / "cluster", device="cpu"), local)


@pytest.mark.parametrize("factory", ["IVF32,Flat", "IVF32,SQ8", "IVF32,PQ16x4fsr"])
def test_sharded_ivf_build_is_the_single_process_build(ray_cluster: Any, factory: str) -> None:
    from functools import partial

    from test_sharded import lists_content

    from clipdex.search.index.choice import build_index
    from clipdex.search.index.optimize import optimize_vectors
    from clipdex.search.index.optimize_cluster import build_index_on_cluster
    from clipdex.search.index.vectors import IndexSpec, faiss_module

    rng = np.random.default_rng(7)
    vectors = rng.standard_normal((5_000, 32)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = np.arange(5_000, dtype=np.int64) * 3 + 1
    single = build_index(32, IndexSpec("ivf", factory), ids, vectors, resolve=False)
    sharded = build_index_on_cluster(ray_cluster, 32, IndexSpec("ivf", factory), ids, vectors, resolve=False, shards=4)
    assert sharded.ntotal == single.ntotal == 5_000
    assert np.array_equal(sharded.ids(), single.ids())  # every list holds the same ids in the same order
    def same(one: Any, other: Any) -> bool:
        """The same lists: byte for byte, but for the padding of fast-scan blocks (no content)."""
        if one.fast_scan:
            return lists_content(one) == lists_content(other)
        return bytes(faiss_module().serialize_index(one.index)) == bytes(faiss_module().serialize_index(other.index))

    assert same(sharded, single)
    for nprobe in (1, 4, 32):
        ours, theirs = sharded.search_with(vectors[:50], 10, nprobe), single.search_with(vectors[:50], 10, nprobe)
        assert np.array_equal(ours[1], theirs[1]) and np.array_equal(ours[0], theirs[0])
    on_disk = build_index_on_cluster(ray_cluster, 32, IndexSpec("ivf", factory), ids, vectors, resolve=False, shards=3,
                                     on_disk=True)
    assert on_disk.mapped is not on_disk.fast_scan  # FAISS reads fast-scan block lists into memory
    assert same(on_disk, single)
    _, built_here = optimize_vectors(ids, vectors, spec=IndexSpec("ivf", factory), min_seconds=0.01)
    _, built_there = optimize_vectors(ids, vectors, spec=IndexSpec("ivf", factory), min_seconds=0.01,
                                      builder=partial(build_index_on_cluster, ray_cluster, shards=3))
    assert (built_there.recall_at_10, built_there.search_params) == (built_here.recall_at_10, built_here.search_params)


def test_lists_merged_on_disk_are_faiss_own_file_when_most_lists_are_empty(tmp_path: Path) -> None:
    import io

    from clipdex.search.index.optimize_cluster import write_merged_ivf
    from clipdex.search.index.vectors import faiss_module

    faiss = faiss_module()
    rng = np.random.default_rng(3)
    vectors = rng.standard_normal((2_000, 16)).astype(np.float32)
    trained = faiss.index_factory(16, "IVF64,Flat", faiss.METRIC_INNER_PRODUCT)
    trained.train(vectors)
    shards = []
    for start, end in ((0, 5), (5, 8)):  # a few lists filled: FAISS writes them sparse
        shard = faiss.clone_index(trained)
        shard.add_with_ids(vectors[start:end], np.arange(start, end, dtype=np.int64))
        shards.append(shard)
    whole = faiss.clone_index(trained)
    whole.add_with_ids(vectors[:8], np.arange(8, dtype=np.int64))
    written = io.BytesIO()
    write_merged_ivf(trained, [faiss.extract_index_ivf(shard) for shard in shards], written)
    assert written.getvalue() == bytes(faiss.serialize_index(whole))


def test_optimize_through_the_cli_on_the_cluster(ray_cluster: Any, tmp_path: Path, make_images, model_args: list[str]) -> None:
    from tests.test_cli import run as cli

    make_images(tmp_path / "pics", 4)
    assert cli("index", str(tmp_path / "pics"), "--library", str(tmp_path / "lib"), *model_args, "-q").exit_code == 0
    result = cli("optimize", "--library", str(tmp_path / "lib"), "--ray", "auto", "--json")
    assert result.exit_code == 0, result.output
    assert '"index_type": "flat"' in result.output  # too small to shard: built here
    assert Library.open(tmp_path / "lib").check()["ok"]
