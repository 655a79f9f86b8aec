"""Average a cross-fitted recipe's seeds, fold by fold (a uniform model soup), into the
store as ``<recipe>-soup-s0-fold-<part>``, so that the soup is cross-fitted like its seeds:
each fold's soup has seen only that fold's photos. Then score it as a recipe of one seed:

    python3 bench/scripts/soup_folds.py /tmp/cross-fit/store deit_tiny-merge-t5-gpu-dv 0 1 2
    python -m app.bench.fidelity --store /tmp/cross-fit/store --teacher deit_tiny_patch16_224 \\
        --images ../shared/images/imagenet-dev /tmp/cross-fit/extra-a /tmp/cross-fit/extra-b \\
        --entries deit_tiny-merge-t5-gpu-dv-soup-s0-fold-{a,b} \\
        --cross-fit deit_tiny-merge-t5-gpu-dv-soup --seeds 0
"""

import sys
from pathlib import Path

from safetensors.torch import load_file

from app.store import ModelStore

store, recipe, seeds = ModelStore(Path(sys.argv[1])), sys.argv[2], sys.argv[3:]
for part in "ab":
    folds = [f"{recipe}-s{seed}-fold-{part}" for seed in seeds]
    weights = [load_file(store.root / fold / "model.safetensors") for fold in folds]
    soup = {key: sum(w[key] for w in weights) / len(weights) for key in weights[0]}
    name = f"{recipe}-soup-s0-fold-{part}"
    store.write_entry(store.manifest(folds[0]).model_copy(update={"name": name}), soup)
    print(f"wrote {name} from {', '.join(folds)}")
