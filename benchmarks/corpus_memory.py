"""Memory of the env on a real collection: one env, 4 sync sub-envs, the native vector env; bytes per document.

Each setting runs in a fresh process and reports its peak resident memory above a process that only imported
the package, so the ratios compare what the envs themselves hold. The breakdown comes from
``Corpus.memory()`` (rows, versions, ids, the id-to-row dict, texts) and a deep size of the dataset's own
document dicts.

    .venv/bin/python benchmarks/corpus_memory.py --data ../shared/data/npl
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SETTINGS = {
    "imports only": "pass",
    "one env": "env = gymnasium.make('SearchR3-v0', dataset=DATA); env.reset(seed=0)",
    "sync make_vec, 4 sub-envs": "env = gymnasium.make_vec('SearchR3-v0', num_envs=4, vectorization_mode='sync', "
                                 "dataset=DATA); env.reset(seed=0)",
    "native make_vec, 4 envs": "env = gymnasium.make_vec('SearchR3-v0', num_envs=4, dataset=DATA); env.reset(seed=0)",
}
CHILD = """
import resource, gymnasium, searchr3_env
DATA = {data!r}
{setup}
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def peak_rss(setup: str, data: str) -> int:
    """Peak resident bytes of a fresh process that runs ``setup``."""
    out = subprocess.run([sys.executable, "-c", CHILD.format(data=data, setup=setup)], capture_output=True, text=True,
                         check=True, cwd=REPO)
    return int(out.stdout.split()[-1])


def deep_size(obj, seen: set | None = None) -> int:
    """Bytes of an object and everything it holds (dicts, tuples, dataclass fields, strings)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    size = sys.getsizeof(obj)
    if isinstance(obj, dict):
        size += sum(deep_size(k, seen) + deep_size(v, seen) for k, v in obj.items())
    elif isinstance(obj, (list, tuple, set, frozenset)):
        size += sum(deep_size(v, seen) for v in obj)
    elif hasattr(obj, "__dict__"):
        size += deep_size(vars(obj), seen)
    elif hasattr(obj, "__slots__"):
        size += sum(deep_size(getattr(obj, s), seen) for s in obj.__slots__ if hasattr(obj, s))
    return size


def breakdown(data: str) -> dict[str, float]:
    """Bytes per document of each part one env holds."""
    from searchr3_env.corpus import Corpus
    from searchr3_env.task import resolve_dataset

    dataset = resolve_dataset(data)
    corpus = Corpus(dataset, refresh="frozen")
    parts = corpus.memory() | {"dataset documents (dicts)": deep_size(dict(dataset.corpus))}
    parts["full refresh's second matrix (during a build)"] = parts["rows"]
    return {name: size / len(dataset.corpus) for name, size in parts.items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "npl"), help="BEIR folder")
    args = parser.parse_args(argv)
    rss = {name: peak_rss(setup, args.data) for name, setup in SETTINGS.items()}
    base = rss.pop("imports only")
    above = {name: value - base for name, value in rss.items()}
    print(f"| setting | peak RSS above imports (MB) | vs one env |\n|---|---|---|")
    for name, value in above.items():
        print(f"| {name} | {value / 2**20:.0f} | {value / above['one env']:.2f}x |")
    print("\n| part | bytes per document |\n|---|---|")
    for name, value in breakdown(args.data).items():
        print(f"| {name} | {value:,.0f} |")
    print(json.dumps({"rss_above_imports": above}))


if __name__ == "__main__":
    main()
