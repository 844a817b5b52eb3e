"""When the control map and the class disagree, which wins, and how do --control-scale and --control-cond-only
trade one for the other? The Canny maps of the first 200 MNIST test digits, each sampled with the class
(own digit + 5) mod 10 (UniPC-2, 20 steps, guidance 2, the same noise for every setting); the shipped classifier
says whether the sample reads as the class asked or as the map's digit, and edge F1 how closely it follows the map.

    python benchmarks/controlnet_conflict.py        # needs runs/mnist-canny (docs/RESULTS.md, "ControlNet")
"""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from kakusan.pipeline import Pipeline  # noqa: E402
from kakusan.data import load_dataset  # noqa: E402
from kakusan.data.datasets import to_uint8  # noqa: E402
from kakusan.control import control_maps, edge_f1  # noqa: E402
from kakusan.metrics.features import load_extractor  # noqa: E402
pipe = Pipeline.load("runs/mnist-canny", device="cpu")
d = load_dataset("mnist:../shared/data/mnist", split="test")
imgs, labels = d.images[:200], d.labels[:200]
maps = control_maps(imgs, "canny")
hint = (maps * 255).to(torch.uint8)
ask = [(int(c) + 5) % 10 for c in labels]
ext = load_extractor("classifier:weights/classifier-mnist.safetensors")
out = {}
for name, kw in (("scale 1", dict(control_scale=1.0)), ("scale 0.5", dict(control_scale=0.5)),
                 ("scale 0.3", dict(control_scale=0.3)), ("scale 1, cond only", dict(control_scale=1.0, control_cond_only=True))):
    g = pipe(class_label=ask, guidance=2.0, seed=0, batch_size=200, control=hint, **kw)
    _, logits = ext(to_uint8(g.images), what=name)
    pred = torch.as_tensor(logits).argmax(1)
    out[name] = {"asked_class": (pred == torch.tensor(ask)).float().mean().item(),
                 "map_digit_class": (pred == labels).float().mean().item(),
                 "edge_f1": edge_f1(maps, to_uint8(g.images)).mean().item()}
    print(name, out[name], flush=True)
json.dump(out, open("benchmarks/results/controlnet_mnist_conflict.json", "w"), indent=2)
