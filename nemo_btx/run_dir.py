"""The run directory: every path a stage reads or writes, and the models it holds.

One experiment = one directory. This module is the only place that knows its layout; stages,
orchestration (`run`, `launch`, the Slurm scripts), evaluation, export and the report ask it.

    config.yaml              the resolved experiment config (`run` / `launch`)
    ledger.jsonl             compute ledger: one line per finished training segment
    logs/<unit>.log          `run`'s per-unit logs;  replaced/<time>/  what --from/--only moved
    slurm/                   `launch`: scripts, jobs.json, events.jsonl, logs/, stop/
    tokenizer/               stage `tokenizer` (meta.json last)
    data/<domain>/           stage `data` (the merge; manifest.json last), parts/ from `tokenize`
    seed/                    stage `seed`
    experts/<d>/init         stage `branch` (a copy of the seed's weights)
    experts/<d>/             stage `train-expert`
    btx/mixed/               stage `mix` (an MoE checkpoint + manifest.json)
    btx/finetuned/           stage `finetune`
    baselines/upcycled/      stage `upcycle` (the seed's FFN in every expert)
    baselines/<baseline>/    stage `baselines`: upcycle-data, upcycle-compute, dense
    eval/<model>/            stage `eval`: results.json (a model of the run, by name)
    eval/checkpoint-<name>-<id>/  stage `eval` of any other checkpoint (keyed by its identity)
    hf/<model>/  imported/   export-hf / import-hf
    report/                  stage `report`

A training stage's directory holds `weights/` (final weights), `checkpoints/`,
`metrics.jsonl`, `config.yaml` and `manifest.json`, written last: the completion marker.
No torch here: login nodes and the report read it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

#: Written last into every complete stage output (training stages, data, mix, upcycle).
MANIFEST = "manifest.json"
#: Written last into every complete checkpoint directory (training/checkpoint.py).
CHECKPOINT_MARKER = "btx_checkpoint.json"
#: Written last by the eval stage, one per evaluated model.
RESULTS = "results.json"
#: Written last by the report stage.
REPORT_JSON = "report.json"
WEIGHTS = "weights"
METRICS = "metrics.jsonl"
ROUTING = "routing.json"
#: The resolved config, of the experiment (run directory) and of each training stage (its dir).
CONFIG = "config.yaml"
LEDGER = "ledger.jsonl"
TOKENIZER = "tokenizer"


@dataclass(frozen=True)
class Baseline:
    """One of the paper's comparisons. `name` is its only spelling: `baselines.which`, the
    evaluated model, the report, the ledger category and its directory all use it."""

    name: str
    label: str
    moe: bool
    """Trained from the upcycled MoE (else the dense seed)."""
    matched: str
    """'data': as many MoE steps as BTX's finetune; 'compute': BTX's expert + finetune FLOPs."""

    @property
    def stage(self) -> str:
        """The pipeline stage that trains it: the MoE baselines share `baselines` (one layout,
        one Slurm array); the dense one has its own, `dense`, at a dense layout."""
        return "baselines" if self.moe else "dense"

    @property
    def unit(self) -> str:
        """Its unit's name in the plan (orchestration.units)."""
        return f"baselines:{self.name}" if self.moe else "dense"


BASELINES: Tuple[Baseline, ...] = (
    Baseline("upcycle-data", "Sparse upcycling (data-matched)", moe=True, matched="data"),
    Baseline("upcycle-compute", "Sparse upcycling (compute-matched)", moe=True, matched="compute"),
    Baseline("dense", "Dense (compute-matched)", moe=False, matched="compute"),
)
BASELINE_NAMES = tuple(b.name for b in BASELINES)
#: The BTM ensembles the eval stage builds from the experts (top-k experts per context).
BTM_MODELS = ("btm-top1", "btm-top2")


def baseline(name: str) -> Baseline:
    for b in BASELINES:
        if b.name == name:
            return b
    raise KeyError(name)


