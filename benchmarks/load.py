"""Load test of `clipdex serve` on loopback: concurrent clients, zero errors, p50/p95 latency.

    .venv/bin/python benchmarks/load.py [--clients 20] [--queries 50] [--images 300]
                                        [--model CONFIG.json --pretrained CHECKPOINT]

Makes its own images and library in a temporary folder (a tiny open_clip model with
random weights unless --model/--pretrained name another), starts `clipdex serve` with a
token in a subprocess on a free 127.0.0.1 port, runs CLIENTS concurrent clients of
QUERIES requests each, prints a table per kind of request, stops the server and exits 1
if any request failed. Every request goes to 127.0.0.1 and the run is bounded in count.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import httpx

ROOT = Path(__file__).resolve().parent.parent
TINY_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
COLOURS = ("red", "green", "blue", "yellow", "black", "white", "orange", "purple")
THINGS = ("dog", "cat", "beach", "mountain", "car", "tree", "house", "boat", "bird", "flower")
# What the clients send, in proportion.
MIX = ("text",) * 4 + ("like", "like", "filtered", "filtered", "image", "thumbnail")
REQUEST_TIMEOUT_SECONDS = 60.0
STARTUP_TIMEOUT_SECONDS = 180.0


@dataclass
class LoadReport:
    latencies_ms: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def requests(self) -> int:
        return sum(len(values) for values in self.latencies_ms.values()) + len(self.errors)

    def table(self) -> str:
        rows = [("request", "count", "p50 ms", "p95 ms", "max ms")]
        everything: list[float] = []
        for kind in sorted(self.latencies_ms):
            values = self.latencies_ms[kind]
            everything += values
            rows.append(_row(kind, values))
        rows.append(_row("all", everything))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(cell.rjust(width) if i else cell.ljust(width) for i, (cell, width) in enumerate(zip(row, widths))) for row in rows]
        lines.insert(1, "  ".join("-" * width for width in widths))
        rate = self.requests / self.seconds if self.seconds else 0.0
        lines.append(f"\n{self.requests} requests in {self.seconds:.1f} s ({rate:.0f}/s), {len(self.errors)} errors")
        return "\n".join(lines)

    def percentile(self, fraction: float) -> float:
        return _percentile(sorted(v for values in self.latencies_ms.values() for v in values), fraction)


def _percentile(ordered: Sequence[float], fraction: float) -> float:
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


def _row(name: str, values: list[float]) -> tuple[str, ...]:
    ordered = sorted(values)
    return (name, str(len(ordered)), f"{_percentile(ordered, 0.5):.1f}", f"{_percentile(ordered, 0.95):.1f}",
            f"{ordered[-1] if ordered else 0:.1f}")


def _request(kind: str, ids: Sequence[int], image: bytes, rng: random.Random) -> dict[str, Any]:
    """The arguments of one request of `kind`, for httpx's `request`."""
    text = f"a photo of a {rng.choice(COLOURS)} {rng.choice(THINGS)}"
    if kind == "text":
        return {"method": "POST", "url": "/search", "json": {"text": text, "k": 20}}
    if kind == "like":
        return {"method": "POST", "url": "/search", "json": {"like": [rng.choice(ids)], "k": 20}}
    if kind == "filtered":
        body = {"text": text, "minus": "blurry", "kind": "image", "path": "*img0*", "min_width": 8, "k": 10}
        return {"method": "POST", "url": "/search", "json": body}
    if kind == "image":
        return {"method": "POST", "url": "/search/image", "files": {"image": ("query.png", image, "image/png")}, "data": {"k": "10"}}
    return {"method": "GET", "url": f"/items/{rng.choice(ids)}/thumbnail", "params": {"size": 128}}


async def _client(client: httpx.AsyncClient, number: int, queries: int, ids: Sequence[int], image: bytes, report: LoadReport) -> None:
    rng = random.Random(number)
    for _ in range(queries):
        kind = rng.choice(MIX)
        started = time.perf_counter()
        try:
            response = await client.request(**_request(kind, ids, image, rng))
        except httpx.HTTPError as error:
            report.errors.append(f"{kind}: {type(error).__name__}: {error}")
            continue
        if response.status_code != 200:
            report.errors.append(f"{kind}: HTTP {response.status_code}: {response.text[:200]}")
            continue
        report.latencies_ms[kind].append((time.perf_counter() - started) * 1000)


async def _run(base_url: str, ids: Sequence[int], image: bytes, clients: int, queries: int, token: str | None) -> LoadReport:
    report = LoadReport()
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base_url, headers=headers, limits=limits, timeout=REQUEST_TIMEOUT_SECONDS) as client:
        started = time.perf_counter()
        await asyncio.gather(*(_client(client, number, queries, ids, image, report) for number in range(clients)))
        report.seconds = time.perf_counter() - started
    return report


