"""The one training loop and command line the three pancreas trainers share.

Why: stages 1-3 differ in their network, their data and their loss, never in how a run is driven
(seeding, AdamW with warm-up and cosine decay, logging, checkpoint, ONNX export checked against
onnxruntime, a post-export check on calibration seeds, a validated card). Each stage describes
itself as a ``Stage``; ``main(stage, argv)`` does the rest, so a fix to the loop reaches all three.

    python -m edgescreen.models.train.ct_stage1 [--n 120] [--steps 2600] [--init models/pancreas.stage1.onnx]
"""

from __future__ import annotations

import argparse
import json
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgescreen.models.train.ct_export import (
    export_onnx,
    load_weights,
    save_checkpoint,
    seed_everything,
    write_card,
)
from edgescreen.models.train.ct_nets import n_params, warmup_cosine

MODELS_DIR = Path(__file__).resolve().parents[1]


class Stage(ABC):
    """What makes one pancreas stage: its network, data, loss, export, check and card."""

    role: str
    version: str
    n: int  # training studies (stage 1: volumes)
    steps: int
    batch: int
    seed: int
    lr: float
    weight_decay: float = 1e-4
    input_name: str = "ct"
    output_names: tuple[str, ...] = ()
    dynamic_spatial: bool = False

    @abstractmethod
    def build_model(self) -> torch.nn.Module: ...

    @abstractmethod
    def load(self, n: int) -> tuple[list[int], list[dict[str, np.ndarray]], list[int]]:
        """(seeds, items, seeds the generator rejected) of the training data."""

    @abstractmethod
    def batch_loss(self, model: torch.nn.Module, items: list, rng: np.random.Generator, batch: int
                   ) -> tuple[torch.Tensor, dict[str, float]]:
        """One training batch drawn from ``items``: the loss and its named parts (for the log)."""

    @abstractmethod
    def example(self) -> torch.Tensor:
        """An input of the card's shape for the export and its onnxruntime check."""

    def init_weights(self, model: torch.nn.Module, path: Path) -> None:
        """Start from earlier weights (``--init``): by default the same network's checkpoint or ONNX file."""
        load_weights(model, path)

    def export_view(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module exported to ONNX (a wrapper adding outputs such as ``features``)."""
        return model

    def check(self, onnx_path: Path) -> dict[str, Any]:
        """Figures of the exported graph on calibration seeds (never held-out ones) for the card."""
        return {}

    @abstractmethod
    def card(self, info: dict[str, Any], checked: dict[str, Any]) -> dict[str, Any]: ...

    def describe(self, items: list, seeds: list[int]) -> dict[str, Any]:
        """Facts about the training data worth a line in the log and the card."""
        return {}


def train(stage: Stage, n: int, steps: int, batch: int, seed: int, lr: float, init: Path | None = None,
          log_every: int = 50) -> tuple[torch.nn.Module, dict[str, Any]]:
    rng = seed_everything(seed)
    t0 = time.time()
    seeds, items, skipped = stage.load(n)
    t_data = time.time() - t0
    facts = stage.describe(items, seeds)
    print(f"{stage.role}: {len(items)} training items in {t_data:.0f} s {facts}; generator rejected {skipped}", flush=True)
    model = stage.build_model()
    if init is not None:
        stage.init_weights(model, init)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=stage.weight_decay)
    sched = warmup_cosine(opt, steps)
    model.train()
    t1 = time.time()
    running: dict[str, float] = {}
    for step in range(1, steps + 1):
        loss, parts = stage.batch_loss(model, items, rng, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        for k, v in {"loss": float(loss.detach()), **parts}.items():
            running[k] = running.get(k, 0.0) + v
        if step % log_every == 0:
            shown = " ".join(f"{k} {v / log_every:.3f}" for k, v in running.items())
            print(f"{stage.role} step {step}/{steps} {shown} {time.time() - t1:.0f} s", flush=True)
            running = {}
    info = {"train_seconds": round(time.time() - t1, 1), "data_seconds": round(t_data, 1), "steps": steps,
            "batch": batch, "train_seeds": [seeds[0], seeds[-1]], "params": n_params(model), "n": len(seeds),
            "skipped_seeds": skipped, "seed": seed, "lr": lr, "init": str(init) if init else None, **facts}
    return model, info


def export_and_card(stage: Stage, model: torch.nn.Module, info: dict[str, Any], out: Path) -> Path:
    """Keep the weights, export (checked against torch), check on calibration seeds, write the card."""
    ckpt = save_checkpoint(model, stage.role)
    recipe_path(ckpt).write_text(json.dumps(info, indent=2) + "\n")
    onnx_path = out / f"{stage.role}.onnx"
    export_onnx(stage.export_view(model), stage.example(), onnx_path, stage.input_name, list(stage.output_names),
                dynamic_spatial=stage.dynamic_spatial)
    checked = stage.check(onnx_path)
    print(f"{stage.role} check: {checked}", flush=True)
    write_card(out / f"{stage.role}.json", stage.card(info, checked))
    print(f"{stage.role}: wrote {onnx_path} ({onnx_path.stat().st_size / 1e6:.1f} MB), {info}", flush=True)
    return onnx_path


def recipe_path(checkpoint: Path) -> Path:
    """Where a checkpoint's training facts (the card's recipe) are kept: beside it."""
    return checkpoint.with_name(checkpoint.stem + ".recipe.json")


def main(stage: Stage, argv: list[str] | None = None, doc: str | None = None) -> int:
    ap = argparse.ArgumentParser(description=(doc or stage.role).splitlines()[0])
    ap.add_argument("--n", "--volumes", "--studies", dest="n", type=int, default=stage.n, help="training studies")
    ap.add_argument("--steps", type=int, default=stage.steps)
    ap.add_argument("--batch", type=int, default=stage.batch)
    ap.add_argument("--seed", type=int, default=stage.seed)
    ap.add_argument("--lr", type=float, default=stage.lr)
    ap.add_argument("--out", type=Path, default=MODELS_DIR)
    ap.add_argument("--init", default=None, help="start from a .pt checkpoint or an exported .onnx of the same network")
    ap.add_argument("--export-only", type=Path, default=None, metavar="CHECKPOINT",
                    help="skip training: export this .pt checkpoint (its recipe is read from the .recipe.json beside it)")
    args = ap.parse_args(argv)
    if args.export_only is not None:
        # the run's recipe was saved beside its checkpoint; the card states it, not this command line
        model = stage.build_model()
        load_weights(model, args.export_only)
        info = json.loads(recipe_path(args.export_only).read_text())
        export_and_card(stage, model, info, args.out)
        return 0
    init = Path(args.init) if args.init not in (None, "", "none") else None
    model, info = train(stage, args.n, args.steps, args.batch, args.seed, args.lr, init=init)
    export_and_card(stage, model, info, args.out)
    return 0