@dataclass(frozen=True)
class Model:
    """A model the experiment compares (evaluated, exported, reported)."""

    name: str
    """eval.model / hf.model name and eval/<name>/."""
    label: str
    train_dir: Optional[str]
    """The training stage's directory, relative to the run directory (None: BTM, no training)."""
    checkpoints: Tuple[str, ...]
    """Checkpoint directories relative to the run directory, in preference order; for an
    ensemble every one of them (the experts)."""
    ensemble: bool = False
    category: Optional[str] = None
    """Ledger category of its training stage (reporting/compute.py sums them per method)."""
    needs: Tuple[str, ...] = ()
    """Pipeline units whose outputs it is made of (orchestration.units: its eval unit's needs)."""


class RunDir:
    """Paths of one run directory. `RunDir.of(cfg)` for an experiment config."""

    def __init__(self, root) -> None:
        self.root = Path(root)

    @classmethod
    def of(cls, cfg) -> "RunDir":
        return cls(cfg.run.dir)

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"

    # -------------------------------------------------------------------- experiment files
    @property
    def config(self) -> Path:
        return self.root / CONFIG

    @property
    def ledger(self) -> Path:
        return self.root / LEDGER

    @property
    def lock(self) -> Path:
        return self.root / ".run.lock"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def unit_log(self, unit_name: str) -> Path:
        return self.logs / f"{unit_name.replace(':', '-')}.log"

    @property
    def replaced(self) -> Path:
        return self.root / "replaced"

    @property
    def slurm(self) -> Path:
        """`launch`'s scripts and submit.sh."""
        return self.root / "slurm"

    @property
    def slurm_logs(self) -> Path:
        return self.slurm / "logs"

    @property
    def slurm_jobs(self) -> Path:
        """The job ids of the last launch."""
        return self.slurm / "jobs.json"

    @property
    def slurm_events(self) -> Path:
        """Every job's starts, ends and requeues (written by the job scripts)."""
        return self.slurm / "events.jsonl"

    @property
    def slurm_stop(self) -> Path:
        """Stop files a job script creates when Slurm signals the time limit."""
        return self.slurm / "stop"

    # -------------------------------------------------------------------- stage outputs
    @property
    def tokenizer(self) -> Path:
        return self.root / TOKENIZER

    @property
    def data(self) -> Path:
        return self.root / "data"

    def data_domain(self, domain: str) -> Path:
        """A domain's datasets (train/valid .bin/.idx) and its manifest, written last by its merge."""
        return self.data / domain

    def data_manifest(self, domain: str) -> Path:
        return self.data_domain(domain) / MANIFEST

    def data_parts(self, domain: str) -> Path:
        """The domain's tokenized pieces before the merge (`<id>.{train,valid}.{bin,idx}`, `<id>.json`)."""
        return self.data_domain(domain) / "parts"

    @property
    def seed(self) -> Path:
        return self.root / "seed"

    @property
    def experts(self) -> Path:
        return self.root / "experts"

    def expert(self, domain: str) -> Path:
        return self.experts / domain

    def expert_init(self, domain: str) -> Path:
        """The branched copy of the seed an expert starts from."""
        return self.expert(domain) / "init"

    @property
    def mixed(self) -> Path:
        return self.root / "btx" / "mixed"

    @property
    def finetuned(self) -> Path:
        return self.root / "btx" / "finetuned"

    @property
    def upcycled(self) -> Path:
        return self.root / "baselines" / "upcycled"

    def baseline(self, name: str) -> Path:
        baseline(name)  # KeyError for an unknown name
        return self.root / "baselines" / name

    @property
    def train(self) -> Path:
        """`nemo-btx train`'s default output."""
        return self.root / "train"

    @property
    def smoke(self) -> Path:
        return self.root / "smoke"

    @property
    def imported(self) -> Path:
        return self.root / "imported"

    def hf_export(self, label: str) -> Path:
        return self.root / "hf" / label

    @property
    def report(self) -> Path:
        return self.root / "report"

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    def eval_dir(self, model: str) -> Path:
        """Results of a model of this run, by its name (see `models`)."""
        return self.eval / model

    def eval_dir_for_checkpoint(self, path, identity: str) -> Path:
        """Results of any other checkpoint: keyed by its identity, not by a directory name
        (two checkpoints both called `weights` must not share results)."""
        name = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(path).resolve().parent.name)
        return self.eval / f"checkpoint-{name or 'root'}-{identity[:12]}"

    # -------------------------------------------------------------------- markers
    @staticmethod
    def complete(stage_out: Path) -> bool:
        """A stage output is complete when its manifest exists (written last)."""
        return (Path(stage_out) / MANIFEST).is_file()

    @staticmethod
    def checkpoint_complete(path) -> bool:
        """A checkpoint directory is complete when its marker exists (written last)."""
        return (Path(path) / CHECKPOINT_MARKER).is_file()

    def rel(self, path) -> str:
        return Path(path).resolve().relative_to(self.root.resolve()).as_posix()

    # -------------------------------------------------------------------- models
    def models(self, domains: Sequence[str], baselines: Sequence[str] = BASELINE_NAMES) -> List[Model]:
        """Every model the experiment compares, in the order of the paper's Table 1."""
        out = [Model("seed", "Seed", "seed", ("seed/weights",), category="seed", needs=("seed",))]
        for d in domains:
            out.append(Model(f"expert-{d}", f"Expert: {d}", f"experts/{d}", (f"experts/{d}/weights",),
                             category="expert", needs=(f"experts:{d}",)))
        experts = tuple(f"experts/{d}/weights" for d in domains)
        for name in BTM_MODELS:
            out.append(Model(name, f"BTM top-{name[-1]}", None, experts, ensemble=True,
                             needs=tuple(f"experts:{d}" for d in domains)))
        for b in BASELINES:
            if b.name in baselines:
                out.append(Model(b.name, b.label, f"baselines/{b.name}", (f"baselines/{b.name}/weights",),
                                 category=b.name, needs=(b.unit,)))
        # The finetuned MoE, else (evaluated early, or finetune skipped) the mixed one.
        out.append(Model("btx", "BTX", "btx/finetuned", ("btx/finetuned/weights", "btx/mixed"),
                         category="finetune", needs=("finetune",)))
        return out

    def model(self, name: str, domains: Sequence[str]) -> Model:
        for m in self.models(domains):
            if m.name == name:
                return m
        raise KeyError(name)

    def category_of(self, rel: Optional[str], domains: Sequence[str]) -> str:
        """Ledger category of a training directory (relative to the run directory)."""
        if rel is not None:
            for m in self.models(domains):
                if m.train_dir == rel and m.category:
                    return m.category
        return "other"

    def training_dirs(self, domains: Sequence[str]) -> Dict[str, str]:
        """model name -> training directory (relative), for every trained model."""
        return {m.name: m.train_dir for m in self.models(domains) if m.train_dir}


