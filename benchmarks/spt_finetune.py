"""Small fine-tuning run (full or LoRA) of SmolLM2-135M-Instruct with and without SPT, same seed and same data.

Task: causal-LM loss on Cranfield documents (``title . text``, EOS-separated, packed into ``--seq-len`` token
sequences). The last ``--heldout-docs`` documents are held out and never trained on. Both runs start from the same
weights, get the same LoRA init if any (same seed) and see the same batches in the same order; the SPT run is patched with
``SPTConfig(sparsity, ffn_blocks, ffn_active_blocks)`` (after LoRA is attached, so its routers train too).

Each run executes in its own subprocess (so peak RSS, read from /proc/self/status VmHWM, is per run) and logs
per-step loss, step time and peak RSS. Afterwards the held-out loss is measured:
  * dense run: under the dense model;
  * SPT run: under the SPT model (the function it was trained as) and, after ``unpatch_model``, under the *dense*
    model with the fine-tuned weights (the quality of the weights themselves; the routers are dropped);
  * the base model before fine-tuning, for reference.

Outputs: the record, all per-step logs as JSON (``--json``, default ``benchmarks/results/records/spt/``: the
SPT table in ``benchmarks/RESULTS.md`` is generated from these by ``benchmarks/tables.py``), the loss curves
(``--png``, beside ``benchmarks/results/spt.md``) and the run's Markdown section (``--md``, under ``runs/``: paste
it into ``benchmarks/results/spt.md``). ``--render-only RECORD`` re-draws the PNG and Markdown from a record.

On CPU SPT runs its PyTorch reference path (gather-based sparse attention, block-sliced FFN), which is *slower*
than dense SDPA / GEMMs; speed on CPU is not the point, the loss gap is. GPU speed comes from
``benchmarks/gpu_check_spt.sh``.

    .venv/bin/python benchmarks/spt_finetune.py --steps 24 --seq-len 128 --batch 2
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

CORPUS = Path("/work/shared/data/cranfield/corpus.jsonl")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def peak_rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_chunks(tokenizer, path: Path, seq_len: int, heldout_docs: int):
    """(train_chunks, heldout_chunks): lists of seq_len-token id lists, packed from EOS-separated documents."""
    docs = []
    with open(path) as f:
        for line in f:
            d = json.loads(line)
            text = d.get("text") or ""
            title = d.get("title") or ""
            docs.append(text if text.startswith(title) else f"{title} . {text}")
    eos = tokenizer.eos_token_id

    def pack(ds):
        ids = []
        for text in ds:
            ids.extend(tokenizer(text, add_special_tokens=False).input_ids)
            ids.append(eos)
        return [ids[i : i + seq_len] for i in range(0, len(ids) - seq_len + 1, seq_len)]

    return pack(docs[:-heldout_docs]), pack(docs[-heldout_docs:])


def run_one(args) -> dict:
    """One fine-tuning run (dense or spt) in this process; returns its log."""
    import torch
    from peft import LoraConfig, get_peft_model
    from tqdm import tqdm

    from agents.models import load_causal_lm
    from spt_kernels import SPTConfig, calibrate, patch_model, router_recall, unpatch_model

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_causal_lm(args.model)
    train, heldout = load_chunks(tokenizer, Path(args.data), args.seq_len, args.heldout_docs)
    g = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(train), generator=g)[: args.steps * args.batch].tolist()
    batches = [torch.tensor([train[i] for i in order[s * args.batch : (s + 1) * args.batch]]) for s in range(args.steps)]
    heldout = torch.tensor(heldout[: args.heldout_chunks])

    def heldout_loss(m) -> float:
        m.eval()
        losses = []
        with torch.no_grad():
            for i in range(0, len(heldout), args.batch):
                x = heldout[i : i + args.batch]
                losses.append(m(input_ids=x, labels=x).loss.item() * len(x))
        return sum(losses) / len(heldout)

    log: dict = {"run": args.run, "n_train_chunks": len(train), "n_heldout_chunks": len(heldout)}
    if args.run == "dense" and not args.skip_base_eval:
        log["heldout_base"] = heldout_loss(model)

    torch.manual_seed(args.seed)
    if args.mode == "lora":
        lora = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0, target_modules=LORA_TARGETS)
        model = get_peft_model(model, lora)  # lora_dropout=0: the routed FFN folds MLP adapters into the weight
    if args.run == "spt":
        cfg = SPTConfig(sparsity=args.sparsity, ffn_blocks=args.ffn_blocks, ffn_active_blocks=args.ffn_active,
                        sparse_attention=args.sparsity > 1, routed_ffn=args.ffn_active < args.ffn_blocks)
        patch_model(model, cfg)  # after LoRA, so the new routers stay trainable
        log["spt_config"] = vars(cfg)
        calibration = torch.tensor(train[len(train) - args.calibration_chunks :]).split(args.batch)  # not held out
        if args.calibration_chunks:
            calibrate(model, calibration, progress=False)
        log["heldout_spt_start"] = heldout_loss(model)
        if args.freeze_routers:  # diagnostic: keep the calibrated block choices' router fixed during fine-tuning
            for name, p in model.named_parameters():
                if ".router." in name:
                    p.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    log["trainable_params"] = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    model.train()
    losses, times, rss = [], [], []
    routed = args.run == "spt" and args.ffn_active < args.ffn_blocks
    recall_log = []

    def probe(step: int) -> None:
        """Router recall on held-out chunks: does top-k of the router still pick the blocks that matter?"""
        if routed and args.probe_every and (step % args.probe_every == 0 or step == args.steps):
            recall = router_recall(model, heldout[: args.batch].split(args.batch))
            recall_log.append([step, sum(recall) / len(recall), min(recall)])

    probe(0)
    for step, x in enumerate(tqdm(batches, desc=args.run, file=sys.stderr, mininterval=5), start=1):
        if routed and args.recalibrate_every and step > 1 and (step - 1) % args.recalibrate_every == 0:
            calibrate(model, calibration, regroup=False, progress=False)  # routers re-fit to the moved weights
        t0 = time.perf_counter()
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
        rss.append(peak_rss_mib())
        probe(step)
    log.update(loss=losses, step_time=times, peak_rss_mib=rss, router_recall=recall_log)
    log["heldout_own"] = heldout_loss(model)  # dense: dense; spt: under SPT
    if args.run == "spt":
        unpatch_model(model)
        log["heldout_dense_eval"] = heldout_loss(model)
    return log


def mean(xs):
    return sum(xs) / len(xs)


def write_outputs(args, dense: dict, spt: dict, wall: dict, cmd: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    steps = range(1, len(dense["loss"]) + 1)
    ax.plot(steps, dense["loss"], label=f"dense ({args.mode})", marker=".")
    ax.plot(steps, spt["loss"], label=f"SPT s={args.sparsity}, {args.ffn_active}/{args.ffn_blocks} FFN blocks ({args.mode})",
            marker=".")
    ax.set_xlabel("step")
    ax.set_ylabel("train LM loss")
    ax.set_title(f"SmolLM2-135M on Cranfield, {args.batch}x{args.seq_len} tokens/step")
    ax.legend()
    ax.grid(alpha=0.3)
    ax2.plot(steps, dense["step_time"], label="dense")
    ax2.plot(steps, spt["step_time"], label="SPT (PyTorch reference on CPU)")
    ax2.set_xlabel("step")
    ax2.set_ylabel("step time (s), 2-core CPU")
    ax2.legend()
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.png, dpi=110)

    k = max(1, len(dense["loss"]) // 4)  # "final" loss: mean of the last quarter of steps (single steps are noisy)
    rows = []

    def gap(a, b):
        return f"{100 * (b - a) / a:+.2f}%"

    fd, fs = mean(dense["loss"][-k:]), mean(spt["loss"][-k:])
    md, ms = mean(dense["loss"]), mean(spt["loss"])
    td, ts = mean(dense["step_time"][1:]), mean(spt["step_time"][1:])
    rd, rs = dense["peak_rss_mib"][-1], spt["peak_rss_mib"][-1]
    rows.append(f"| train loss, first step | {dense['loss'][0]:.4f} | {spt['loss'][0]:.4f} | {gap(dense['loss'][0], spt['loss'][0])} |")
    rows.append(f"| train loss, final (mean of last {k} steps) | {fd:.4f} | {fs:.4f} | {gap(fd, fs)} |")
    rows.append(f"| train loss, mean over all steps | {md:.4f} | {ms:.4f} | {gap(md, ms)} |")
    hd = dense["heldout_own"]
    if "heldout_base" in dense and "heldout_spt_start" in spt:
        hb, hs = dense["heldout_base"], spt["heldout_spt_start"]
        rows.append(f"| held-out loss before fine-tuning (SPT: patched and calibrated) | {hb:.4f} | {hs:.4f} | {gap(hb, hs)} |")
    rows.append(f"| held-out loss, each under its own model (SPT run: patched) | {hd:.4f} | {spt['heldout_own']:.4f} | {gap(hd, spt['heldout_own'])} |")
    rows.append(f"| held-out loss under the *dense* model (SPT run: unpatched) | {hd:.4f} | {spt['heldout_dense_eval']:.4f} | {gap(hd, spt['heldout_dense_eval'])} |")
    if spt.get("router_recall"):
        trace = ", ".join(f"{step}: {mean_r:.3f} (min {min_r:.3f})" for step, mean_r, min_r in spt["router_recall"])
        rows.append(f"| router recall on held-out tokens, by step (mean over layers) | n/a | {trace} | |")
    rows.append(f"| mean step time, s (excl. step 1) | {td:.2f} | {ts:.2f} | x{ts / td:.2f} |")
    rows.append(f"| peak RSS, MiB | {rd:.0f} | {rs:.0f} | x{rs / rd:.2f} |")
    rows.append(f"| run wall time incl. load + eval, s | {wall['dense']:.0f} | {wall['spt']:.0f} | x{wall['spt'] / wall['dense']:.2f} |")

    try:
        load = os.getloadavg()
        load_s = f"load average at end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}"
    except OSError:
        load_s = ""
    base = dense.get("heldout_base")
    setup = (
        f"LoRA r={args.lora_r} (alpha {2 * args.lora_r}, dropout 0) on q/k/v/o/gate/up/down"
        if args.mode == "lora"
        else f"full fine-tuning ({dense['trainable_params'] / 1e6:.1f} M params; SPT adds "
        f"{(spt['trainable_params'] - dense['trainable_params']) / 1e3:.1f} k router params)"
    )
    md_text = f"""# SPT fine-tuning check: SmolLM2-135M-Instruct, dense vs SPT (CPU)

