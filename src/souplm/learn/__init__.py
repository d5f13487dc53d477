"""Learnable and regularized soups (SoupLM's central method): fit per-unit alphas on a tiny dev set.

    from souplm.learn import learn
    result = learn("soup.yaml")          # or a dict / LearnConfig
    result.table.coefficients["layers.3.q"]   # [alpha_model1, alpha_model2]

The bases stay frozen; only the mixing weights are trained, inside a model that merges every weight
on the fly (`soup_module`). The result is a coefficient table (`coefficients.json`) and, through the
merge engine, a merged model (`merged/`) with the base architecture and no extra inference cost.

Under `torchrun` (after `souplm.distributed.init()`; the CLI does it) the bases are sharded over the
processes with FSDP2 and the dev set is split between them (`sharding.py`, docs/SCALING.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..engine.coefficients import CoefficientTable
from ..errors import SoupError
from .config import LearnConfig, load_config

__all__ = ["LearnConfig", "LearnResult", "learn", "load_config"]

TABLE = "coefficients.json"
MERGED = "merged"
EMBED, LM_HEAD = "model.embed_tokens.weight", "lm_head.weight"


@dataclass
class LearnResult:
    table: CoefficientTable
    table_path: Path
    merged_dir: Path | None
    initial_loss: float | None
    final_loss: float | None
    steps: int
    epoch_losses: list[float] = field(default_factory=list)
    resumed_from_epoch: int | None = None


class _VocabExtended:
    """A checkpoint whose embedding / lm_head gain the output model's extra rows (vocab_policy: extend).

    With alphas summing to 1 the extra rows come out as the output model's own, which is what the
    engine's `extend` policy writes, so the learned soup and the merged model agree.
    """

    def __init__(self, ck, donor, rows: int):
        self.ck, self.donor, self.rows = ck, donor, rows

    def get_canonical(self, name: str, dtype=None):
        import torch

        t = self.ck.get_canonical(name, dtype=dtype or torch.float32)
        if name in (EMBED, LM_HEAD) and t.shape[0] < self.rows:
            extra = self.donor.get_canonical(name, dtype=t.dtype)[t.shape[0] : self.rows]
            t = torch.cat([t, extra])
        return t


def _rows(ck, name: str) -> int:
    return ck.shape(ck.stored_name(name))[0]


def _check_models(cfg: LearnConfig, cks: list, s: int) -> list:
    """Same tying and vocabulary across models (or an `extend` adapter); returns the other sources."""
    names = cfg.models
    for i, ck in enumerate(cks):
        if ck.tied != cks[s].tied:
            tied, untied = (names[i], names[s]) if ck.tied else (names[s], names[i])
            raise SoupError(f"{tied} ties lm_head to the embedding and {untied} does not; a soup needs both alike")
    sources = []
    for i, ck in enumerate(cks):
        if i == s:
            continue
        mine, theirs = _rows(cks[s], EMBED), _rows(ck, EMBED)
        if mine == theirs:
            sources.append(ck)
        elif cfg.vocab_policy == "extend" and theirs < mine:
            sources.append(_VocabExtended(ck, cks[s], mine))
        elif theirs > mine:
            raise SoupError(
                f"{names[i]} has {theirs} vocabulary rows, more than the output model {names[s]} ({mine}); "
                "set output_model to the model with the larger vocabulary"
            )
        else:
            raise SoupError(
                f"vocabulary size differs: {names[s]} has {mine} rows, {names[i]} has {theirs}; set "
                "vocab_policy: extend (shared rows are souped, the extra rows come from the output model)"
            )
    return sources


def _load_model(path: str, multimodal: bool, dtype):
    import transformers

    if not (Path(path) / "config.json").is_file():
        raise SoupError(f"{path}: no config.json, so transformers cannot build the model's architecture")
    cls = transformers.AutoModelForImageTextToText if multimodal else transformers.AutoModelForCausalLM
    try:
        return cls.from_pretrained(path, dtype=dtype)
    except (ValueError, OSError) as e:
        raise SoupError(f"{path}: transformers cannot load the model: {str(e).splitlines()[0]}") from None


def _load_tokenizer(path: str, want_processor: bool):
    from transformers import AutoProcessor, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (ValueError, OSError) as e:
        raise SoupError(f"{path}: no usable tokenizer ({str(e).splitlines()[0]}); set `tokenizer:` in the config") from None
    processor = None
    if want_processor:
        try:
            processor = AutoProcessor.from_pretrained(path)
        except (ValueError, OSError, TypeError):
            processor = None  # image rows then fail with a message naming the row
    return tokenizer, processor


def _prepare_output(out: Path, resume: bool, force: bool, models: list[str], staged: dict) -> Path:
    """The folder this run writes in: `out`, or (--force over an earlier run) a staging folder beside it.

    The earlier run's results stay in `out` until the new run has finished (`_finish_output`), so an
    interrupted `--force` run loses nothing.
    """
    from ..io.output import AtomicDir, check_output
    from .trainer import CHECKPOINT, LOG

    check_output(out, inputs=models, what="learn output")
    ours = [out / CHECKPOINT, out / LOG, out / TABLE, out / MERGED]
    if not resume and any(p.exists() for p in ours):
        if not force:
            raise SoupError(
                f"{out} holds an earlier learn run; pass --resume to continue it or --force to start over"
            )
        staged["dir"] = AtomicDir(out, force=True, what="learn output")
        return staged["dir"].open()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        from ..io.output import os_error

        raise os_error(e, "cannot create the learn output") from None
    return out


def _finish_output(out: Path, work: Path, staged: dict) -> None:
    """Put a --force run in place of the earlier one: the user's other files come along, then one exchange."""
    from ..io.output import fault
    from .trainer import CHECKPOINT, LOG

    ad = staged.pop("dir", None)
    if ad is None:
        return
    try:
        fault("learn-finished", out)
        ours = {CHECKPOINT, LOG, TABLE, MERGED}
        for p in out.iterdir():
            if p.name not in ours and not (work / p.name).exists():
                if p.is_dir() and not p.is_symlink():
                    shutil.copytree(p, work / p.name, symlinks=True)
                else:
                    shutil.copy2(p, work / p.name, follow_symlinks=False)
        ad.commit()
    except BaseException:
        ad.abort()
        raise


