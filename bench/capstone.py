"""Chapter 9's side-by-side training: every preset at equal size on MQAR and on the standard library's source.

    PYTHONPATH=. python bench/capstone.py --out bench/results               # one GPU, from the repository root
    PYTHONPATH=. torchrun --nproc_per_node 8 bench/capstone.py --out bench/results   # DDP over 8 GPUs
    PYTHONPATH=. torchrun --nproc_per_node 8 bench/capstone.py --fsdp --out DIR      # FSDP2 over 8 GPUs
    PYTHONPATH=. python bench/capstone.py --smoke --out /tmp/capstone       # a CPU: tiny, seconds

For each preset of minisparse.models (the small scale: 8 layers, 8 experts top-2, byte vocabulary, width
`--hidden`): (a) MQAR — AdamW on a mix of `--pairs` key-value pairs (4 .. 32), then recall accuracy against the
number of pairs and, in bins of 16 tokens, against the distance from a key to its query; (b) language modelling
on byte windows of the Python standard library's source (offline everywhere); (c) speed: training tokens/s and peak memory on the language-modelling batches after warm-up steps
(peak_mb: tensors on CUDA, the process's resident set on a CPU), and the latency of a decoded token after a prompt
of `--context` tokens. Every preset sees the same batches (one seed a step and rank). `--tasks` picks among mqar,
lm and speed: the learning curves may come from runs that share a GPU, the speed rows only from one running alone.
Under torchrun the model is wrapped in DDP, or sharded with FSDP2
(`--fsdp`: each block, then the root) (NCCL on GPUs, gloo on CPUs); rank 0 writes `capstone.json`
(minisparse.bench.save_results): rows {impl: preset, ms, task, ...}. Checkpoints go to `--ckpt`, the full state in
one file (gathered from every rank, written by rank 0 with torch.save, read by every rank with
torch.load(weights_only=True)); `--resume` continues.
A preset that fails leaves a row {task: "error"} and the others run on. To fit short per-command limits, run the
presets in separate processes (`--presets qwen3_next_like --out DIR/qwen`) and merge their rows
(`--merge DIR/*/capstone.json --out bench/results`; a later file's row replaces an earlier row of the same preset,
task and pair count).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # the repository, without installing it

from minisparse import bench  # noqa: E402
from minisparse.models import PRESETS, HybridLM, param_counts  # noqa: E402
from minisparse.models.training import (data_parallel, load_checkpoint, lm_batch, mqar_batch,  # noqa: E402
                                     mqar_answers, save_checkpoint, stdlib_bytes, train)



def setup():
    """(rank, world, device): a process group under torchrun with several processes, else one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise SystemExit(f"capstone.py: local rank {local}, but this machine shows "
                             f"{torch.cuda.device_count()} GPU(s): start at most that many processes a node "
                             "(torchrun --nproc_per_node), or hide the GPUs (CUDA_VISIBLE_DEVICES=) to run on CPUs")
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if world > 1:
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return rank, world, dev


def build(name, args, dev):
    overrides = dict(backend="auto" if dev.type == "cuda" else "naive")
    if args.smoke:
        overrides.update(num_layers=len(PRESETS[name]().pattern) if name != "kimi_linear_like" else 4,
                         first_dense_layers=0)
    else:
        overrides.update(hidden_size=args.hidden, intermediate_size=3 * args.hidden,
                         moe_intermediate_size=3 * args.hidden // 4)
    config = PRESETS[name](**overrides)
    model = HybridLM(config).to(dev)
    if dist.is_initialized():
        model = data_parallel(model, "fsdp" if args.fsdp else "ddp")
    return config, model


def reset_peak(dev):
    """Start a new peak_mb measurement: CUDA's allocator statistics, or on Linux the process's peak resident set
    (VmHWM; writing 5 to /proc/self/clear_refs sets it back to the present resident set)."""
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        return
    try:
        pathlib.Path("/proc/self/clear_refs").write_text("5")
    except OSError:  # not Linux: peak_mb has nothing to read
        pass


def peak_mb(dev):
    """MiB at the peak since reset_peak: on CUDA the memory tensors held (torch.cuda.max_memory_allocated); on a
    CPU the whole process's resident set (interpreter, libraries, data, and what earlier presets left mapped),
    not only this model's tensors; None where the kernel keeps no resettable peak (not Linux)."""
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev) / 2**20
    try:
        status = pathlib.Path("/proc/self/status").read_text()
    except OSError:
        return None
    kb = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")), None)
    return None if kb is None else kb / 1024


