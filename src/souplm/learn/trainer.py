"""Fitting the alphas: the next-token loss on the meta sets, an optimizer over the alphas only.

An epoch is a seeded shuffle of the examples cut into optimizer steps of `grad_accum` micro-batches
of `batch_size` examples. The loss of a step is the mean over its supervised tokens (so long and short
rows weigh by their tokens, however they fall into micro-batches), plus the regularizer once.

After every epoch the trainer writes `checkpoint.pt` (alphas, optimizer, step, RNG, and a fingerprint
of everything the result depends on) atomically; `resume=True` continues from it and ends with the
same alphas as an uninterrupted run, because each epoch's order depends only on (seed, epoch).

Under torchrun (issue 7) the alphas are one replicated tensor (`soup.alphas.raw`) whose gradient is
all-reduced in `_reduce`; rank r takes examples r, r+K, ... of every micro-batch, so the union over
ranks is the single-process batch and, with the token count also summed, the step equals a
single-process step up to float rounding. Rank 0 alone writes the checkpoint and the log; a
checkpoint holds no per-rank state, so a run resumes on any number of processes.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import distributed as D
from ..data.metasets import IGNORE, Example, collate
from ..errors import SoupError
from .regularizers import penalty
from .soup_module import SoupModel

CHECKPOINT = "checkpoint.pt"
LOG = "log.jsonl"


@dataclass
class TrainSettings:
    epochs: int = 3
    batch_size: int = 4
    grad_accum: int = 1
    optimizer: str = "adam"
    lr: float = 0.1
    weight_decay: float = 0.0
    momentum: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    regularization: str = "none"
    reg_lambda: float = 0.0
    seed: int = 0
    log_every: int = 1
    progress: bool = True


@dataclass
class TrainResult:
    steps: int
    epoch_losses: list[float] = field(default_factory=list)  # mean step loss of each epoch
    resumed_from_epoch: int | None = None
    seconds: float = 0.0
    tokens: int = 0


def _logged_step(line: str) -> float:
    """The step a log.jsonl line records; inf (drop it) for a torn or foreign line."""
    try:
        record = json.loads(line)
    except ValueError:
        return math.inf
    if not isinstance(record, dict) or isinstance(record.get("step", 0), bool) \
            or not isinstance(record.get("step", 0), (int, float)):
        return math.inf
    return record.get("step", 0)


def token_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over supervised positions, and their count."""
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    shift_labels = labels[:, 1:].reshape(-1).to(logits.device)
    total = F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE, reduction="sum")
    return total, int((shift_labels != IGNORE).sum())


def alpha_summary(soup: SoupModel) -> dict:
    """Per model: mean / min / max alpha over every learned group (rows flattened)."""
    values = [v.reshape(v.shape[0], -1) for g, v in soup.coefficient_values().items() if g in soup.alphas.slots]
    if not values:
        return {"groups": 0}
    flat = torch.cat(values, dim=1)
    return {
        "groups": len(values),
        "mean": [round(x, 6) for x in flat.mean(1).tolist()],
        "min": [round(x, 6) for x in flat.min(1).values.tolist()],
        "max": [round(x, 6) for x in flat.max(1).values.tolist()],
    }