def run_load(base_url: str, ids: Sequence[int], image: bytes, clients: int = 20, queries: int = 50,
             token: str | None = None) -> LoadReport:
    """CLIENTS concurrent clients each sending QUERIES requests (a mix, see MIX) to a running server.

    `ids`: ids of image items (for "more like this" and thumbnails); `image`: a query image's bytes.
    """
    if not base_url.startswith(("http://127.", "http://localhost", "http://[::1]")):
        raise ValueError(f"the load test only targets this machine's loopback, not {base_url}")
    return asyncio.run(_run(base_url, ids, image, clients, queries, token))


# -- a library and a server of its own --------------------------------------------------------


def write_images(folder: Path, count: int) -> list[Path]:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for number in range(count):
        rng = np.random.default_rng(number)
        pixels = rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)
        pixels[:48, :64] = rng.integers(0, 256, 3, dtype=np.uint8)
        path = folder / f"img{number:04d}.png"
        Image.fromarray(pixels, "RGB").save(path)
        paths.append(path)
    return paths


def tiny_model(folder: Path) -> tuple[str, str]:
    """A small open_clip config and a checkpoint of seeded random weights."""
    import open_clip
    import torch

    config = folder / "load-tiny-clip.json"
    config.write_text(json.dumps(TINY_CONFIG))
    open_clip.add_model_config(config)
    torch.manual_seed(0)
    checkpoint = folder / "load-tiny-clip.pt"
    torch.save({"state_dict": open_clip.create_model("load-tiny-clip", pretrained=None).state_dict()}, checkpoint)
    return str(config), str(checkpoint)


def build_library(folder: Path, images: int, model: str | None, pretrained: str | None) -> tuple[Path, list[int]]:
    sys.path.insert(0, str(ROOT))
    from clipdex.indexer import index_paths
    from clipdex.search.library import Library
    from clipdex.search.encoders.model import ModelSpec

    if model is None or pretrained is None:
        model, pretrained = tiny_model(folder)
    library_path = folder / "library"
    with Library.open(library_path, model=ModelSpec(model, pretrained), create=True, device="cpu") as library:
        report = index_paths(library, [str(path) for path in write_images(folder / "images", images)])
        if report.failed:
            raise RuntimeError(f"indexing failed: {report.failed[:3]}")
        ids = library.catalog.ids().tolist()
    return library_path, ids


def free_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_server(library: Path, port: int, token: str) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "clipdex.cli", "serve", "--library", str(library), "--host", "127.0.0.1",
               "--port", str(port), "--device", "cpu"]
    environment = {**os.environ, "CLIPDEX_TOKEN": token}
    server = subprocess.Popen(command, cwd=ROOT, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"clipdex serve exited: {server.stderr.read().decode()[-2000:] if server.stderr else ''}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1.0).status_code == 200:
                return server
        except httpx.HTTPError:
            time.sleep(0.2)
    stop_server(server)
    raise RuntimeError(f"clipdex serve did not answer on port {port} within {STARTUP_TIMEOUT_SECONDS:.0f} s")


def stop_server(server: subprocess.Popen[bytes]) -> None:
    server.terminate()
    try:
        server.wait(timeout=15)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--queries", type=int, default=50, help="requests per client")
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--model", help="open_clip model config JSON or name (default: a tiny random model)")
    parser.add_argument("--pretrained", help="checkpoint file or pretrained tag for --model")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="clipdex-load-") as scratch:
        folder = Path(scratch)
        started = time.perf_counter()
        library, ids = build_library(folder, args.images, args.model, args.pretrained)
        print(f"library of {len(ids)} images built in {time.perf_counter() - started:.1f} s", file=sys.stderr)
        token = secrets.token_urlsafe(24)
        port = free_loopback_port()
        server = start_server(library, port, token)
        try:
            image = (folder / "images" / "img0000.png").read_bytes()
            base_url = f"http://127.0.0.1:{port}"
            run_load(base_url, ids, image, clients=2, queries=3, token=token)  # warm-up
            report = run_load(base_url, ids, image, clients=args.clients, queries=args.queries, token=token)
        finally:
            stop_server(server)
    print(f"{args.clients} clients x {args.queries} requests against clipdex serve on 127.0.0.1\n")
    print(report.table())
    for error in report.errors[:10]:
        print(f"error: {error}", file=sys.stderr)
    return 1 if report.errors else 0


if __name__ == "__main__":
    sys.exit(main())