def run_task(name, task, args, rank, dev, get_batch, steps):
    torch.manual_seed(0)
    config, model = build(name, args, dev)
    ckpt = pathlib.Path(args.ckpt) / f"{name}-{task}.pt" if args.ckpt and task != "speed" else None
    opt, start, history = None, 0, None
    if ckpt is not None and args.resume and ckpt.exists():
        opt, start, history = load_checkpoint(ckpt, model, lr=args.lr)
    reset_peak(dev)
    opt, history = train(model, get_batch, steps, lr=args.lr, optimizer=opt, start_step=start,
                         history=history, desc=f"{name} {task}", progress=rank == 0)
    if ckpt is not None:  # every rank: FSDP2 gathers the shards; rank 0 writes
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        save_checkpoint(ckpt, model, opt, steps, history)
    return config, getattr(model, "module", model), history


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="directory for capstone.json (default bench/results)")
    p.add_argument("--presets", default=",".join(PRESETS))
    p.add_argument("--tasks", default="mqar,lm,speed", help="any of mqar, lm, speed (comma-separated)")
    p.add_argument("--speed-steps", type=int, default=30, help="training steps of the speed task; the "
                   "first third warms up, the rest are timed")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON", help="merge these capstone.json files "
                   "(one preset or task each) into --out and exit")
    p.add_argument("--steps", type=int, default=1500, help="MQAR training steps")
    p.add_argument("--lm-steps", type=int, default=400)
    p.add_argument("--batch", type=int, default=64, help="sequences a step and rank")
    p.add_argument("--seq", type=int, default=512, help="LM window")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW's learning rate (at 8 layers, 3e-3 keeps "
                   "MQAR on its 1/N plateau where 1e-3 leaves it: bench/notes/capstone.md)")
    p.add_argument("--pairs", default="4,8,16,32", help="MQAR: the numbers of key-value pairs, one a step "
                   "in turn; recall is measured at each")
    p.add_argument("--mqar-vocab", type=int, default=64, help="MQAR's symbols: keys below half, values above "
                   "(at most the model's vocabulary, 256; at least twice the most pairs)")
    p.add_argument("--context", type=int, default=8192, help="decode latency after this many tokens")
    p.add_argument("--ckpt", default=None, help="checkpoint directory")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--fsdp", action="store_true", help="under torchrun: shard the models with FSDP2 instead of "
                   "replicating them with DDP")
    p.add_argument("--smoke", action="store_true", help="tiny sizes and steps: checks the script runs")
    p.add_argument("--autocast", action="store_true", help="bf16 autocast on CUDA (default: fp32 weights "
                   "and activations, the kernels' fp32 path)")
    args = p.parse_args(argv)
    if args.merge:
        print("wrote", merge(args.merge, args.out))
        return
    tasks = args.tasks.split(",")
    unknown = set(tasks) - {"mqar", "lm", "speed"}
    if unknown:
        p.error(f"--tasks: unknown {sorted(unknown)}; expected any of mqar, lm, speed")
    if args.smoke:
        args.steps, args.lm_steps, args.batch, args.seq, args.context = 4, 3, 4, 32, 32
        args.speed_steps = 3
    rank, world, dev = setup()
    parallel = ("fsdp" if args.fsdp else "ddp") if dist.is_initialized() else None
    if args.fsdp and parallel is None:
        print("--fsdp: one process, nothing to shard; run under torchrun to shard", flush=True)
    pairs = (2, 4, 8) if args.smoke else tuple(int(n) for n in args.pairs.split(","))
    if not 2 * max(pairs) <= args.mqar_vocab <= 256:
        p.error(f"--mqar-vocab {args.mqar_vocab}: must hold 2 x the most pairs ({2 * max(pairs)}) and at most "
                "the models' 256 symbols")
    data = stdlib_bytes(200_000 if args.smoke else 20_000_000)

    def mqar(step):
        g = torch.Generator().manual_seed(1000 * step + rank)
        ids, tg = mqar_batch(args.batch, pairs[step % len(pairs)], vocab=args.mqar_vocab, generator=g)
        return ids.to(dev), tg.to(dev)

    def text(step):
        g = torch.Generator().manual_seed(1000 * step + rank + 7)
        ids, tg = lm_batch(data, args.batch, args.seq, generator=g)
        return ids.to(dev), tg.to(dev)

    rows = []
    for name in args.presets.split(","):
        try:
            with torch.autocast("cuda", torch.bfloat16, enabled=args.autocast and dev.type == "cuda"):
                rows += run_preset(name, tasks, args, rank, world, dev, pairs, mqar, text)
        except Exception as err:  # one failing preset must not cost the others' results
            if args.smoke:
                raise
            rows.append(dict(impl=name, ms=None, task="error", error=f"{type(err).__name__}: {err}"[:500]))
            print(f"{name}: failed: {err}", flush=True)
    if rank == 0:
        path = pathlib.Path(args.out) / "capstone.json" if args.out else None
        cfg = dict(tasks=tasks, mqar_vocab=args.mqar_vocab, steps=args.steps, lm_steps=args.lm_steps,
                   speed_steps=args.speed_steps,
                   batch=args.batch, world=world, seq=args.seq,
                   hidden=args.hidden, lr=args.lr, pairs=list(pairs), smoke=args.smoke,
                   autocast=args.autocast, context=args.context, parallel=parallel)
        print("wrote", bench.save_results("capstone", cfg, rows, path))
    if dist.is_initialized():
        dist.destroy_process_group()


