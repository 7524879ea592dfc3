"""What SPT costs a pretrained model before any fine-tuning: SmolLM2-135M held-out loss per SPT setting.

Each setting patches a fresh copy of the model (`patch_model`), optionally calibrates it (`calibrate`, on training
chunks of Cranfield documents) and measures the causal-LM loss on held-out chunks (the last documents of the
corpus, never used for calibration). This isolates the approximation error of sparse attention and of the routed
FFN from fine-tuning: a setting that starts far from dense leaves fine-tuning a gap to close first.

    .venv/bin/python benchmarks/spt_quality.py --seq-len 256 --heldout-chunks 4

Writes ``runs/spt_quality.md``: its table goes into ``benchmarks/results/spt.md`` ("Before fine-tuning").
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from spt_finetune import CORPUS, load_chunks  # noqa: E402

# (label, SPTConfig overrides, calibrate() keyword arguments or None for no calibration[, "oracle"])
PLAIN_BLOCKS = {"regroup": False}  # routers fitted, blocks left as consecutive units
UNCOMPENSATED = {"compensate": False}  # nothing added back for skipped blocks (RoutedMLP.skip_compensation)
ORACLE = "oracle"  # route by the measured block norms instead of the router: the ceiling of any router
FFN_ONLY = dict(sparse_attention=False)
SETTINGS = [
    ("attention s=8, PQ matches only (no sinks)", dict(routed_ffn=False, sink_keys=0, keep_self=False), {}),
    ("attention s=8", dict(routed_ffn=False), {}),
    ("attention s=4", dict(routed_ffn=False, sparsity=4), {}),
    ("attention s=2", dict(routed_ffn=False, sparsity=2), {}),
    ("FFN 2 of 4 blocks, random router", FFN_ONLY, None),
    ("FFN 2 of 4 blocks, fitted router, consecutive units", FFN_ONLY, PLAIN_BLOCKS),
    ("FFN 2 of 4 blocks, uncompensated", FFN_ONLY, UNCOMPENSATED),
    ("FFN 2 of 4 blocks", FFN_ONLY, {}),
    ("FFN 2 of 4 blocks, oracle routing", FFN_ONLY, {}, ORACLE),
    ("FFN 32 of 64 blocks", dict(FFN_ONLY, ffn_blocks=64, ffn_active_blocks=32), {}),
    ("FFN 3 of 4 blocks", dict(FFN_ONLY, ffn_active_blocks=3), {}),
    ("FFN 6 of 8 blocks, fitted router, consecutive units", dict(FFN_ONLY, ffn_blocks=8, ffn_active_blocks=6),
     PLAIN_BLOCKS),
    ("FFN 6 of 8 blocks, uncompensated", dict(FFN_ONLY, ffn_blocks=8, ffn_active_blocks=6), UNCOMPENSATED),
    ("FFN 6 of 8 blocks", dict(FFN_ONLY, ffn_blocks=8, ffn_active_blocks=6), {}),
    ("FFN 6 of 8 blocks, oracle routing", dict(FFN_ONLY, ffn_blocks=8, ffn_active_blocks=6), {}, ORACLE),
    ("FFN 12 of 16 blocks", dict(FFN_ONLY, ffn_blocks=16, ffn_active_blocks=12), {}),
    ("FFN 24 of 32 blocks", dict(FFN_ONLY, ffn_blocks=32, ffn_active_blocks=24), {}),
    ("FFN 48 of 64 blocks, uncompensated", dict(FFN_ONLY, ffn_blocks=64, ffn_active_blocks=48), UNCOMPENSATED),
    ("FFN 48 of 64 blocks", dict(FFN_ONLY, ffn_blocks=64, ffn_active_blocks=48), {}),
    ("FFN 48 of 64 blocks, oracle routing", dict(FFN_ONLY, ffn_blocks=64, ffn_active_blocks=48), {}, ORACLE),
    ("FFN 14 of 16 blocks", dict(FFN_ONLY, ffn_blocks=16, ffn_active_blocks=14), {}),
    ("both: s=8, FFN 2 of 4 (the issue's speed setting)", dict(), {}),
    ("both: s=8, FFN 6 of 8", dict(ffn_blocks=8, ffn_active_blocks=6), {}),
    ("both: s=4, FFN 6 of 8", dict(sparsity=4, ffn_blocks=8, ffn_active_blocks=6), {}),
    ("both: s=4, FFN 48 of 64", dict(sparsity=4, ffn_blocks=64, ffn_active_blocks=48), {}),
]


class OracleRouting:
    """Stands in for every router (through RoutedMLP's `calibration` hook): each token runs the k blocks whose
    share of the dense FFN output is largest under the current weights, measured, not predicted."""

    def observe(self, mlp, tokens: torch.Tensor) -> torch.Tensor:
        from spt_kernels.routed_ffn import routed_ffn

        _, norms = mlp.dense_with_block_norms(tokens)
        blocks = norms.topk(mlp.active_blocks, dim=-1).indices
        ones = torch.ones(blocks.shape, dtype=tokens.dtype)
        return routed_ffn(tokens, *mlp.block_ordered_weights(), blocks, ones, mlp.n_blocks)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--data", default=str(CORPUS))
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--heldout-docs", type=int, default=20)
    p.add_argument("--heldout-chunks", type=int, default=4)
    p.add_argument("--calibration-chunks", type=int, default=8)
    p.add_argument("--only", nargs="+", metavar="TEXT", help="run only the settings whose label contains one of these")
    p.add_argument("--md", default=str(HERE.parent / "runs" / "spt_quality.md"))
    args = p.parse_args()

    from agents.models import load_causal_lm
    from spt_kernels import SPTConfig, calibrate, patch_model
    from spt_kernels.routed_mlp import RoutedMLP

    base, tokenizer = load_causal_lm(args.model)
    base.eval()
    train, heldout = load_chunks(tokenizer, Path(args.data), args.seq_len, args.heldout_docs)
    heldout = torch.tensor(heldout[: args.heldout_chunks])
    calibration = torch.tensor(train[:: max(1, len(train) // args.calibration_chunks)][: args.calibration_chunks])

    def loss(model) -> float:
        with torch.no_grad():
            return sum(model(input_ids=x[None], labels=x[None]).loss.item() for x in heldout) / len(heldout)

    start = time.perf_counter()
    dense = loss(base)
    rows = [f"| dense (no SPT) | | {dense:.4f} | |"]
    print(rows[-1], flush=True)
    settings = [row for row in SETTINGS if not args.only or any(text in row[0] for text in args.only)]
    for label, overrides, calibration_kwargs, *routing in settings:
        model = patch_model(copy.deepcopy(base), SPTConfig(**overrides))
        if calibration_kwargs is not None:
            calibrate(model, calibration.split(1), progress=False, **calibration_kwargs)
        if routing == [ORACLE]:
            for mlp in model.modules():
                if isinstance(mlp, RoutedMLP):
                    mlp.calibration = OracleRouting()
        value = loss(model)
        calibrated = "no" if calibration_kwargs is None else "yes"
        rows.append(f"| {label} | {calibrated} | {value:.4f} | {100 * (value - dense) / dense:+.1f}% |")
        print(rows[-1], flush=True)
    minutes = (time.perf_counter() - start) / 60
    cmd = shlex.join([".venv/bin/python", "benchmarks/spt_quality.py", *sys.argv[1:]])
    Path(args.md).parent.mkdir(parents=True, exist_ok=True)
    Path(args.md).write_text(f"""# SPT before fine-tuning: SmolLM2-135M-Instruct held-out loss per setting (CPU)

Generated by `benchmarks/spt_quality.py` on {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC in {minutes:.1f} min:

    {cmd}

Machine: {platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}, torch {torch.__version__}.
Held-out: {len(heldout)} chunks of {args.seq_len} tokens from the last {args.heldout_docs} Cranfield documents.
Calibration: {len(calibration)} training chunks (`spt_kernels.calibrate`: hidden units regrouped into blocks by
co-activation unless a row says "consecutive units", ridge-fitted routers, k-means codebooks).
Routed FFNs add back the fitted compensation of each skipped block (`RoutedMLP.skip_compensation`) unless a row
says "uncompensated".
"Oracle routing" rows replace every router by the exact top-k blocks by the norm of their share of the dense
output, uncompensated (the ceiling a router can reach with those blocks). FFN-only rows keep attention dense.
Unless a row says otherwise: PQ with 8-dim subspaces and 16 codewords, the first key and each query's own key always
kept (`sink_keys=1`, `keep_self=True`).

| setting | calibrated | held-out loss | vs dense |
|---|---|---|---|
""" + "\n".join(rows) + "\n")
    print(Path(args.md).read_text())


if __name__ == "__main__":
    main()
