#!/usr/bin/env python
"""Hugging Face mix benchmark: `nemo-btx mix` (Hugging Face experts -> Mixtral) against
`mergekit-moe` on the same four Llama-architecture experts, and the I/O floor, in one run.

Issue 9's target: faster than mergekit-moe, under 1.5 x the I/O floor, with lower peak memory.

* inputs: four random LlamaForCausalLM directories of 271M parameters each (hidden 1024,
  16 layers, 16 heads (MHA), SwiGLU FFN 2816, vocab 32000, untied), stored in **bfloat16**
  (543 MB each, one model.safetensors), written straight with safetensors (no transformers
  model is instantiated) plus a config.json and a small tokenizer;
* ours: `python -m nemo_btx.cli mix mix.format=mixtral mix.include_seed=false` (a fresh
  process: interpreter start, config, validation, merge, fsync, rename; no torch);
* mergekit-moe (its own venv, --mergekit): `gate_mode: random`, `experts_per_token: 2`,
  `base_model` = expert 0, `dtype: bfloat16`, the four experts, writing Mixtral;
* the I/O floor: `dd` of every input file to /dev/null (real read() copies; `cat` to /dev/null
  can splice without copying) + a copy of our output files + `sync`, the faster of `cp`
  (which may copy inside the kernel with copy_file_range) and `dd bs=16M` (plain write()).

Both mergers write 2-expert-per-token Mixtral models of the same size. They differ in one rule:
mergekit-moe copies attention, norms and embeddings from base_model, BTX (ours) averages them
over the experts (so ours also reads every expert's attention; mergekit reads them from one).

Peak memory: the peak RSS of the whole process tree (psutil, sampled every 20 ms) and the
kernel's ru_maxrss of the merger process (os.wait4), both reported. Everything is measured with
a warm page cache (the inputs are `cat` once first; the cache cannot be dropped here), rounds
interleaved (ours, mergekit, floor) so machine noise hits all three.

    .venv/bin/python bench/mix_hf.py [--dir /tmp/btx-bench-mixhf] [--repeats 3]
        [--mergekit /tmp/mergekit-venv/bin/mergekit-moe] [--json runs/bench/mix-hf.json]
        [--out-dir /dev/shm/btx-mixhf]   # outputs on tmpfs: no disk in any of the three
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHAPE = dict(hidden_size=1024, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=16,
             intermediate_size=2816, vocab_size=32000)
NUM_EXPERTS = 4


def make_expert(directory: Path, seed: int) -> None:
    """A random Llama directory (bf16 safetensors + config.json + tokenizer), if not there."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    if (directory / "model.safetensors").is_file():
        return
    directory.mkdir(parents=True, exist_ok=True)
    h, f, v, L = (SHAPE[k] for k in ("hidden_size", "intermediate_size", "vocab_size", "num_hidden_layers"))
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    def norm():
        return (1 + torch.randn(h, generator=g) * 0.1).to(torch.bfloat16)

    t = {"model.embed_tokens.weight": rnd(v, h), "model.norm.weight": norm(), "lm_head.weight": rnd(v, h)}
    for i in range(L):
        p = f"model.layers.{i}."
        t.update({p + "input_layernorm.weight": norm(), p + "post_attention_layernorm.weight": norm(),
                  p + "self_attn.q_proj.weight": rnd(h, h), p + "self_attn.k_proj.weight": rnd(h, h),
                  p + "self_attn.v_proj.weight": rnd(h, h), p + "self_attn.o_proj.weight": rnd(h, h),
                  p + "mlp.gate_proj.weight": rnd(f, h), p + "mlp.up_proj.weight": rnd(f, h),
                  p + "mlp.down_proj.weight": rnd(h, f)})
    save_file(t, str(directory / "model.safetensors"), metadata={"format": "pt"})
    LlamaConfig(**SHAPE, max_position_embeddings=4096, tie_word_embeddings=False,
                dtype="bfloat16").save_pretrained(str(directory))
    sys.path.insert(0, str(REPO / "tests" / "hf"))
    from hf_models import write_tokenizer

    write_tokenizer(directory, 512)
    n = sum(x.numel() for x in t.values())
    print(f"{directory.name}: {n / 1e6:.1f}M parameters", flush=True)


def _files(path: Path):
    return sorted(p for p in path.iterdir() if p.is_file())


def _settle() -> None:
    subprocess.run(["sync"], check=True)


