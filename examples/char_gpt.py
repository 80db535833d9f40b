"""A small character-level GPT trained on the fables in `data/fables.txt`: an example task file.

    python -m resilient_train run examples/char_gpt.py --run-dir runs/gpt      # start
    python -m resilient_train resume runs/gpt                                   # after any stop
    python -m resilient_train export runs/gpt runs/gpt/model.safetensors        # weights alone

and then, in Python, `generate(load_model(cfg, "runs/gpt/model.safetensors"), "THE FOX", 300)`.

The model follows nanoGPT's model.py, cut down to what a CPU run of a few minutes needs: token and
position embeddings, a stack of pre-norm transformer blocks with causal self-attention and an MLP,
a final LayerNorm and an LM head tied to the token embedding. The blocks live in an `nn.ModuleList`
so that `trainer.gradient_checkpointing=true` finds them without further configuration.

Everything the run reads ships with it: the text is declared in ASSETS, so the run folder's task
snapshot holds it and `resume` works from the run folder alone. Nothing is downloaded.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset

# Copied into the run's task snapshot next to this file; read relative to __file__ below.
ASSETS = ["data/fables.txt"]
TEXT_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "fables.txt")

# Sized so that ~300 steps take well under a minute on 2 CPU cores (about 0.35M parameters).
CONFIG: dict[str, Any] = {
    "task": {
        "block_size": 64,  # context length in characters
        "n_layer": 3,
        "n_head": 4,
        "n_embd": 96,
        "dropout": 0.1,
        "lr": 6e-3,  # peak learning rate; a model this small tolerates a high one
        "min_lr_ratio": 0.1,  # the cosine decays to lr * min_lr_ratio at the end of the schedule
        # the schedule's length is the run's first trainer.max_steps, kept in the scheduler's
        # state, so `resume RUN trainer.max_steps=MORE` goes on at the final LR instead of jumping
        # back up the cosine; `task.schedule_steps=N` sets it explicitly instead (docs/configuration.md,
        # "Extending a run")
        "warmup": 30,  # steps of linear warmup
        "weight_decay": 0.1,
        "val_fraction": 0.1,  # the tail of the text held out for validation
    },
    "trainer": {
        "max_steps": 300,
        "batch_size": 32,
        "gradient_clip_val": 1.0,
        "log_every_n_steps": 10,
        "val_every_n_steps": 100,
        "val_batches": 8,
    },
    "checkpoint": {"every_n_steps": 100, "keep_last": 2},
}


# -- data ----------------------------------------------------------------------------------------
def load_text(path: str = TEXT_PATH) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


class Vocab:
    """Characters <-> integer ids; the vocabulary is every distinct character of the text, sorted.

    Deriving it from the text (rather than storing it) is safe because the run snapshot carries
    the very same text file.
    """

    def __init__(self, chars: str) -> None:
        self.chars = chars
        self.stoi = {c: i for i, c in enumerate(chars)}

    @classmethod
    def from_text(cls, text: str) -> Vocab:
        return cls("".join(sorted(set(text))))

    def __len__(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        unknown = sorted(set(text) - set(self.stoi))
        if unknown:
            raise ValueError(f"characters not in the vocabulary: {unknown!r}")
        return [self.stoi[c] for c in text]

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.chars[i] for i in ids)


def load_vocab(path: str = TEXT_PATH) -> Vocab:
    return Vocab.from_text(load_text(path))


class CharWindows(Dataset):
    """(x, y) pairs: `block_size` characters and the same window shifted by one (the targets).

    A map-style dataset (not an iterator) so the trainer's sampler can resume at an exact sample.
    `stride=1` gives every window (training); `stride=block_size` non-overlapping ones (validation).
    """

    def __init__(self, ids: torch.Tensor, block_size: int, stride: int = 1) -> None:
        if len(ids) <= block_size:
            raise ValueError(f"text of {len(ids)} characters is too short for block_size {block_size}")
        self.ids = ids
        self.block_size = block_size
        self.stride = stride

    def __len__(self) -> int:
        return (len(self.ids) - self.block_size - 1) // self.stride + 1

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = index * self.stride
        chunk = self.ids[start : start + self.block_size + 1]
        return chunk[:-1], chunk[1:]


# -- model ---------------------------------------------------------------------------------------
@dataclass
class GPTConfig:
    vocab_size: int
    block_size: int = 64
    n_layer: int = 3
    n_head: int = 4
    n_embd: int = 96
    dropout: float = 0.1


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where each position sees only itself and earlier positions."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be a multiple of n_head"
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # query, key, value in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, T, C) -> (B, n_head, T, head_size): heads become a batch dimension
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        # the fused kernel applies the causal mask itself; attention dropout only while training
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble the heads side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """One transformer block, pre-norm: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            {
                "wte": nn.Embedding(config.vocab_size, config.n_embd),
                "wpe": nn.Embedding(config.block_size, config.n_embd),
                "drop": nn.Dropout(config.dropout),
                "h": nn.ModuleList([Block(config) for _ in range(config.n_layer)]),  # what checkpointing wraps
                "ln_f": nn.LayerNorm(config.n_embd),
            }
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Weight tying: the embedding and the output projection share one matrix. The state dict
        # still lists both keys; the checkpoint stores the tensor once and `export` writes both.
        self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        # GPT-2's scaled init of the residual projections keeps the residual stream's variance flat
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())  # the tied matrix counts once

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits for every position and the mean cross-entropy when `targets` are given.

        Without targets (sampling) only the last position's logits are computed: that is all
        `generate` needs, and it saves the (T, vocab) projection.
        """
        T = idx.size(1)
        assert T <= self.config.block_size, f"sequence of {T} exceeds block_size {self.config.block_size}"
        pos = torch.arange(T, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        if targets is None:
            return self.lm_head(x[:, [-1], :]), None
        logits = self.lm_head(x)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss


# -- helpers for using a trained model -----------------------------------------------------------
def task_settings(cfg: Any) -> dict[str, Any]:
    """The `task` section of a run config (OmegaConf or dict), over this file's defaults.

    Accepts what `build` receives, `OmegaConf.load("RUN/run.yaml")`, or a plain dict, so the same
    helper serves training and sampling from an exported file.
    """
    from omegaconf import OmegaConf

    section = cfg.get("task", {}) if cfg is not None else {}
    if OmegaConf.is_config(section):
        section = OmegaConf.to_container(section, resolve=True)
    return {**CONFIG["task"], **dict(section or {})}


def model_config(cfg: Any, vocab_size: int) -> GPTConfig:
    t = task_settings(cfg)
    return GPTConfig(
        vocab_size=vocab_size,
        block_size=int(t["block_size"]),
        n_layer=int(t["n_layer"]),
        n_head=int(t["n_head"]),
        n_embd=int(t["n_embd"]),
        dropout=float(t["dropout"]),
    )


def load_model(cfg: Any = None, weights: str | None = None, vocab: Vocab | None = None) -> GPT:
    """A GPT shaped by `cfg`'s task section, with weights from an exported .safetensors file.

    The exported keys are the model's own (`transformer.h.0.attn.c_attn.weight`, ...), so they
    load strictly; the tied pair arrives as two equal tensors and lands in the one shared matrix.
    The model is returned in eval mode (dropout off).
    """
    vocab = vocab or load_vocab()
    model = GPT(model_config(cfg, len(vocab)))
    if weights is not None:
        from safetensors.torch import load_file

        model.load_state_dict(load_file(weights), strict=True)
    return model.eval()


@torch.no_grad()
def generate(
    model: GPT,
    prompt: str,
    n_chars: int,
    *,
    vocab: Vocab | None = None,
    temperature: float = 0.8,
    top_k: int | None = 10,
    seed: int | None = 0,
) -> str:
    """The prompt followed by `n_chars` sampled characters.

    Sampling uses its own generator (seeded by `seed`), so it neither disturbs nor depends on the
    global RNG; `temperature` < 1 and `top_k` trade variety for legibility.
    """
    vocab = vocab or load_vocab()
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    idx = torch.tensor([vocab.encode(prompt or "\n")], dtype=torch.long, device=device)
    generator = torch.Generator(device=device)
    if seed is not None:
        generator.manual_seed(seed)
    else:
        generator.seed()
    for _ in range(n_chars):
        logits, _ = model(idx[:, -model.config.block_size :])  # crop the context to what fits
        logits = logits[:, -1, :] / max(temperature, 1e-6)
        if top_k is not None:
            kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
            logits[logits < kth] = -float("inf")
        next_id = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1, generator=generator)
        idx = torch.cat((idx, next_id), dim=1)
    model.train(was_training)
    return vocab.decode(idx[0].tolist())


# -- the task --------------------------------------------------------------------------------------
def warmup_cosine(warmup: int, total: int, min_ratio: float, keep_total: bool) -> Callable[[int], float]:
    """LR multiplier: linear warmup, then a cosine down to `min_ratio` at step `total`, flat after.

    `keep_total`: the horizon must survive a resume that calls `build` with a larger
    `trainer.max_steps`. LambdaLR's state_dict stores the attributes of a callable object (and
    nothing for a plain function), and `load_state_dict` puts them back; so the horizon is the one
    attribute of a small object, and the resumed run keeps the `total` it started with: the
    extended steps continue at the final LR instead of jumping back up the curve. Only `total` is
    state: warmup and floor come from the config each session, and an explicit
    `task.schedule_steps` (keep_total False) is a plain function, so a deliberate change of it
    takes effect (labelled approximate on resume).
    """

    def factor(step: int, horizon: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, horizon - warmup))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    if not keep_total:
        return lambda step: factor(step, total)

    class KeptHorizon:
        def __init__(self) -> None:
            self.total = total  # the only attribute: what the checkpoint keeps (JSON, nothing pickled)

        def __call__(self, step: int) -> float:
            return factor(step, self.total)

    return KeptHorizon()


def build(cfg: Any) -> dict[str, Any]:
    """Called by the trainer after it seeded every RNG from cfg.seed (so the init is reproducible)."""
    t = task_settings(cfg)
    text = load_text()
    vocab = Vocab.from_text(text)
    ids = torch.tensor(vocab.encode(text), dtype=torch.long)
    n_val = int(len(ids) * float(t["val_fraction"]))
    train_ids, val_ids = ids[: len(ids) - n_val], ids[len(ids) - n_val :]
    block_size = int(t["block_size"])

    model = GPT(model_config(cfg, len(vocab)))

    def make_optimizer(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
        # nanoGPT's split: decay the matrices (weights, embeddings), not biases and LayerNorm gains
        params = [p for p in params if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": float(t["weight_decay"])},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        return torch.optim.AdamW(groups, lr=float(t["lr"]), betas=(0.9, 0.99))

    explicit = t.get("schedule_steps")
    lr_factor = warmup_cosine(int(t["warmup"]), int(explicit or cfg.trainer.max_steps), float(t["min_lr_ratio"]),
                              keep_total=not explicit)

    def training_step(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        _, loss = model(x, y)
        return loss

    return {
        "model": model,
        "optimizer": make_optimizer,
        "scheduler": lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_factor),
        "train_data": CharWindows(train_ids, block_size),
        "val_data": CharWindows(val_ids, block_size, stride=block_size) if n_val > block_size else None,
        "training_step": training_step,
    }
