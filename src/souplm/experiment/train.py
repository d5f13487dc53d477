"""A small resumable training loop: phases of AdamW steps with periodic checkpoints and a tqdm bar.

Batches are a pure function of the step number (see `epoch_order`), so resuming needs no data-loader
state: the checkpoint holds the model, the optimizer, the phase and step, the RNG states and the wall
time spent so far. A killed build restarts at its last checkpoint, at most `checkpoint_every_s` behind.
"""

from __future__ import annotations

import math
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from souplm.experiment.prompts import IGNORE

CHECKPOINT = "checkpoint.pt"


@dataclass
class Phase:
    """One run of optimizer steps over a fixed set of trainable parameters.

    `param_groups(model)` returns AdamW groups (each with its own `lr`); every other parameter is
    frozen for the phase. `batch(step)` returns the keyword arguments of `model(...)`, labels included.
    """

    name: str
    steps: int
    param_groups: Callable[[torch.nn.Module], list[dict]]
    batch: Callable[[int], dict]
    warmup: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    min_lr_ratio: float = 0.1


def labelled_loss(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Causal-LM cross-entropy over labelled tokens, computing logits only where there is a label.

    Equal to the transformers loss (mean over tokens whose label is not IGNORE), but chat examples label a
    few answer tokens out of ~100-170, and the 49k-way output layer on every position would otherwise be
    a quarter of the step's compute.
    """
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    hidden = model.model(**inputs, use_cache=False).last_hidden_state[:, :-1]
    targets = batch["labels"][:, 1:].to(hidden.device)
    keep = targets != IGNORE
    logits = model.lm_head(hidden[keep])
    return torch.nn.functional.cross_entropy(logits.float(), targets[keep])


def lr_factor(step: int, steps: int, warmup: int, min_ratio: float) -> float:
    """Linear warm-up, then cosine decay to `min_ratio` of the peak."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    span = max(1, steps - warmup)
    progress = min(1.0, (step - warmup) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def epoch_order(n: int, step: int, per_step: int, seed: int) -> list[int]:
    """Indices of the examples for `step`: a fresh seeded permutation of range(n) every epoch."""
    out: list[int] = []
    pos = step * per_step
    while len(out) < per_step:
        epoch, offset = divmod(pos, n)
        perm = np.random.default_rng([seed, epoch]).permutation(n)
        take = min(per_step - len(out), n - offset)
        out.extend(int(i) for i in perm[offset:offset + take])
        pos += take
    return out


def pad_batch(examples: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad (ids, labels) pairs into input_ids, attention_mask and labels tensors."""
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (ids, labs) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(labs)] = torch.tensor(labs)
        mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


_WRITTEN_HERE: set[Path] = set()  # checkpoints this process saved: continuing from one is not a resume


def _save(path: Path, state: dict) -> None:
    # Write then rename, so a kill during the (multi-second) write leaves the previous checkpoint intact.
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    _WRITTEN_HERE.add(path.resolve())


def _rng_state() -> dict:
    # Only tensors and plain Python values, so the checkpoint loads with torch.load(weights_only=True).
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)]}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


def train_phases(
    model: torch.nn.Module,
    phases: list[Phase],
    work_dir: Path,
    desc: str,
    checkpoint_every_s: float = 300.0,
) -> dict:
    """Run `phases` in order on `model`, resuming from `work_dir/checkpoint.pt` if one is there.

    Returns a summary: per phase the loss curve and the training seconds (summed over resumed runs).
    The checkpoint is left in place; the caller deletes it once the trained model is saved.
    """
    ckpt_path = Path(work_dir) / CHECKPOINT
    state = torch.load(ckpt_path, weights_only=True) if ckpt_path.exists() else None
    start_phase, start_step = 0, 0
    history: dict = {"phases": {}}
    spent = 0.0
    if state is not None:
        model.load_state_dict(state["model"])
        start_phase, start_step = state["phase"], state["step"]
        history, spent = state["history"], state["elapsed"]
        _set_rng_state(state["rng"])
        if ckpt_path.resolve() not in _WRITTEN_HERE:  # e.g. LLaVA's stage 1 then stages 1+2 in one build
            tqdm.write(f"[{desc}] resuming at phase {phases[start_phase].name} step {start_step}", file=sys.stderr)
    began = time.monotonic()
    model.train()
    for index, phase in enumerate(phases):
        if index < start_phase:
            continue
        resume_here = state is not None and index == start_phase
        step = start_step if resume_here else 0
        if step >= phase.steps:
            continue
        for p in model.parameters():
            p.requires_grad_(False)
        groups = phase.param_groups(model)
        for group in groups:
            group["peak_lr"] = group["lr"]
            for p in group["params"]:
                p.requires_grad_(True)
        trainable = [p for g in groups for p in g["params"]]
        optimizer = torch.optim.AdamW(groups, weight_decay=phase.weight_decay)
        if resume_here and state.get("optimizer") is not None:
            optimizer.load_state_dict(state["optimizer"])
        record = history["phases"].setdefault(phase.name, {"steps": phase.steps, "loss": []})
        last_save = phase_began = time.monotonic()
        first_step = step
        smooth = None
        bar = tqdm(total=phase.steps, initial=step, desc=f"{desc}/{phase.name}", unit="step",
                   mininterval=1.0 if sys.stderr.isatty() else 20.0, dynamic_ncols=True)
        while step < phase.steps:
            scale = lr_factor(step, phase.steps, phase.warmup, phase.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = group["peak_lr"] * scale
            loss = labelled_loss(model, phase.batch(step))
            loss.backward()
            if phase.grad_clip:
                torch.nn.utils.clip_grad_norm_(trainable, phase.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            value = float(loss.detach())
            record["loss"].append(round(value, 5))
            smooth = value if smooth is None else 0.9 * smooth + 0.1 * value
            bar.set_postfix(loss=f"{smooth:.3f}", lr=f"{optimizer.param_groups[0]['lr']:.1e}", refresh=False)
            bar.update(1)
            if step % 25 == 0 and not sys.stderr.isatty():
                # A plain line now and then: logs of background builds are read with tail/grep.
                rate = (time.monotonic() - phase_began) / max(1, step - first_step)
                tqdm.write(f"[{desc}] {phase.name} step {step}/{phase.steps} loss {smooth:.3f} "
                           f"({rate:.1f} s/step)", file=sys.stderr)
            if step == phase.steps or time.monotonic() - last_save > checkpoint_every_s:
                record["seconds"] = round(spent + time.monotonic() - began, 1)
                _save(ckpt_path, {
                    "phase": index, "step": step, "model": model.state_dict(),
                    "optimizer": optimizer.state_dict() if step < phase.steps else None,
                    "rng": _rng_state(), "history": history,
                    "elapsed": spent + time.monotonic() - began,
                })
                last_save = time.monotonic()
        bar.close()
        tqdm.write(f"[{desc}] {phase.name}: {phase.steps} steps, loss {record['loss'][0]:.3f} -> "
                   f"{np.mean(record['loss'][-10:]):.3f}", file=sys.stderr)
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    history["train_seconds"] = round(spent + time.monotonic() - began, 1)
    return history
