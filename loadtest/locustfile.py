"""Locust load test for vitserve: realistic users on /classify, multi-image and /compare.

Run (from the repository root, server already up on loopback)::

    locust -f loadtest/locustfile.py --host http://127.0.0.1:8000            # web UI :8089
    locust -f loadtest/locustfile.py --host http://127.0.0.1:8000 \
        --headless -u 32 -r 8 -t 1m --tags classify --csv runs/locust

Why it looks like this:

* Bodies are JPEGs (a folder's, or photo-like ones generated in memory, see
  ``app.bench.images``), never noise: upload size and decode time then match real use.
* One user class with weighted, tagged tasks (``classify``, ``multi``, ``compare``), so
  ``--tags`` narrows a run to one scenario without a second file.
* Any status but 200 is a failure whose message starts ``HTTP <status>``: the CI smoke
  test counts 5xx from locust's CSV by that prefix. A 200 whose body does not hold one
  result per image sent is a failure too: a fast wrong answer is not throughput.
* Loopback only: a load test pointed at someone else's server by a typo is an attack.

Configuration: ``--models`` / ``VITSERVE_LOADTEST_MODELS`` (comma list; empty: the ready
models the server lists), ``--images`` / ``VITSERVE_LOADTEST_IMAGES`` (folder; empty:
generated), ``--multi-images`` / ``VITSERVE_LOADTEST_MULTI`` (parts per multi request),
plus all of locust's own options.
"""

from __future__ import annotations

import ipaddress
import random
from typing import Any
from urllib.parse import urlsplit

from locust import HttpUser, between, events, tag, task
from locust.env import Environment

from app.bench.images import content_type, load_images

LOOPBACK_NAMES = ("localhost",)
GENERATED_IMAGES = 12

_images: list[tuple[str, bytes]] = []


@events.init_command_line_parser.add_listener
def _add_arguments(parser: Any) -> None:
    group = parser.add_argument_group("vitserve")
    group.add_argument(
        "--models",
        env_var="VITSERVE_LOADTEST_MODELS",
        default="",
        help="comma-separated store names for ?model=; empty: every ready model",
    )
    group.add_argument(
        "--images",
        env_var="VITSERVE_LOADTEST_IMAGES",
        default="",
        help="folder of images to send; empty: photo-like JPEGs generated in memory",
    )
    group.add_argument(
        "--multi-images",
        env_var="VITSERVE_LOADTEST_MULTI",
        type=int,
        default=4,
        help="images per multi-image request",
    )


def is_loopback(host: str | None) -> bool:
    name = urlsplit(host or "").hostname or ""
    if name in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


@events.init.add_listener
def _on_init(environment: Environment, **_: Any) -> None:
    """Refuse a remote host, and read the images once per process (not per user)."""
    options = environment.parsed_options
    if options is None:
        return
    if environment.host and not is_loopback(environment.host):
        raise SystemExit(f"refusing a non-loopback --host {environment.host!r}")
    _images[:] = load_images(options.images or None, count=GENERATED_IMAGES)


@events.test_start.add_listener
def _check_host(environment: Environment, **_: Any) -> None:
    """The web UI can change the host after init; check it again when a run starts."""
    if not is_loopback(environment.host):
        raise SystemExit(f"refusing a non-loopback host {environment.host!r}")


class VitserveUser(HttpUser):
    """A client app: mostly single images, some albums, the odd A/B comparison."""

    wait_time = between(0.05, 0.5)

    def on_start(self) -> None:
        options = self.environment.parsed_options
        wanted = [m.strip() for m in (options.models if options else "").split(",") if m.strip()]
        self.models = wanted or self._ready_models()
        self.multi = max(1, options.multi_images if options else 4)
        if not _images:  # run as a library (no init event): generate here
            _images[:] = load_images(None, count=GENERATED_IMAGES)

    def _ready_models(self) -> list[str]:
        with self.client.get("/models", name="/models", catch_response=True) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {response.text[:200]}")
                return []
            return [m["name"] for m in response.json()["models"] if m["state"] == "ready"]

    def _files(self, count: int) -> list[tuple[str, tuple[str, bytes, str]]]:
        picked = random.sample(_images, k=min(count, len(_images)))
        return [("file", (name, data, content_type(name))) for name, data in picked]

    def _post(self, path: str, name: str, params: dict[str, Any], images: int) -> None:
        files = self._files(images)
        with self.client.post(
            path, params=params, files=files, name=name, catch_response=True
        ) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {response.text[:200]}")
                return
            body = response.json()
            runs = body["variants"] if path == "/compare" else [body]
            if any(len(run["results"]) != len(files) for run in runs):
                response.failure(f"HTTP 200 with the wrong number of results for {len(files)}")

    @tag("classify")
    @task(6)
    def classify(self) -> None:
        model = random.choice(self.models) if self.models else None
        params = {"top_k": 5, **({"model": model} if model else {})}
        self._post("/classify", f"/classify?model={model or '(default)'}", params, images=1)

    @tag("multi")
    @task(2)
    def classify_multi(self) -> None:
        model = random.choice(self.models) if self.models else None
        params = {"top_k": 3, **({"model": model} if model else {})}
        name = f"/classify?model={model or '(default)'} x{self.multi}"
        self._post("/classify", name, params, images=self.multi)

    @tag("compare")
    @task(1)
    def compare(self) -> None:
        if not self.models:
            return
        # one model alone is compared with itself: the API allows it (a determinism check)
        names = self.models[:4] if len(self.models) > 1 else self.models * 2
        self._post("/compare", "/compare", {"models": ",".join(names), "top_k": 5}, images=2)
