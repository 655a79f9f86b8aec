"""One engine process per device; HTTP workers only speak HTTP.

Before, every uvicorn worker held its own copy of each model, its own batchers and its own
CUDA context, so requests reached the GPU in small batches (a mean of ~12 images under
256 clients on the H200) split over contexts that time-slice one GPU. Now:

- **HTTP workers** (any number) parse, validate and probe each image's header, answer
  errors, and hand the compressed bytes to the engine: written once into a shared-memory
  arena of their own (:mod:`.arena`), with a small header over a Unix socket (:mod:`.wire`).
  No image byte is pickled or sent through a pipe.
- **The engine** (:mod:`.server`, one per device) owns the device: the store's models, one
  queue per model for all workers, dynamic batching, the decode stage that overlaps compute,
  CUDA graphs. It answers each image to the worker and request it came from.
- **The supervisor** (:mod:`.supervisor`) starts the engines and restarts one that dies;
  while it is down, workers answer 503 at once and ``/readyz`` says why (:mod:`.client`).
"""