Generated by `benchmarks/spt_finetune.py` on {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC.

    {cmd}

Machine: {platform.machine()}, {os.cpu_count()} CPU cores ({load_s}; 2 = this run alone), torch threads
{args.threads or "default"}, Python {platform.python_version()}, {platform.platform()}.

Setup: {setup}, AdamW lr {args.lr},
{args.steps} steps of {args.batch} x {args.seq_len} tokens from Cranfield documents (packed, EOS-separated, seed
{args.seed}; both runs see identical batches in identical order and get identical LoRA init, if any). SPT run:
`SPTConfig(sparsity={args.sparsity}, ffn_blocks={args.ffn_blocks}, ffn_active_blocks={args.ffn_active})`
(sparse attention {"off: s = 1 is dense attention" if args.sparsity <= 1 else "on"}; routed FFN {"off: every block active" if args.ffn_active >= args.ffn_blocks else "on"}), patched after LoRA, if any,
so the routers train too, then calibrated (`spt_kernels.calibrate`) on {getattr(args, "calibration_chunks", 0)} training chunks{f", routers re-fitted every {args.recalibrate_every} steps" if getattr(args, "recalibrate_every", 0) else ""}. Held-out: {dense['n_heldout_chunks']} chunks of {args.seq_len} tokens from the
last {args.heldout_docs} documents (never trained on). Base model held-out loss before fine-tuning:
{f"{base:.4f}" if base is not None else "n/a"}.

| metric | dense | SPT | SPT vs dense |
|---|---|---|---|
""" + "\n".join(rows) + f"""

Goal: SPT quality within 2% of dense. The "held-out under the dense model" row evaluates the SPT-trained
weights after `unpatch_model` (routers and codebooks dropped, full attention and full FFN), i.e. the quality of the
weights rather than of the sparse function.

**Speed and memory on CPU are not the point.** On CPU, SPT runs its PyTorch *reference* path (gather-based sparse
attention over ceil(L/s) candidate keys, block-sliced routed FFN in a Python loop over blocks, codebook EMA
updates), which is not built for speed; the step-time and RSS ratios above describe that reference implementation on
a 2-core CPU and say nothing about the Triton kernels. GPU numbers come from `benchmarks/gpu_check_spt.sh` on a device.

{args.note}

![loss curves]({Path(args.png).name})
"""
    Path(args.md).parent.mkdir(parents=True, exist_ok=True)
    Path(args.md).write_text(md_text)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--data", default=str(CORPUS))
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--lr", type=float, default=5e-5, help="AdamW lr (use ~1e-3 with --mode lora)")
    p.add_argument("--mode", choices=["full", "lora"], default="full", help="full fine-tuning or LoRA")
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--sparsity", type=int, default=8, help="attention sparsity s; 1: dense attention (FFN-only SPT)")
    p.add_argument("--ffn-blocks", type=int, default=4)
    p.add_argument("--ffn-active", type=int, default=2)
    p.add_argument("--calibration-chunks", type=int, default=16,
                   help="training chunks that calibrate the SPT model's routers and codebooks first (0: none)")
    p.add_argument("--freeze-routers", action="store_true", help="SPT run: do not train the FFN routers")
    p.add_argument("--recalibrate-every", type=int, default=0,
                   help="SPT run: re-fit routers and codebooks (calibrate, regroup=False) every N steps (0: never)")
    p.add_argument("--probe-every", type=int, default=10,
                   help="SPT run: measure router recall (spt_kernels.router_recall) every N steps (0: never)")
    p.add_argument("--heldout-docs", type=int, default=20)
    p.add_argument("--heldout-chunks", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    p.add_argument("--skip-base-eval", action="store_true")
    p.add_argument("--note", default="", help="free text appended to the Markdown (e.g. run conditions)")
    p.add_argument("--json", default=str(HERE / "results" / "records" / "spt" / "spt_finetune.json"),
                   help="the run's record: all per-step logs as JSON (input for --render-only and benchmarks/tables.py)")
    p.add_argument("--render-only", help="re-write the PNG and Markdown from this saved spt_finetune.json")
    p.add_argument("--png", default=str(HERE / "results" / "spt_finetune.png"))
    p.add_argument("--md", default=str(HERE.parent / "runs" / "spt_finetune.md"))
    p.add_argument("--run", choices=["dense", "spt"], help="internal: run one side in this process")
    p.add_argument("--log", help="internal: where --run writes its JSON log")
    args = p.parse_args()

    if args.run:
        Path(args.log).write_text(json.dumps(run_one(args)))
        return

    if args.render_only:
        saved = json.loads(Path(args.render_only).read_text())
        for key in ("note", "png", "md"):
            saved["args"][key] = getattr(args, key)
        write_outputs(argparse.Namespace(**saved["args"]), saved["dense"], saved["spt"], saved["wall_s"], saved["cmd"])
        return

    cmd = " ".join([".venv/bin/python", "benchmarks/spt_finetune.py", *sys.argv[1:]])
    logs, wall = {}, {}
    json_path = Path(args.json)
    for run in ("dense", "spt"):
        out = json_path.with_name(f".{json_path.stem}.{run}.json")
        t0 = time.perf_counter()
        subprocess.run([sys.executable, __file__, *sys.argv[1:], "--run", run, "--log", str(out)], check=True)
        wall[run] = time.perf_counter() - t0
        logs[run] = json.loads(out.read_text())
        out.unlink()
        print(f"{run}: wall {wall[run]:.0f} s, final loss {logs[run]['loss'][-1]:.4f}", file=sys.stderr)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps({"args": vars(args), "cmd": cmd, "wall_s": wall, **logs}, indent=1))
    write_outputs(args, logs["dense"], logs["spt"], wall, cmd)
    print(Path(args.md).read_text())


if __name__ == "__main__":
    main()
