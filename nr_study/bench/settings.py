"""What `nr-study bench` measures at each size: the goals and, per mode (full / quick / tiny) and device, the
shapes and repetition counts, in one place so every row family reads the same settings."""
from __future__ import annotations

import torch

GOALS = {"step": 1.03, "util": 0.01, "surgery": 0.5, "layer": 1.3, "sweep": 1.10, "mlflow": 0.02, "run": 1.10,
         "redo": 1.03, "cbp": 1.10, "heads": 1.05}


class Sizes:
    """Shapes and repetition counts for one mode (full / quick / tiny)."""

    def __init__(self, mode: str, device: torch.device):
        self.mode = mode
        cuda = device.type == "cuda"
        full, quick = mode == "full", mode == "quick"
        # (model name, kwargs, batch, input hw, warmup, reps)
        if cuda:
            self.step_models = [("vgg_small", {}, 128, 32, 3, 15), ("resnet164_cifar", {}, 128, 32, 3, 11),
                                ("vgg19_bn_cifar", {}, 128, 32, 3, 11)]
            if not full:
                self.step_models = [(n, k, b, hw, 2, 7) for n, k, b, hw, _, _ in self.step_models]
        elif full:
            self.step_models = [("vgg_small", {}, 64, 32, 2, 11), ("resnet164_cifar", {}, 32, 32, 1, 7)]
        elif quick:
            self.step_models = [("vgg_small", {}, 32, 32, 1, 7), ("resnet164_cifar", {}, 8, 32, 1, 5)]
        else:  # tiny (tests)
            self.step_models = [("vgg_small", {"width": 8}, 4, 16, 1, 3), ("resnet164_cifar", {}, 2, 8, 1, 3)]
        # the recyclers' rows: steps per timed call (ReDo scores once per call)
        self.recycle_block = 2 if mode == "tiny" else 10
        # surgery: (model name, input shape, num_classes, scheme, rescale); reps
        px = 224 if mode != "tiny" else 64
        self.surgery_models = [("resnet50", (1, 3, px, px), 1000, "ca", True),
                               ("vgg19_bn_cifar", (1, 3, 32, 32), 10, "cr", False)]
        self.surgery_reps = {"full": 5, "quick": 3, "tiny": 2}[mode]
        # single layer: channels, hw, batch, warmup, reps
        self.layer = {"full": (128, 32, 64, 2, 9), "quick": (128, 16, 16, 1, 5), "tiny": (32, 8, 4, 1, 3)}[mode]
        if cuda:
            self.layer = (128, 32, 64, 5, 21) if full else (128, 32, 64, 3, 9)
        # whole runs (BL vs NR, also the MLflow share): model width, input hw, n_train, batch, epochs, pairs
        self.run = {"full": (16, 32, 2048, 64, 4, 3), "quick": (8, 32, 512, 32, 2, 1),
                    "tiny": (4, 16, 256, 16, 2, 1)}[mode]
        if cuda:
            self.run = (32, 32, 8192, 128, 4, 2) if full else (32, 32, 4096, 128, 2, 1)
        self.sweep = {"full": 8, "quick": 4, "tiny": 0}[mode]  # trials of the sweep row; tiny (tests): skipped
        self.sweep_reps = 3 if full else 1  # sweeps per arm, alternated
        # each sweep trial's (training images, epochs): full mode's trials take 10-20 s, as the goal's do
        self.sweep_trial = (4096, 8) if mode == "full" else (512, 3)
        # CA nesting: vgg_small width, input hw, batch, warmup, reps
        self.nest = {"full": (16, 32, 32, 2, 9), "quick": (8, 32, 16, 1, 5), "tiny": (4, 16, 4, 1, 3)}[mode]
