"""A tiny QLoRA task for tests/test_gpu.py: a random GPT-2 loaded in 4-bit, a PEFT LoRA adapter.

The base is built from a config (nothing is downloaded), saved to a temporary folder and loaded
back with `from_pretrained(quantization_config=...)`, the path on which transformers quantizes
with bitsandbytes (NF4). The trainer seeds every RNG before `build`, so every session gets the
same base. Attention is eager: the memory-efficient SDPA backward is not deterministic on a GPU,
and the test compares weights bit for bit. `task.kill_at=N` SIGKILLs the process while it fetches
batch N (once: the marker file keeps the resumed process alive). `task.four_bit=false` keeps the
base in float32, to try the task on a CPU.
"""

import os
import signal
import tempfile

import torch

CONFIG = {
    "task": {"n": 64, "seq": 32, "vocab": 512, "dim": 512, "layers": 4, "lr": 1e-3, "four_bit": True,
             "kill_at": 0, "kill_marker": ""},
    "trainer": {"max_steps": 10, "batch_size": 4, "log_every_n_steps": 5, "progress_bar": False,
                "accelerator": "cuda", "devices": 1, "precision": "32-true"},
    "checkpoint": {"every_n_steps": 3, "keep_last": 2, "async_save": "false"},
}


def make_model(t):
    """The random GPT-2 base (4-bit on the GPU unless task.four_bit=false) with a LoRA adapter on c_attn."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=t.vocab, n_embd=t.dim, n_layer=t.layers, n_head=8, n_positions=t.seq, use_cache=False)
    loading = {"attn_implementation": "eager"}
    if t.four_bit:
        from transformers import BitsAndBytesConfig

        loading["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                            bnb_4bit_compute_dtype=torch.float32)
        loading["device_map"] = {"": 0}
    with tempfile.TemporaryDirectory() as folder:
        GPT2LMHeadModel(config).save_pretrained(folder)
        model = GPT2LMHeadModel.from_pretrained(folder, **loading)
    if t.four_bit:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["c_attn"]))


class Tokens(torch.utils.data.Dataset):
    """Random token ids, the same every time (their own generator)."""

    def __init__(self, n, seq, vocab):
        self.ids = torch.randint(vocab, (n, seq), generator=torch.Generator().manual_seed(7))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return self.ids[i]


def build(cfg):
    t = cfg.task
    model = make_model(t)
    calls = [0]

    def collate(rows):
        calls[0] += 1
        if t.kill_at and calls[0] == t.kill_at and not os.path.exists(t.kill_marker):
            open(t.kill_marker, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)
        ids = torch.stack(rows)
        return {"input_ids": ids, "labels": ids}  # passed to the model as keyword arguments

    data = torch.utils.data.DataLoader(Tokens(t.n, t.seq, t.vocab), batch_size=cfg.trainer.batch_size, collate_fn=collate)
    return {"model": model, "optimizer": lambda params: torch.optim.AdamW(params, lr=t.lr), "train_data": data}
