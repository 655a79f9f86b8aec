"""An HTTP worker's view of the models the engines serve, shaped like the in-process pool.

The request path, ``/models`` and ``/readyz`` use it as they use
:class:`~app.serving.pool.ModelPool`: each model's manifest, preprocessing (the worker probes
headers itself) and labels come from the store; its state, devices and queue depth come
from the engines' status frames; its batcher forwards images to an engine.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from app.config import Settings
from app.serving.engine.arena import ShmArena
from app.serving.engine.client import EngineLink, RemoteBatcher
from app.serving.labels import class_names
from app.serving.metrics import Metrics
from app.serving.pool import ModelPool, ModelState, ServedModel
from app.serving.preprocess import Preprocessor
from app.store import ModelStore, StoreError

log = logging.getLogger(__name__)

SOCKETS_ENV = "VITSERVE_ENGINE_SOCKETS"  # set by the supervisor for the HTTP workers


def engine_sockets() -> list[Path]:
    value = os.environ.get(SOCKETS_ENV, "")
    return [Path(p) for p in value.split(os.pathsep) if p]


class EnginePool(ModelPool):
    """The models as an HTTP worker sees them: served by engine processes."""

    def __init__(
        self, settings: Settings, store: ModelStore, metrics: Metrics, sockets: list[Path]
    ) -> None:
        # The pool's decode threads serve compare mode here: it decodes each image once, in
        # the worker, for all its variants.
        super().__init__(settings, store, metrics)
        # Room for a full request twice over: the next request's images go in while the
        # engine still holds the last one's.
        self.arena = ShmArena(max(64 << 20, 2 * settings.max_upload_bytes))
        self.links = [EngineLink(path, self.arena, on_status=self.refresh) for path in sockets]

    async def start(self) -> None:
        torch.set_num_threads(1)  # a worker only probes headers and ranks nothing
        for name in self.selected_names():
            model = ServedModel(name, ModelState.LOADING)
            model.batcher = RemoteBatcher(name, self.links)
            try:
                model.manifest = self.store.manifest(name)
                model.preprocessor = Preprocessor(
                    model.manifest.preprocessing, self.settings.max_image_pixels
                )
                model.labels = class_names(model.manifest.labels)
            except StoreError as exc:  # the engine reports it failed, with this reason
                log.debug("model %s: %s", name, exc)
            self.models[name] = model
            self.metrics.declare_model(name)
        for link in self.links:
            link.start()

    async def wait_loaded(self) -> None:  # the engines load; this worker has nothing to wait on
        return None

    async def stop(self) -> None:
        for link in self.links:
            await link.stop()
        self.decode_pool.shutdown(wait=True)
        self.arena.close()

    def refresh(self) -> None:
        """Take each model's state from the engines: ready where any engine serves it."""
        up = [link for link in self.links if link.up]
        for model in self.models.values():
            views = [link.status["models"].get(model.name) for link in up]
            views = [v for v in views if v]
            if not views:
                model.state = ModelState.LOADING
                model.reason = "waiting for the engine" if not up else "not in the engine"
                continue
            ready = [v for v in views if v["state"] == "ready"]
            best = ready[0] if ready else views[0]
            model.state, model.reason = ModelState(best["state"]), best["reason"]
            model.devices = [d for v in ready for d in v["devices"]]
            model.dtype = best["dtype"]
        self.metrics.workers_ready.set(1 if super().readiness()[0] else 0)

    def readiness(self) -> tuple[bool, str]:
        """Ready once every engine has come up and loaded (each device serves from the
        start); later, while one engine of several restarts, the others keep it ready."""
        self.refresh()
        down = [link for link in self.links if not link.up]
        if len(down) == len(self.links):
            return False, "the engine is down (being restarted)"
        starting = [str(link.socket_path) for link in down if link.restarts < 0]
        if starting:
            return False, f"engines still starting: {starting}"
        loading = sorted(
            name
            for link in self.links
            if link.up
            for name, view in link.status["models"].items()
            if view["state"] == "loading"
        )
        if loading:
            return False, f"still loading: {loading}"
        ready, detail = super().readiness()
        if ready and down:
            return True, f"ready; {len(down)} of {len(self.links)} engines down"
        return ready, detail

    def engines(self) -> list[dict]:
        return [
            {
                "socket": str(link.socket_path),
                "up": link.up,
                "pid": link.status["pid"] if link.up else None,
                "restarts": max(0, link.restarts),
            }
            for link in self.links
        ]
