"""Chapter 9's side-by-side training: every preset at equal size on MQAR and on the standard library's source.

    PYTHONPATH=. python bench/capstone.py --out bench/results               # one GPU, from the repository root
    PYTHONPATH=. torchrun --nproc_per_node 8 bench/capstone.py --out bench/results   # DDP over 8 GPUs
    PYTHONPATH=. torchrun --nproc_per_node 8 bench/capstone.py --fsdp --out DIR      # FSDP2 over 8 GPUs
    PYTHONPATH=. python bench/capstone.py --smoke --out /tmp/capstone       # a CPU: tiny, seconds

For each preset of minisparse.models (the small scale: 8 layers, 8 experts top-2, byte vocabulary, width
`--hidden`): (a) MQAR — AdamW on a mix of 4 .. 64 key-value pairs, then recall accuracy against the number
of pairs; (b) language modelling on byte windows of the Python standard library's source (offline everywhere);
training tokens/s and peak memory; (c) decoding latency per token after a prompt of `--context` tokens. Every preset
sees the same batches (one seed a step and rank). Under torchrun the model is wrapped in DDP, or sharded with FSDP2
(`--fsdp`: each block, then the root) (NCCL on GPUs, gloo on CPUs); rank 0 writes `capstone.json`
(minisparse.bench.save_results): rows {impl: preset, ms, task, ...}. Checkpoints go to `--ckpt`, the full state in
one file (gathered from every rank, written by rank 0 with torch.save, read by every rank with
torch.load(weights_only=True)); `--resume` continues.
A preset that fails leaves a row {task: "error"} and the others run on. To fit short per-command limits, run the
presets in separate calls (`--presets qwen3_next_like --out DIR/qwen`) and merge the rows.
"""
from __future__ import annotations

import argparse
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
                                     recall_accuracy, save_checkpoint, stdlib_bytes, train)

MQAR_VOCAB = 256  # keys 0..127, values 128..255: room for 64 pairs


def setup():
    """(rank, world, device): a process group under torchrun with several processes, else one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if torch.cuda.is_available():
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
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


def peak_mb(dev):
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev) / 2**20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_task(name, task, args, rank, dev, get_batch, steps):
    torch.manual_seed(0)
    config, model = build(name, args, dev)
    ckpt = pathlib.Path(args.ckpt) / f"{name}-{task}.pt" if args.ckpt else None
    opt, start, history = None, 0, None
    if ckpt is not None and args.resume and ckpt.exists():
        opt, start, history = load_checkpoint(ckpt, model, lr=args.lr)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
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
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--lm-steps", type=int, default=400)
    p.add_argument("--batch", type=int, default=64, help="sequences a step and rank")
    p.add_argument("--seq", type=int, default=512, help="LM window")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--context", type=int, default=8192, help="decode latency after this many tokens")
    p.add_argument("--ckpt", default=None, help="checkpoint directory")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--fsdp", action="store_true", help="under torchrun: shard the models with FSDP2 instead of "
                   "replicating them with DDP")
    p.add_argument("--smoke", action="store_true", help="tiny sizes and steps: checks the script runs")
    p.add_argument("--autocast", action="store_true", help="bf16 autocast on CUDA (default: fp32 weights "
                   "and activations, the kernels' fp32 path)")
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.lm_steps, args.batch, args.seq, args.context = 4, 3, 4, 32, 32
    rank, world, dev = setup()
    parallel = ("fsdp" if args.fsdp else "ddp") if dist.is_initialized() else None
    if args.fsdp and parallel is None:
        print("--fsdp: one process, nothing to shard; run under torchrun to shard", flush=True)
    pairs = (2, 4, 8) if args.smoke else (4, 8, 16, 32, 64)
    data = stdlib_bytes(200_000 if args.smoke else 20_000_000)

    def mqar(step):
        g = torch.Generator().manual_seed(1000 * step + rank)
        ids, tg = mqar_batch(args.batch, pairs[step % len(pairs)], vocab=MQAR_VOCAB, generator=g)
        return ids.to(dev), tg.to(dev)

    def text(step):
        g = torch.Generator().manual_seed(1000 * step + rank + 7)
        ids, tg = lm_batch(data, args.batch, args.seq, generator=g)
        return ids.to(dev), tg.to(dev)

    rows = []
    for name in args.presets.split(","):
        try:
            with torch.autocast("cuda", torch.bfloat16, enabled=args.autocast and dev.type == "cuda"):
                rows += run_preset(name, args, rank, world, dev, pairs, mqar, text)
        except Exception as err:  # one failing preset must not cost the others' results
            if args.smoke:
                raise
            rows.append(dict(impl=name, ms=None, task="error", error=f"{type(err).__name__}: {err}"[:500]))
            print(f"{name}: failed: {err}", flush=True)
    if rank == 0:
        path = pathlib.Path(args.out) / "capstone.json" if args.out else None
        cfg = dict(steps=args.steps, lm_steps=args.lm_steps, batch=args.batch, world=world, seq=args.seq,
                   hidden=args.hidden, lr=args.lr, pairs=list(pairs), smoke=args.smoke,
                   autocast=args.autocast, context=args.context, parallel=parallel)
        print("wrote", bench.save_results("capstone", cfg, rows, path))
    if dist.is_initialized():
        dist.destroy_process_group()


def run_preset(name, args, rank, world, dev, pairs, mqar, text):
    """MQAR training and recall, LM training, decode latency of one preset: its result rows."""
    rows = []
    config, model, hist = run_task(name, "mqar", args, rank, dev, mqar, args.steps)
    counts = param_counts(config)
    ms = 1e3 * sum(hist["seconds"][-20:]) / len(hist["seconds"][-20:])
    recall = {}
    for n in pairs:
        recall[n] = recall_accuracy(model, n, vocab=MQAR_VOCAB, batch=8 if args.smoke else 256,
                                    batches=1 if args.smoke else 4, progress=rank == 0)
        rows.append(dict(impl=name, ms=ms, task="mqar", num_pairs=n, params=counts["total"],
                         active=counts["active"], recall=recall[n]))
    config, model, hist = run_task(name, "lm", args, rank, dev, text, args.lm_steps)
    ms = 1e3 * sum(hist["seconds"][-20:]) / len(hist["seconds"][-20:])
    tokens = args.batch * world * args.seq
    rows.append(dict(impl=name, ms=ms, task="lm", params=counts["total"], tokens_per_s=tokens / ms * 1e3,
                     peak_mb=peak_mb(dev), loss=hist["loss"][::max(1, len(hist["loss"]) // 100)],
                     final_loss=sum(hist["loss"][-20:]) / len(hist["loss"][-20:])))
    rows.append(dict(impl=name, ms=decode_ms(model, args.context, dev), task="decode", context=args.context))
    if rank == 0:
        print(f"{name:18s} recall@{pairs[-1]} {recall[pairs[-1]]:.2f}  lm {rows[-2]['final_loss']:.3f}  "
              f"{rows[-2]['tokens_per_s']:.0f} tok/s  decode {rows[-1]['ms']:.2f} ms/token", flush=True)
    return rows


@torch.no_grad()
def decode_ms(model, context, dev, new_tokens=16):
    """Milliseconds a decoded token after a prompt of `context` tokens (one sequence, caches)."""
    model.eval()
    prompt = torch.randint(0, model.config.vocab_size, (1, context), device=dev)
    caches = model.new_caches(1, context + new_tokens + 1)
    logits = model(prompt, caches)[:, -1:]
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