def measured(cmd, **kw) -> dict:
    """Run `cmd`; wall time, peak RSS of its process tree (sampled) and its own ru_maxrss."""
    import psutil

    _settle()
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)
    peak = [0]
    done = threading.Event()

    def sample():
        root = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                total = root.memory_info().rss + sum(c.memory_info().rss for c in root.children(recursive=True))
                peak[0] = max(peak[0], total)
            except psutil.Error:
                pass
            done.wait(0.02)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    out = []
    reader = threading.Thread(target=lambda: out.append(proc.stdout.read()), daemon=True)
    reader.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    done.set()
    thread.join()
    reader.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[:3]} failed ({proc.returncode}):\n{''.join(out)[-4000:]}")
    return {"wall_s": wall, "peak_tree_rss": peak[0], "maxrss": usage.ru_maxrss * 1024,
            "cpu_s": usage.ru_utime + usage.ru_stime, "log_tail": "".join(out)[-1500:]}


def io_floor(inputs, output: Path, scratch: Path) -> dict:
    in_files = [str(f) for d in inputs for f in _files(d) if f.suffix == ".safetensors"]
    _settle()
    t = time.perf_counter()
    subprocess.run(["sh", "-c", 'for f; do dd if="$f" of=/dev/null bs=16M status=none; done', "dd",
                    *in_files], check=True)
    t_read = time.perf_counter() - t
    out_files = [str(f) for f in _files(output) if f.suffix == ".safetensors"]
    writes = {}
    for name, script in (("cp", 'cp "$@" "$0" && sync "$0"/*'),
                         ("dd", 'for f; do dd if="$f" of="$0/${f##*/}" bs=16M status=none; done && sync "$0"/*')):
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(parents=True)
        _settle()
        t = time.perf_counter()
        subprocess.run(["sh", "-c", script, str(scratch), *out_files], check=True)
        writes[name] = time.perf_counter() - t
    shutil.rmtree(scratch)
    t_write = min(writes.values())  # the faster copy (cp may use copy_file_range, dd plain write())
    return {"read_s": t_read, "write_s": t_write, "floor_s": t_read + t_write, "write_cp_dd_s": writes,
            "input_bytes": sum(os.path.getsize(f) for f in in_files),
            "output_bytes": sum(os.path.getsize(f) for f in out_files)}