def checkpoint_tokenizer(checkpoint) -> Path:
    """Where an imported checkpoint (import-hf) carries the Hugging Face tokenizer it came with."""
    return Path(checkpoint) / TOKENIZER


def find_run_dir(checkpoint) -> Optional[Path]:
    """The run directory a checkpoint lives in: the nearest parent holding a run's tokenizer."""
    p = Path(checkpoint).resolve()
    for parent in [p, *p.parents]:
        if (RunDir(parent).tokenizer / "meta.json").is_file():
            return parent
    return None


def checkpoint_identity(path) -> str:
    """What a checkpoint is, independent of where it lies: the unique id its marker got when it
    was written (copies made by `branch` share it, as they share the weights); for a marker
    without one, the hash of the marker itself (it holds the save time, layout and model)."""
    marker = Path(path) / CHECKPOINT_MARKER
    raw = marker.read_bytes()
    try:
        ident = json.loads(raw).get("id")
    except ValueError:
        ident = None
    return str(ident) if ident else hashlib.sha256(raw).hexdigest()[:32]


def combined_identity(parts: Sequence[str], *extra: str) -> str:
    """One identity for an ensemble of checkpoints (and its settings)."""
    return hashlib.sha256("\n".join([*parts, *extra]).encode()).hexdigest()[:32]
