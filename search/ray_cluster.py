"""Connecting to a Ray cluster (`--ray ADDRESS`), for the indexer and `optimize`.

Ray is an optional dependency (`pip install 'clipdex[ray]'`): only this module and the
cluster runners import it, and only when `--ray` is given.

ADDRESS is `auto` (the cluster this machine belongs to, as `ray start` left it), `local`
(a cluster started inside this process, gone when it ends), `ray://host:port` (Ray
Client) or a GCS address `host:port`. A process already connected to Ray (a test, a
notebook) keeps its connection, whatever the address.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

from clipdex.search.errors import ClusterError

INSTALL_HINT = "Ray is not installed: pip install 'clipdex[ray]' (on the driver and on every node of the cluster)"


def ray_module() -> Any:
    """`ray`, or ClusterError with the install hint."""
    try:
        import ray
        import ray.data  # noqa: F401  (Ray Data comes with the extra; a bare `ray` lacks its needs)
    except ImportError as error:
        raise ClusterError(f"{INSTALL_HINT} ({error})") from error
    return ray


@contextmanager
def ray_session(address: str) -> Iterator[Any]:
    """Yield `ray`, connected to the cluster at `address`; a connection made here is closed after."""
    ray = ray_module()
    _quiet_ray_data()
    if ray.is_initialized():
        yield ray
        return
    options: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.WARNING, "include_dashboard": False,
                               "configure_logging": True}
    options["address"] = address  # `local` starts a cluster in this process, whatever runs elsewhere
    if address != "local":
        options.pop("include_dashboard")  # a setting of the cluster, not of a driver joining it
    try:
        ray.init(**options)
    except ray.exceptions.AuthenticationError as error:  # RAY_AUTH_MODE=token, and no token here (or another one)
        reason = str(error).strip().split(". ")[0].rstrip(".")
        raise ClusterError(f"cannot connect to the Ray cluster at {address!r}: {reason}; put the cluster's token (the "
                           "head's ~/.ray/auth_token, made by `ray get-auth-token --generate`) at ~/.ray/auth_token "
                           "here, or name its file in RAY_AUTH_TOKEN_PATH") from error
    except (ConnectionError, RuntimeError, ValueError) as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ClusterError(f"cannot connect to the Ray cluster at {address!r}: {message[:300]} "
                           "(start one with `ray start --head`, or pass --ray local)") from error
    try:
        yield ray
    finally:
        ray.shutdown()


def _quiet_ray_data() -> None:
    """No progress bars or execution logs from Ray Data: stdout is for results, stderr for clipdex's progress."""
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    if hasattr(context, "print_on_execution_start"):
        context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def cluster_cpus(ray: Any) -> int:
    return int(ray.cluster_resources().get("CPU", 0))


def cluster_gpus(ray: Any) -> int:
    return int(ray.cluster_resources().get("GPU", 0))


def check_paths_visible(ray: Any, paths: Sequence[str]) -> None:
    """Fail with ClusterError when a node of the cluster cannot see one of `paths` (at that same path).

    Workers read the files themselves: the files must live on a filesystem every node
    mounts at the same place.
    """
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=0)
    def missing(wanted: list[str]) -> list[str]:
        return [path for path in wanted if not os.path.exists(path)]

    nodes = [node for node in ray.nodes() if node.get("Alive")]
    checks = [
        (node, missing.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)).remote(list(paths)))
        for node in nodes
    ]
    for node, check in checks:
        lost = ray.get(check)
        if lost:
            raise ClusterError(
                f"Ray node {node.get('NodeManagerAddress', node['NodeID'])} cannot see {lost[0]}: the files (and the "
                "model's checkpoint) must be on a filesystem that every node mounts at the same path"
            )