def run_ours(experts, out: Path, workdir: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [str(REPO / ".venv" / "bin" / "python"), "-m", "nemo_btx.cli", "mix", "mix.format=mixtral",
           "mix.include_seed=false", "mix.router_init=random", f"run.dir={workdir}",
           "mix.experts=[" + ",".join(str(e) for e in experts) + "]", f"mix.out={out}"]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    r = measured(cmd, cwd=REPO, env=env)
    import re

    found = re.search(r"MixtralForCausalLM.* in ([0-9.]+) s", r["log_tail"])
    r["merge_s"] = float(found.group(1)) if found else None  # the merge itself, in process
    r["sync_s"] = _sync_dir(out)
    return r


def run_mergekit(mergekit: str, experts, out: Path, workdir: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    config = workdir / "mergekit-moe.yml"
    config.write_text(
        f"base_model: {experts[0]}\ngate_mode: random\ndtype: bfloat16\nexperts_per_token: 2\n"
        "experts:\n" + "".join(f"  - source_model: {e}\n    positive_prompts: [\"x\"]\n" for e in experts))
    cmd = [mergekit, str(config), str(out), "--i-understand-this-is-not-useful-without-training",
           "--device", "cpu", "--random-seed", "0", "--quiet"]
    r = measured(cmd, cwd=workdir, env=dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1"))
    r["sync_s"] = _sync_dir(out)
    return r


def _sync_dir(out: Path) -> float:
    """Time to flush what the merger left in the page cache (ours fsyncs nothing either)."""
    t = time.perf_counter()
    subprocess.run(["sh", "-c", 'sync "$@"', "sync", *map(str, _files(out))], check=True)
    return time.perf_counter() - t


def _median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if len(xs) % 2 else 0.5 * (xs[len(xs) // 2 - 1] + xs[len(xs) // 2])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="/tmp/btx-bench-mixhf")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--mergekit", default="/tmp/mergekit-venv/bin/mergekit-moe")
    parser.add_argument("--json", default=None)
    parser.add_argument("--out-dir", default=None,
                        help="where the outputs are written (default: --dir); e.g. a tmpfs such as "
                             "/dev/shm/btx-mixhf to take the disk out of the measurement")
    args = parser.parse_args()
    workdir = Path(args.dir)
    workdir.mkdir(parents=True, exist_ok=True)
    outdir = Path(args.out_dir) if args.out_dir else workdir
    outdir.mkdir(parents=True, exist_ok=True)
    experts = [workdir / f"expert{i}" for i in range(NUM_EXPERTS)]
    t = time.perf_counter()
    # In a child: this process stays small, since a forked child inherits its RSS high-water
    # mark (ru_maxrss) from the parent's image before exec.
    subprocess.run([sys.executable, str(Path(__file__).resolve()), "_make", *map(str, experts)],
                   check=True)
    print(f"inputs ready ({time.perf_counter() - t:.0f} s)", flush=True)
    subprocess.run(["sh", "-c", 'cat "$@" > /dev/null', "cat",
                    *[str(f) for d in experts for f in _files(d)]], check=True)

    rounds = []
    for rep in range(args.repeats):
        ours = run_ours(experts, outdir / "ours", workdir)
        theirs = run_mergekit(args.mergekit, experts, outdir / "mergekit", workdir)
        floor = io_floor(experts, outdir / "ours", outdir / "floor-copy")
        sizes = {k: sum(f.stat().st_size for f in _files(outdir / k) if f.suffix == ".safetensors")
                 for k in ("ours", "mergekit")}
        rounds.append({"ours": ours, "mergekit": theirs, "floor": floor, "output_bytes": sizes})
        print(f"round {rep + 1}: ours {ours['wall_s']:.1f} s / {ours['peak_tree_rss'] / 2**20:.0f} MiB, "
              f"(+sync {ours['sync_s']:.1f} s), mergekit-moe {theirs['wall_s']:.1f} s (+sync {theirs['sync_s']:.1f} s) / {theirs['peak_tree_rss'] / 2**20:.0f} MiB, "
              f"floor {floor['floor_s']:.1f} s (read {floor['read_s']:.1f} + write {floor['write_s']:.1f})",
              flush=True)
        for k in ("ours", "mergekit"):
            if rep + 1 < args.repeats:
                shutil.rmtree(outdir / k)

    med = {k: _median([r[k]["wall_s"] for r in rounds]) for k in ("ours", "mergekit")}
    # The floor syncs its output; the mergers do not: compare wall + the sync after each.
    synced = {k: _median([r[k]["wall_s"] + r[k]["sync_s"] for r in rounds]) for k in ("ours", "mergekit")}
    floor = _median([r["floor"]["floor_s"] for r in rounds])
    peak = {k: max(r[k]["peak_tree_rss"] for r in rounds) for k in ("ours", "mergekit")}
    maxrss = {k: max(r[k]["maxrss"] for r in rounds) for k in ("ours", "mergekit")}
    summary = {"ours_wall_median_s": med["ours"], "mergekit_wall_median_s": med["mergekit"],
               "ours_wall_plus_sync_median_s": synced["ours"],
               "ours_merge_only_median_s": _median([r["ours"]["merge_s"] for r in rounds]),
               "mergekit_wall_plus_sync_median_s": synced["mergekit"],
               "floor_median_s": floor, "ours_over_floor": synced["ours"] / floor,
               "mergekit_over_floor": synced["mergekit"] / floor,
               "speedup_vs_mergekit": med["mergekit"] / med["ours"],
               "ours_peak_rss_mib": peak["ours"] / 2**20, "mergekit_peak_rss_mib": peak["mergekit"] / 2**20,
               "ours_maxrss_mib": maxrss["ours"] / 2**20, "mergekit_maxrss_mib": maxrss["mergekit"] / 2**20,
               "input_bytes": rounds[0]["floor"]["input_bytes"], "output_bytes": rounds[-1]["output_bytes"],
               "out_dir": str(outdir), "dtype": "bfloat16", "shape": SHAPE, "experts": NUM_EXPERTS, "repeats": args.repeats}
    print(json.dumps(summary, indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"summary": summary, "rounds": rounds}, indent=2))


if __name__ == "__main__":
    if sys.argv[1:2] == ["_make"]:
        for i, e in enumerate(sys.argv[2:]):
            make_expert(Path(e), 1000 + i)
    else:
        main()
