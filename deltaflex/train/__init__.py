"""Training a `CausalLM`: one process or torchrun ranks (FSDP2), DCP checkpoints that resume on any
number of ranks, data from a memory-mapped token file or the synthetic MQAR task.

    from deltaflex.models import preset
    from deltaflex.train import TokenFile, TrainConfig, train

    model_config = preset("deltanet")
    config = TrainConfig(steps=10_000, batch_size=64, seq_len=2048, lr=3e-4, save_every=500)
    train(model_config, config, TokenFile("tokens.bin", "uint16", config.seq_len, model_config.vocab_size), "runs/a")
"""

from .config import TrainConfig
from .data import TOKEN_DTYPES, MQARData, TokenFile, write_token_file
from .loop import METRICS_FILE, check_data, optimizer_for, train, warmup_cosine

__all__ = ["METRICS_FILE", "TOKEN_DTYPES", "MQARData", "TokenFile", "TrainConfig", "check_data", "optimizer_for",
           "train", "warmup_cosine", "write_token_file"]