def _data_hash(examples) -> str:
    h = hashlib.sha256()
    for e in examples:
        h.update(json.dumps([e.input_ids, e.labels]).encode())
    return h.hexdigest()[:16]


def learn(
    config: str | os.PathLike | dict | LearnConfig,
    *,
    resume: bool = False,
    force: bool = False,
    output: str | os.PathLike | None = None,
    progress: bool = True,
    on_epoch_end: Callable[[int, float], None] | None = None,
    shard_size: int | None = None,
) -> LearnResult:
    """Fit the alphas per `config`, write `coefficients.json` (and `merged/`) under its output dir.

    In a torch.distributed process group the bases are sharded over `shard_size` ranks (default:
    all; fewer replicates them across groups, e.g. one group per node) and rank 0 writes the files.
    With `force` over an earlier run, the new run is written beside it and exchanged for it at the end:
    until then (and after any failure or interrupt) the earlier results stay as they were.
    """
    staged: dict = {}  # rank 0's staging folder for a --force run
    try:
        return _learn(config, resume=resume, force=force, output=output, progress=progress,
                      on_epoch_end=on_epoch_end, shard_size=shard_size, _staged=staged)
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (the CLI turns it into one): say what is kept
        if isinstance(e, LearnInterrupted):
            raise
        raise LearnInterrupted(_kept_after_interrupt(staged.get("out"), "dir" in staged)) from None
    finally:
        if "dir" in staged:  # not finished: the earlier run stays
            staged.pop("dir").abort()


class LearnInterrupted(KeyboardInterrupt):
    """An interrupted learn run; `kept` says what is on disk (the CLI prints it instead of 'nothing was written')."""

    def __init__(self, kept: str):
        super().__init__(kept)
        self.kept = kept


def _kept_after_interrupt(out: Path | None, staged: bool) -> str:
    from .trainer import CHECKPOINT, LOG

    if out is None:
        return "nothing was written"
    if staged:
        return f"the new run's progress was discarded; the earlier run in {out} is kept as it was"
    if (out / CHECKPOINT).is_file():
        return (f"kept {out / CHECKPOINT} (the last finished epoch) and {out / LOG}; "
                "continue with `souplm learn --resume`")
    return f"no epoch had finished, so there is no checkpoint in {out} to resume from"


def final_merge_table(table: CoefficientTable, output_index: int) -> CoefficientTable:
    """The table learn's final merge uses: the learned one plus `default`, a one-hot on the output model.

    The recipe is linear with `normalize: false` (the learned alphas are applied as they are), so a
    stored tensor the learned table does not name (a `rotary_emb.inv_freq` buffer of a `.bin`
    checkpoint, anything the soup did not learn) would otherwise get weight 1.0 from every model and
    be summed: two inv_freq of 0.25 became 0.5. With `default` it is copied from the output model.
    """
    if "default" in table.coefficients:
        return table
    onehot = [1.0 if i == output_index else 0.0 for i in range(table.n_models)]
    return CoefficientTable(table.models, {**table.coefficients, "default": onehot}, table.meta,
                            table.model_hashes)