class Trainer:
    def __init__(
        self,
        soup: SoupModel,
        examples: Sequence[Example],
        settings: TrainSettings,
        *,
        pad_id: int,
        device: torch.device | str = "cpu",
        out_dir: str | os.PathLike | None = None,
        fingerprint: dict | None = None,
    ):
        if not examples:
            raise SoupError("no training examples")
        self.soup = soup
        self.examples = list(examples)
        self.s = settings
        self.pad_id = pad_id
        self.device = torch.device(device)
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.fingerprint = dict(fingerprint or {})
        self.soup.model.eval()  # no dropout: the loss is a deterministic function of the alphas
        self.rank, self.world = D.rank(), D.world_size()  # (0, 1) in a single process
        self.optimizer = self._make_optimizer()
        self.initial_loss: float | None = None  # dev loss at the initial alphas, kept in checkpoints

    # -- pieces --------------------------------------------------------------------------------
    def _make_optimizer(self) -> torch.optim.Optimizer:
        params = [self.soup.alphas.raw]
        s = self.s
        if s.optimizer == "adam":
            return torch.optim.Adam(params, lr=s.lr, betas=s.betas, weight_decay=s.weight_decay)
        if s.optimizer == "adamw":
            return torch.optim.AdamW(params, lr=s.lr, betas=s.betas, weight_decay=s.weight_decay)
        if s.optimizer == "sgd":
            return torch.optim.SGD(params, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay)
        raise SoupError(f"unknown optimizer {s.optimizer!r}; choose adam, adamw or sgd")

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.examples) / (self.s.batch_size * self.s.grad_accum))

    def epoch_plan(self, epoch: int) -> list[list[list[int]]]:
        """Example indices: steps -> micro-batches -> examples. Depends only on (seed, epoch)."""
        g = torch.Generator().manual_seed(self.s.seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.examples), generator=g).tolist()
        b = self.s.batch_size
        micro = [order[i : i + b] for i in range(0, len(order), b)]
        a = self.s.grad_accum
        return [micro[i : i + a] for i in range(0, len(micro), a)]

    def _batch(self, idx: Sequence[int]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        batch = collate([self.examples[i] for i in idx], self.pad_id)
        labels = batch.pop("labels")
        dtype = next(iter(self.soup.model.parameters())).dtype
        moved = {k: v.to(self.device, dtype=dtype if v.is_floating_point() else None) for k, v in batch.items()}
        return moved, labels.to(self.device)

    def _local_batch(self, idx: Sequence[int]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """This rank's part of a (micro-)batch: examples rank, rank + K, ...

        A rank left without examples runs the first one with every label ignored (zero loss, zero
        gradient): all ranks must run the same forwards, since a sharded model all-gathers in each.
        """
        mine = list(idx)[self.rank :: self.world]
        if mine:
            return self._batch(mine)
        batch, labels = self._batch(list(idx)[:1])
        return batch, torch.full_like(labels, IGNORE)

    def _reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over data-parallel ranks, in place: the identity in a single process."""
        return D.all_reduce_sum(t)

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean token loss of the current alphas over every example."""
        from tqdm.auto import tqdm

        total, count = 0.0, 0
        order = list(range(len(self.examples)))
        starts = range(0, len(order), self.s.batch_size)
        for i in tqdm(starts, desc="dev loss", unit="batch", leave=False,
                      disable=not (self.s.progress and D.is_main())):
            batch, labels = self._local_batch(order[i : i + self.s.batch_size])
            s, n = token_loss(self.soup(**batch), labels)
            total += float(s)
            count += n
        total, count = self._reduce(torch.tensor([total, count], dtype=torch.float64)).tolist()
        return total / max(count, 1)

    # -- checkpoints ----------------------------------------------------------------------------
    def _ckpt_path(self) -> Path | None:
        return self.out_dir / CHECKPOINT if self.out_dir else None

    def save_checkpoint(self, epoch: int, step: int, epoch_losses: list[float]) -> None:
        path = self._ckpt_path()
        if path is None or not D.is_main():
            return
        state = {
            "format": "souplm.learn-checkpoint/1",
            "epoch": epoch,
            "step": step,
            "raw": self.soup.alphas.raw.detach().cpu(),
            "optimizer": self.optimizer.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "initial_loss": self.initial_loss,
            "epoch_losses": epoch_losses,
            "fingerprint": json.dumps(self.fingerprint, sort_keys=True),
        }
        tmp = path.with_name(f".{path.name}.tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)  # atomic: a crash mid-save keeps the previous epoch's checkpoint

    def load_checkpoint(self) -> dict | None:
        # Rank 0 reads and checks the file; every rank gets the same state (and the same error).
        state = D.on_main(self._read_checkpoint)
        if state is None:
            return None
        with torch.no_grad():
            self.soup.alphas.raw.copy_(state["raw"].to(self.soup.alphas.raw))
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        self.initial_loss = state.get("initial_loss")
        return state

    def _read_checkpoint(self) -> dict | None:
        path = self._ckpt_path()
        if path is None or not path.is_file():
            return None
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (RuntimeError, ValueError, OSError, EOFError, pickle.UnpicklingError) as e:
            raise SoupError(f"checkpoint {path} cannot be read ({type(e).__name__}); delete it to start over") from None
        saved = json.loads(state["fingerprint"])
        if saved != self.fingerprint:
            diff = sorted(k for k in set(saved) | set(self.fingerprint) if saved.get(k) != self.fingerprint.get(k))
            raise SoupError(
                f"checkpoint {path} belongs to another run (differs in: {', '.join(diff)}); "
                "use another output directory or delete the checkpoint"
            )
        return state

    def _open_log(self, resume_step: int | None):
        if self.out_dir is None or not D.is_main():
            return None
        path = self.out_dir / LOG
        if resume_step is not None and path.is_file():
            # Keep what the checkpoint covers; steps logged after it are about to be redone.
            # A line torn by a kill mid-write (or any line that is not a JSON object) is dropped, not fatal.
            kept = [ln for ln in path.read_text(errors="replace").splitlines() if _logged_step(ln) <= resume_step]
            path.write_text("".join(ln + "\n" for ln in kept))
            return path.open("a")
        return path.open("w")

    # -- the loop -------------------------------------------------------------------------------
    def train(self, resume: bool = False, on_epoch_end: Callable[[int, float], None] | None = None,
              evaluate_first: bool = False) -> TrainResult:
        """Run (or continue) the epochs; `on_epoch_end(epoch, mean_loss)` runs after each checkpoint.

        `evaluate_first` records the dev loss of the initial alphas (`self.initial_loss`) on a fresh run.
        """
        from tqdm.auto import tqdm

        t_start = time.perf_counter()
        torch.manual_seed(self.s.seed)
        start_epoch, step, epoch_losses = 0, 0, []
        result = TrainResult(steps=0)
        state = self.load_checkpoint() if resume else None
        if state is not None:
            start_epoch, step, epoch_losses = state["epoch"], state["step"], list(state["epoch_losses"])
            result.resumed_from_epoch = start_epoch
        elif evaluate_first:
            self.initial_loss = self.evaluate()
        log = self._open_log(step if state is not None else None)
        if log and self.initial_loss is not None and state is None:
            log.write(json.dumps({"event": "eval", "when": "initial", "step": 0, "loss": self.initial_loss}) + "\n")
        bar = tqdm(total=self.s.epochs * self.steps_per_epoch, initial=step,
                   disable=not self.s.progress or not D.is_main(),
                   desc="learning alphas", unit="step", dynamic_ncols=True)
        raw = self.soup.alphas.raw
        try:
            for epoch in range(start_epoch, self.s.epochs):
                losses = []
                for micro_batches in self.epoch_plan(epoch):
                    t0 = time.perf_counter()
                    batches = [self._local_batch(idx) for idx in micro_batches]
                    step_tokens = float(self._reduce(torch.tensor(float(sum(
                        int((lab[:, 1:] != IGNORE).sum()) for _, lab in batches)))))
                    # input tokens of the whole step (all ranks): the attention mask's sum in one process
                    in_tokens = sum(len(self.examples[i].input_ids) for idx in micro_batches for i in idx)
                    data_loss = 0.0
                    for batch, labels in batches:
                        s, _ = token_loss(self.soup(**batch), labels)
                        (s / max(step_tokens, 1.0)).backward()
                        data_loss += s.item() / max(step_tokens, 1.0)
                    data_loss = float(self._reduce(torch.tensor(data_loss, dtype=torch.float64)))
                    reg = penalty(self.s.regularization, self.s.reg_lambda, raw, self.soup.alphas.raw_init,
                                  units=self.soup.alphas.unit_slots())  # per unit (regularizers.py)
                    if reg.requires_grad and self.rank == 0:  # once: the gradients are summed over ranks
                        reg.backward()
                    if raw.grad is not None:
                        self._reduce(raw.grad)
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                    step += 1
                    dt = time.perf_counter() - t0
                    loss = data_loss + float(reg.detach())
                    losses.append(loss)
                    result.tokens += in_tokens
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{in_tokens / dt:.0f}", epoch=epoch + 1)
                    if log and step % self.s.log_every == 0:
                        log.write(json.dumps({
                            "event": "step", "epoch": epoch + 1, "step": step, "loss": loss,
                            "data_loss": data_loss, "reg": float(reg.detach()), "tokens": in_tokens,
                            "tokens_per_s": in_tokens / dt, "lr": self.optimizer.param_groups[0]["lr"],
                        }) + "\n")
                mean = sum(losses) / len(losses)
                epoch_losses.append(mean)
                if log:
                    log.write(json.dumps({"event": "epoch", "epoch": epoch + 1, "step": step, "mean_loss": mean,
                                          "alpha": alpha_summary(self.soup)}) + "\n")
                    log.flush()
                self.save_checkpoint(epoch + 1, step, epoch_losses)
                if on_epoch_end is not None:
                    on_epoch_end(epoch + 1, mean)
        finally:
            bar.close()
            if log:
                log.close()
        result.steps, result.epoch_losses = step, epoch_losses
        result.seconds = time.perf_counter() - t_start
        return result

    def log_event(self, record: dict) -> None:
        """Append one record (e.g. the final evaluation) to the run's log (rank 0 only)."""
        if self.out_dir is not None and D.is_main():
            with (self.out_dir / LOG).open("a") as f:
                f.write(json.dumps(record) + "\n")