def run_preset(name, tasks, args, rank, world, dev, pairs, mqar, text):
    """The result rows of one preset: MQAR training and recall, LM training, speed (tokens/s, decode latency)."""
    rows = []
    if "mqar" in tasks:
        config, model, hist = run_task(name, "mqar", args, rank, dev, mqar, args.steps)
        counts = param_counts(config)
        for n in pairs:
            right, distance = mqar_answers(model, n, vocab=args.mqar_vocab, batch=8 if args.smoke else 256,
                                           batches=1 if args.smoke else 4, progress=rank == 0)
            rows.append(dict(impl=name, ms=mean_ms(hist), task="mqar", num_pairs=n, params=counts["total"],
                             active=counts["active"], recall=right.float().mean().item(),
                             by_distance=by_distance(right, distance), loss=curve(hist["loss"], len(pairs))))
    if "lm" in tasks:
        config, model, hist = run_task(name, "lm", args, rank, dev, text, args.lm_steps)
        counts = param_counts(config)
        rows.append(dict(impl=name, ms=mean_ms(hist), task="lm", params=counts["total"],
                         loss=hist["loss"][::max(1, len(hist["loss"]) // 100)],
                         final_loss=sum(hist["loss"][-20:]) / len(hist["loss"][-20:])))
    if "speed" in tasks:
        config, model, hist = run_task(name, "speed", args, rank, dev, text, args.speed_steps)
        timed = hist["seconds"][args.speed_steps // 3:]  # compilation and autotuning happen in the first steps
        ms = 1e3 * sum(timed) / len(timed)
        rows.append(dict(impl=name, ms=ms, task="train_speed", params=param_counts(config)["total"],
                         tokens_per_s=args.batch * world * args.seq / ms * 1e3, peak_mb=peak_mb(dev)))
        rows.append(dict(impl=name, ms=decode_ms(model, args.context, dev), task="decode", context=args.context))
    if rank == 0:
        print(name, "  ".join(f"{r['task']}{'@' + str(r['num_pairs']) if 'num_pairs' in r else ''}: "
                             f"{r.get('recall', r.get('final_loss', r.get('tokens_per_s', r['ms']))):.3g}"
                             for r in rows), flush=True)
    return rows


def by_distance(right, distance, width=16):
    """Recall against the distance from the queried key to its query, in bins of `width` tokens:
    [[first, last, recall, queries], ...] for the bins that hold queries."""
    rows = []
    for lo in range(0, int(distance.max()) + 1, width):
        inside = (distance >= lo) & (distance < lo + width)
        if inside.any():
            rows.append([lo, lo + width - 1, right[inside].float().mean().item(), int(inside.sum())])
    return rows


def curve(losses, period, points=100):
    """A learning curve of at most `points` means over windows of whole periods (one step of each pair count
    a period), so every point averages the same mix of tasks."""
    width = min(len(losses), period * max(1, -(-len(losses) // (period * points)))) or 1
    return [sum(losses[i:i + width]) / width for i in range(0, len(losses) - width + 1, width)]


def mean_ms(hist, last=20):
    """Milliseconds a training step over the last `last` steps of a history."""
    return 1e3 * sum(hist["seconds"][-last:]) / len(hist["seconds"][-last:])


def merge(paths, out):
    """One capstone.json from several (one preset or task each, or earlier merges): the rows together, each part's
    config with the presets it covers, and at the top the settings that every part shares."""
    docs = [json.loads(pathlib.Path(f).read_text()) for f in paths]
    rows, parts = {}, []
    for d in docs:  # a later file's row replaces an earlier one of the same preset, task and pair count
        rows.update({(r["impl"], r["task"], r.get("num_pairs")): r for r in d["rows"]})
        for part in d["config"].get("parts") or [dict(d["config"], presets=sorted({r["impl"] for r in d["rows"]}))]:
            part.setdefault("date", d["date"])  # when this part was measured
            for old in parts:  # the presets a later run of the same tasks measured again leave the earlier part
                if old["tasks"] == part["tasks"]:
                    old["presets"] = [n for n in old["presets"] if n not in part["presets"]]
            parts = [old for old in parts if old["presets"]] + [part]
    rows = list(rows.values())
    shared = {k: v for k, v in parts[0].items() if k not in ("tasks", "presets", "date")
              and all(k in p and p[k] == v for p in parts)}  # the settings every part ran with
    config = dict(shared, parts=parts)
    env = {k: docs[0][k] for k in ("device", "torch", "triton", "cuda")}  # where the rows were measured
    env["date"] = max(d["date"] for d in docs)  # the newest measurement
    for f, d in zip(paths, docs):
        if any(d[k] != env[k] for k in ("device", "torch", "triton")):
            raise SystemExit(f"--merge: {f} was measured on {d['device']} (torch {d['torch']}, triton "
                             f"{d['triton']}), {paths[0]} on {env['device']} (torch {env['torch']}, triton "
                             f"{env['triton']}): merge only results of one machine and software")
    return bench.save_results("capstone", config, rows, pathlib.Path(out) / "capstone.json" if out else None, env)


@torch.no_grad()
def decode_ms(model, context, dev, new_tokens=16, warmup=16):
    """Milliseconds a decoded token after a prompt of `context` tokens (one sequence, caches), after `warmup`
    untimed tokens: the decoding kernels compile on the first, and again for each new specialisation of a
    length argument (Triton specialises integers divisible by 16), so the warm-up covers 16 lengths."""
    model.eval()
    prompt = torch.randint(0, model.config.vocab_size, (1, context), device=dev)
    caches = model.new_caches(1, context + warmup + new_tokens + 1)
    logits = model(prompt, caches)[:, -1:]
    for _ in range(warmup):
        logits = model(logits.argmax(-1), caches)[:, -1:]
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t0 = time.perf_counter()
    for _ in range(new_tokens):
        logits = model(logits.argmax(-1), caches)[:, -1:]
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return 1e3 * (time.perf_counter() - t0) / new_tokens


if __name__ == "__main__":
    main()