def check_finite_models(models: list[str], cks: list) -> None:
    """Every floating tensor of every base is finite; else one error naming model and tensor (before step 1)."""
    import torch

    for path, ck in zip(models, cks):
        for name in ck.names:
            t = ck.get(name, dtype=None)
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise SoupError(f"learn: tensor {name} of model {path} contains NaN or Inf; "
                                "a soup with it would be NaN (nothing was trained)")


def _learn(
    config: str | os.PathLike | dict | LearnConfig,
    *,
    resume: bool,
    force: bool,
    output: str | os.PathLike | None,
    progress: bool,
    on_epoch_end: Callable[[int, float], None] | None,
    shard_size: int | None,
    _staged: dict,
) -> LearnResult:
    import torch

    from .. import __version__
    from .. import distributed as D
    from ..data.metasets import MetaSet, RowEncoder, load_meta_sets, split_by_ratio
    from ..io.checkpoint import open_checkpoint
    from .soup_module import build_soup
    from .trainer import Trainer, TrainSettings

    cfg = load_config(config, output=None if output is None else str(output))
    if cfg.dtype == "float16":  # before anything is opened or written (docs/SCALING.md, "Precision")
        raise SoupError("learn: dtype float16 is refused: without loss scaling its activation gradients "
                        "underflow (fp16's range ends at 6e-8); use dtype: bfloat16 (same memory) or float32")
    out = Path(cfg.output)
    _staged["out"] = out
    def status(msg: str) -> None:  # start-up takes tens of seconds on real models: say what is happening
        if progress and D.is_main():
            import sys

            print(f"souplm learn: {msg}", file=sys.stderr, flush=True)

    status(f"opening {len(cfg.models)} models")
    cks = [open_checkpoint(p, allow_pickle=cfg.allow_pickle) for p in cfg.models]
    if cfg.output_model is not None:
        s = cfg.models.index(cfg.output_model)
    else:  # the multimodal model gives the structure: its vision tower is needed, and is not souped
        s = next((i for i, ck in enumerate(cks) if ck.layout.multimodal), 0)
    multimodal = cks[s].layout.multimodal
    others = _check_models(cfg, cks, s)
    from .lora_soup import adapter_soup_plan, check_finite_adapters

    adapters = adapter_soup_plan(cks)  # BASE+ADAPTER models: a soup of the adapters' factors (lora_soup.py)
    if adapters is not None:
        check_finite_adapters(cfg.models, adapters)
    else:
        check_finite_models(cfg.models, cks)  # a NaN base is reported now, not after the whole run
    # the folder transformers loads: a BASE+ADAPTER model's base (its adapters are applied after loading)
    structure = str(cks[s].base.path) if hasattr(cks[s], "adapters") else cfg.models[s]

    # data first: a bad row should fail before minutes of model loading
    tokenizer, processor = _load_tokenizer(cfg.tokenizer or structure, multimodal)
    sets = [MetaSet(m.path, m.format, None if m.samples == "all" else m.samples, m.image_root, m.choice_style)
            for m in cfg.meta_sets]
    counts = split_by_ratio(cfg.mix.total, cfg.mix.ratio) if cfg.mix else None
    encoder = RowEncoder(tokenizer, processor, multimodal=multimodal, max_length=cfg.training.max_length)
    status(f"reading and tokenizing {len(sets)} meta set(s)")
    examples = load_meta_sets(sets, encoder, seed=cfg.seed, counts=counts)
    work = D.on_main(lambda: _prepare_output(out, resume, force, cfg.models, _staged))  # the others wait for it

    shards = None
    if D.is_distributed() and adapters is not None:
        raise SoupError("learn: a soup of adapters (BASE+ADAPTER models) runs in one process; "
                        "run it without torchrun")
    if D.is_distributed():
        from .sharding import ShapeOnly, materialize, meta_model, shard_report, shard_soup

        # Built on meta, sharded, then each rank reads only its rows: no rank holds a whole base.
        device = D.local_device(cfg.device)
        model = meta_model(cfg.models[s], multimodal, getattr(torch, cfg.dtype))
        soup = build_soup(model, [ShapeOnly(o) for o in others], base_index=s, granularity=cfg.granularity,
                          activation=cfg.activation, fixed=cfg.fixed)
        shard_soup(soup, device, shard_size)
        materialize(soup, [*others[:s], cks[s], *others[s:]], s, device)
        shards = D.gather_objects(shard_report(soup, shard_size).to_json())
    else:
        device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                              "cpu" if cfg.device == "auto" else cfg.device)
        status(f"loading {structure} and building the soup of {len(cfg.models)} models")
        model = _load_model(structure, multimodal, getattr(torch, cfg.dtype)).to(device)
        if adapters is not None and cfg.adapter_soup == "low_rank":
            from .lora_soup import build_lora_soup

            soup = build_lora_soup(model, adapters.sources, granularity=cfg.granularity,
                                   activation=cfg.activation, fixed=cfg.fixed)
        else:
            if hasattr(cks[s], "adapters"):  # dense: the structure model's own weights are BASE+its adapters
                from .lora_soup import load_adapted

                load_adapted(model, cks[s])
            soup = build_soup(model, others, base_index=s, granularity=cfg.granularity, activation=cfg.activation,
                              fixed=cfg.fixed)  # layout from the in-memory names: they differ from the file's for LLaVA
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)

    t, o, r = cfg.training, cfg.optimizer, cfg.regularization
    settings = TrainSettings(
        epochs=t.epochs, batch_size=t.batch_size, grad_accum=t.grad_accum, optimizer=o.name, lr=o.lr,
        weight_decay=o.weight_decay, momentum=o.momentum, betas=tuple(o.betas), regularization=r.kind,
        reg_lambda=r.lambda_, seed=cfg.seed, log_every=t.log_every, progress=progress,
    )
    fingerprint = cfg.settings()
    for k in ("epochs", "log_every", "evaluate"):  # may change between a run and its resume
        fingerprint["training"].pop(k, None)
    fingerprint["data"] = _data_hash(examples)
    fingerprint["alphas"] = soup.alphas.raw.numel()
    trainer = Trainer(soup, examples, settings, pad_id=pad_id, device=device, out_dir=work, fingerprint=fingerprint)
    train = trainer.train(resume=resume, on_epoch_end=on_epoch_end, evaluate_first=t.evaluate)
    final_loss = trainer.evaluate() if t.evaluate else None
    if final_loss is not None:
        trainer.log_event({"event": "eval", "when": "final", "step": train.steps, "loss": final_loss})
    if shards is not None:  # what each rank held: the proof that none held a whole base
        trainer.log_event({"event": "shards", "ranks": shards})

    meta = {
        "source": "souplm learn", "souplm_version": __version__, "settings": cfg.settings(),
        "output_model": cfg.models[s], "examples": len(examples), "steps": train.steps,
        "epoch_losses": train.epoch_losses, "initial_loss": trainer.initial_loss, "final_loss": final_loss,
    }
    if hasattr(soup, "low_rank_modules"):  # a soup of adapters: which modules kept the factors (lora_soup.py)
        meta["adapter_soup"] = {"low_rank_modules": len(soup.low_rank_modules),
                                "dense_modules": len(soup.dense_modules)}
    table = soup.coefficient_table(cfg.models, meta)
    # named by absolute path and content hash: a merge matches it to its recipe's models by identity
    table = CoefficientTable.identified(table.models, table.coefficients, table.meta)
    D.on_main(lambda: table.save(work / TABLE))
    table_path = out / TABLE
    del trainer, soup, model  # free the bases before the engine streams the merge

    merged_dir = None
    if cfg.merge:
        from ..engine import merge
        from ..engine.recipe import Recipe

        recipe = Recipe.from_models(
            cfg.models, method="linear", normalize=False, output_model=cfg.models[s],
            vocab_policy="extend" if cfg.vocab_policy == "extend" else "error", allow_pickle=cfg.allow_pickle,
        )
        # Rank 0 streams the merge from the checkpoints; the others wait for it.
        # (only the path crosses ranks: a MergeReport holds open checkpoints)
        merge_table = final_merge_table(table, s)
        D.on_main(lambda: str(merge(recipe, work / MERGED, coefficients=merge_table, force=True,
                                    progress=progress).out_dir))
        merged_dir = out / MERGED
    D.on_main(lambda: _finish_output(out, work, _staged))
    return LearnResult(table, table_path, merged_dir, meta["initial_loss"], final_loss, train.steps,
                       train.epoch_losses, train.resumed_from_epoch)


from .._callable import make_callable

make_callable(__name__, "learn")  # souplm.learn(config) calls learn(config)
