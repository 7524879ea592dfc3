"""searchr3_env: a Gymnasium environment where the action is a query embedding and the reward its ranking.

``import searchr3_env`` registers ``SearchR3-v0``::

    import gymnasium, searchr3_env
    env = gymnasium.make("SearchR3-v0")                      # synthetic collection, hashing documents
    env = gymnasium.make("SearchR3-v0", dataset="path/to/beir/folder", split="test")
    vec = gymnasium.make_vec("SearchR3-v0", num_envs=64)     # one matrix product per step
"""

from gymnasium.envs.registration import register, registry

from .beir import load_beir
from .corpus import Corpus
from .dataset import Document, DatasetError, RetrievalDataset, query_split_of
from .encoders import Encoder, HashingEncoder
from .env import RetrievalEnv
from .evaluation import evaluate_agent
from .index import CorpusIndex, IndexFileError, load_or_build_index
from .ir_datasets_adapter import load_ir_datasets
from .metrics import evaluate_run
from .minilm import MiniLMEncoder
from .residual import ResidualEmbedding
from .synthetic import make_synthetic
from .task import RetrievalTask
from .trec_run import read_trec_run, write_trec_run
from .vector_env import RetrievalVectorEnv

ENV_ID = "SearchR3-v0"

if ENV_ID not in registry:
    register(
        id=ENV_ID,
        entry_point="searchr3_env.env:RetrievalEnv",
        vector_entry_point="searchr3_env.vector_env:RetrievalVectorEnv",
        disable_env_checker=False,
    )

__all__ = [
    "ENV_ID",
    "Corpus",
    "CorpusIndex",
    "DatasetError",
    "Document",
    "Encoder",
    "HashingEncoder",
    "IndexFileError",
    "MiniLMEncoder",
    "ResidualEmbedding",
    "RetrievalDataset",
    "RetrievalEnv",
    "RetrievalTask",
    "RetrievalVectorEnv",
    "evaluate_agent",
    "evaluate_run",
    "load_beir",
    "load_ir_datasets",
    "load_or_build_index",
    "make_synthetic",
    "query_split_of",
    "read_trec_run",
    "write_trec_run",
]
