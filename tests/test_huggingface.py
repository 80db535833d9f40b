"""Hugging Face models with real transformers (and peft): BatchEncoding batches, exact resume,
gradient checkpointing, `export --format hf` loaded back with `from_pretrained`, PEFT adapters.

The model is a tiny GPT-2 built from a config (2 layers, hidden 32, dropout on) and the tokenizer a
word-level `tokenizers` model built in the task: nothing is downloaded. The task file below is
written into a temporary folder, as a user's task file would be.
"""

from __future__ import annotations

import json

import os
import signal
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import TINY_TASK, committed_steps_on_disk, error_lines, run_cli, start_cli
from helpers import run_cli_inprocess
from safetensors.torch import load_file

from resilient_train.cli import main
from resilient_train.grad_ckpt import enable_gradient_checkpointing

HF_TASK = textwrap.dedent('''
    """A tiny causal LM on BatchEncoding batches: GPT-2 from a config, a word-level tokenizer."""
    import os
    import signal

    import torch

    CONFIG = {
        "task": {"n": 48, "seq": 12, "lr": 0.01, "peft": False, "kill_at": 0, "kill_marker": ""},
        "trainer": {"max_steps": 10, "batch_size": 4, "log_every_n_steps": 5, "progress_bar": False,
                    "accelerator": "cpu", "devices": 1},
        "checkpoint": {"every_n_steps": 3, "keep_last": 2, "async_save": "false"},
    }
    WORDS = ("the a cat dog sat ran on under mat log big small red blue quick slow jumps sleeps eats "
             "sees one two three and or but").split()


    def make_tokenizer():
        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[BOS]", "[EOS]", *WORDS])}
        tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                       bos_token="[BOS]", eos_token="[EOS]")


    class Sentences(torch.utils.data.Dataset):
        def __init__(self, n):
            g = torch.Generator().manual_seed(99)
            self.text = []
            for _ in range(n):
                length = int(torch.randint(4, 14, (1,), generator=g))
                self.text.append(" ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (length,), generator=g)))

        def __len__(self):
            return len(self.text)

        def __getitem__(self, i):
            return self.text[i]


    def make_model(cfg, tokenizer):
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=cfg.task.seq,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id,
                            use_cache=False)  # dropout 0.1 everywhere, lm_head tied; no KV cache in training
        return GPT2LMHeadModel(config)


    def build(cfg):
        t = cfg.task
        tokenizer = make_tokenizer()
        model = make_model(cfg, tokenizer)
        if t.peft:
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["c_attn"],
                                                     fan_in_fan_out=True))
        calls = [0]

        def collate(texts):
            calls[0] += 1
            if t.kill_at and calls[0] == t.kill_at and not os.path.exists(t.kill_marker):
                open(t.kill_marker, "w").close()  # once: the resumed process must not die again
                os.kill(os.getpid(), signal.SIGKILL)
            batch = tokenizer(list(texts), padding="max_length", max_length=t.seq, truncation=True, return_tensors="pt")
            batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
            return batch  # a BatchEncoding: the trainer passes it to the model as keyword arguments

        data = torch.utils.data.DataLoader(Sentences(t.n), batch_size=cfg.trainer.batch_size, collate_fn=collate)
        return {"model": model, "optimizer": lambda params: torch.optim.AdamW(params, lr=t.lr),
                "train_data": data, "tokenizer": tokenizer}
''')


@pytest.fixture(scope="module")
def hf_task(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("transformers")
    path = tmp_path_factory.mktemp("task") / "hf_lm.py"
    path.write_text(HF_TASK)
    return path


@pytest.fixture(scope="module")
def straight_run(hf_task: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The HF task trained 10 steps without interruption, through the CLI."""
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    run_cli_inprocess("run", str(hf_task), "--run-dir", str(run_dir), check=True)
    return run_dir


def _weights(run_dir: Path, tmp: Path) -> dict[str, torch.Tensor]:
    """The newest checkpoint's weights as `export` (safetensors) writes them."""
    out = tmp / f"{run_dir.parent.name}-{run_dir.name}.safetensors"
    assert main(["export", str(run_dir), str(out)]) == 0
    return load_file(str(out))


def _build(hf_task: Path, **task: Any) -> dict[str, Any]:
    """The task's parts as the trainer builds them (seeded from cfg.seed)."""
    from resilient_train.config import resolve
    from resilient_train.seeding import seed_everything
    from resilient_train.task import load_task

    loaded = load_task(str(hf_task))
    cfg = resolve(loaded.defaults, {"task": task})
    seed_everything(cfg.seed)
    return loaded.build(cfg.to_dictconfig())


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"weights differ at {key}"


# -- BatchEncoding batches, SIGKILL and resume -----------------------------------------------------


@pytest.mark.slow
def test_batch_encoding_training_killed_and_resumed_equals_the_uninterrupted_run(
        hf_task: Path, straight_run: Path, tmp_path: Path) -> None:
    run_dir, marker = tmp_path / "run", tmp_path / "killed"
    proc = start_cli("run", str(hf_task), "--run-dir", str(run_dir), "task.kill_at=9", f"task.kill_marker={marker}")
    proc.communicate(timeout=600)
    assert proc.returncode == -signal.SIGKILL and marker.exists()
    assert committed_steps_on_disk(run_dir) == [3, 6]  # killed fetching batch 9: steps 7-8 are lost work
    resumed = run_cli("resume", str(run_dir), check=True)
    assert "resum" in resumed.stderr.lower() and "step 6" in resumed.stderr
    assert committed_steps_on_disk(run_dir)[-1] == 10
    straight = _weights(straight_run, tmp_path)
    assert any("transformer.h.1.attn" in k for k in straight)  # the HF key names, no wrapper prefixes
    _assert_same(_weights(run_dir, tmp_path), straight)


@pytest.mark.slow
def test_a_peft_lora_run_killed_and_resumed_is_bit_identical_and_stores_the_frozen_base_once(
        hf_task: Path, tmp_path: Path) -> None:
    pytest.importorskip("peft")
    straight_dir, run_dir, marker = tmp_path / "straight", tmp_path / "run", tmp_path / "killed"
    run_cli_inprocess("run", str(hf_task), "--run-dir", str(straight_dir), "task.peft=true", check=True)
    proc = start_cli("run", str(hf_task), "--run-dir", str(run_dir), "task.peft=true", "task.kill_at=9", f"task.kill_marker={marker}")
    proc.communicate(timeout=600)
    assert proc.returncode == -signal.SIGKILL and committed_steps_on_disk(run_dir) == [3, 6]
    run_cli("resume", str(run_dir), check=True)
    _assert_same(_weights(run_dir, tmp_path), _weights(straight_dir, tmp_path))
    listed = json.loads(run_cli_inprocess("ls", str(run_dir), "--json", check=True).stdout)
    base = listed[-1]["shared_bytes"]
    lora = {k: v for k, v in _weights(run_dir, tmp_path).items() if ".lora_" in k}
    adapter_bytes = sum(v.numel() * v.element_size() for v in lora.values())
    assert base > 20 * adapter_bytes, (base, adapter_bytes)  # the frozen GPT-2 base: referenced, not rewritten
    # a checkpoint after the first holds the adapter, its AdamW moments, RNG states and metadata (~30 KB), not the base
    assert all(entry["bytes"] < 3 * adapter_bytes + 40_000 for entry in listed), [(e["step"], e["bytes"], base) for e in listed]
    shared = sorted((run_dir / "checkpoints" / "shared").iterdir())
    assert sum(p.stat().st_size for p in shared) < 1.5 * base  # each base tensor stored once across both sessions


# -- gradient checkpointing ----------------------------------------------------------------------


class _BothSwitches(torch.nn.Module):
    """transformers 5.x: the new switch and the deprecated one side by side."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, Any]] = []

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None, every_n_layers=1, offload=False):
        self.calls.append(("activation", activation_checkpointing_kwargs))

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
        warnings.warn("`gradient_checkpointing_enable` is deprecated", FutureWarning, stacklevel=2)
        self.calls.append(("gradient", gradient_checkpointing_kwargs))


def test_the_activation_checkpointing_switch_is_preferred_to_the_deprecated_one() -> None:
    model = _BothSwitches()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        description = enable_gradient_checkpointing(model)
    assert model.calls == [("activation", {"use_reentrant": False})]
    assert "activation_checkpointing_enable" in description


def test_a_real_hf_model_is_checkpointed_without_deprecation_warnings() -> None:
    transformers = pytest.importorskip("transformers")
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=30, n_embd=16, n_layer=2, n_head=2, n_positions=8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # FutureWarning from gradient_checkpointing_enable would fail here
        description = enable_gradient_checkpointing(model)
    assert "activation_checkpointing_enable" in description
    assert all(block.gradient_checkpointing for block in model.transformer.h)
    func = model.transformer.h[0]._gradient_checkpointing_func
    assert func.keywords == {"use_reentrant": False}  # non-reentrant: RNG replayed, kwargs passed through


def _count_forward_calls(module: torch.nn.Module) -> list[int]:
    """A counter of `module`'s forward calls, recomputations included (forward hooks miss those)."""
    calls, forward = [0], type(module).forward

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return forward(module, *args, **kwargs)

    module.forward = counted  # type: ignore[method-assign]
    return calls


@pytest.mark.slow
def test_gradient_checkpointing_on_an_hf_model_trains_to_bit_identical_weights(hf_task: Path, tmp_path: Path) -> None:
    from resilient_train import Trainer

    results = {}
    for enabled in (False, True):
        parts = _build(hf_task)
        model = parts["model"]
        block_calls = _count_forward_calls(model.transformer.h[0].mlp)
        trainer = Trainer(run_dir=str(tmp_path / f"ckpt-{enabled}"), max_steps=4, batch_size=4, every_n_steps=4,
                          progress_bar=False, accelerator="cpu", devices=1, gradient_checkpointing=enabled, seed=0)
        trainer.fit(parts["model"], parts["optimizer"], parts["train_data"])
        assert model.transformer.h[0].gradient_checkpointing is enabled
        assert block_calls[0] == (8 if enabled else 4)  # checkpointed: each step's block is recomputed in backward
        results[enabled] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    # dropout masks are replayed on recomputation: bit for bit. (With use_cache=True, the config's default, the
    # unchecked model runs attention through a KV cache that rounds differently, and transformers turns the cache
    # off under checkpointing: the two then differ by rounding. The task turns it off for training.)
    _assert_same(results[True], results[False])


# -- export --format hf ------------------------------------------------------------------------------


@pytest.mark.slow
def test_export_hf_loads_with_from_pretrained_with_identical_weights_logits_and_tokenizer(
        hf_task: Path, straight_run: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "hf"
    proc = run_cli_inprocess("export", str(straight_run), str(out), "--format", "hf", check=True)
    assert "GPT2LMHeadModel" in proc.stderr and "step 10" in proc.stderr
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(out))

    loaded = AutoModelForCausalLM.from_pretrained(str(out))
    assert type(loaded).__name__ == "GPT2LMHeadModel"
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()  # still tied
    trained = _weights(straight_run, tmp_path)
    _assert_same({k: v for k, v in loaded.state_dict().items()}, trained)

    parts = _build(hf_task)
    reference = parts["model"]
    reference.load_state_dict(trained)
    reference.eval()
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    text = ["the cat sat on the mat", "two quick dogs eats a log"]
    batch = tokenizer(text, padding="max_length", max_length=12, return_tensors="pt")
    expected = parts["tokenizer"](text, padding="max_length", max_length=12, return_tensors="pt")
    assert torch.equal(batch["input_ids"], expected["input_ids"]) and tokenizer.pad_token == "[PAD]"
    with torch.no_grad():
        got = loaded(**batch).logits
        want = reference(**batch).logits
    assert torch.equal(got, want)


@pytest.mark.slow
def test_export_hf_of_a_peft_model_writes_the_trained_adapter_for_peft_model_from_pretrained(
        hf_task: Path, tmp_path: Path) -> None:
    pytest.importorskip("peft")
    from peft import PeftModel

    run_dir, out = tmp_path / "run", tmp_path / "adapter"
    run_cli_inprocess("run", str(hf_task), "--run-dir", str(run_dir), "task.peft=true", "trainer.max_steps=6", check=True)
    proc = run_cli_inprocess("export", str(run_dir), str(out), "--format", "hf", check=True)
    assert "adapter (PEFT)" in proc.stderr
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(out))
    assert "model.safetensors" not in os.listdir(out)  # the adapter alone, not the base model

    trained = _weights(run_dir, tmp_path)
    lora = {k: v for k, v in trained.items() if ".lora_" in k}
    assert lora and any(k.endswith("lora_B.default.weight") and v.abs().sum() > 0 for k, v in lora.items())
    base = _build(hf_task)["model"]  # the same seeded base the PEFT run started from (its weights stay frozen)
    restored = PeftModel.from_pretrained(base, str(out))
    _assert_same({k: v for k, v in restored.state_dict().items()}, trained)


def test_export_hf_without_transformers_says_how_to_install_it(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # find_spec answers None: not installed
    code = main(["export", str(tmp_path / "run"), str(tmp_path / "out"), "--format", "hf"])
    lines = error_lines(capsys.readouterr().err)
    assert code == 2 and len(lines) == 1
    assert "pip install 'resilient_train[hf]'" in lines[0]


@pytest.mark.slow
def test_export_hf_of_a_plain_torch_model_is_one_line_exit_2(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    run_dir = tmp_path / "run"
    run_cli_inprocess("run", TINY_TASK, "--run-dir", str(run_dir), "trainer.max_steps=3", "checkpoint.every_n_steps=3",
            "task.n=32", check=True)
    proc = run_cli_inprocess("export", str(run_dir), str(tmp_path / "out"), "--format", "hf")
    lines = error_lines(proc.stderr)
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "not a Hugging Face model" in lines[0] and "--format safetensors" in lines[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_export_hf_to_a_url_writes_the_same_files(straight_run: Path, tmp_path: Path) -> None:
    import fsspec
    from transformers import AutoModelForCausalLM

    url = "memory://hf-export/lm"
    assert main(["export", str(straight_run), url, "--format", "hf"]) == 0
    fs = fsspec.filesystem("memory")
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.find("/hf-export/lm"))
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(names)
    local = tmp_path / "copy"
    fs.get("/hf-export/lm/", str(local), recursive=True)
    loaded = AutoModelForCausalLM.from_pretrained(str(local))
    _assert_same(dict(loaded.state_dict()), _weights(straight_run, tmp_path))


def test_export_hf_finds_the_one_hf_model_a_model_wraps_and_refuses_others() -> None:
    transformers = pytest.importorskip("transformers")
    from resilient_train.errors import UsageError
    from resilient_train.export_hf import _hf_model

    def gpt2() -> Any:
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=30, n_embd=16, n_layer=1, n_head=2,
                                                                    n_positions=8))

    plain = gpt2()
    assert _hf_model(plain) is plain
    wrapper = torch.nn.Module()
    wrapper.backbone, wrapper.head = gpt2(), torch.nn.Linear(16, 2)
    assert _hf_model(wrapper) is wrapper.backbone
    wrapper.teacher = gpt2()
    with pytest.raises(UsageError, match="holds 2 Hugging Face models"):
        _hf_model(wrapper)
    with pytest.raises(UsageError, match="not a Hugging Face model"):
        _hf_model(torch.nn.Linear(2, 2))


def test_export_hf_refuses_to_write_into_a_run_or_checkpoint_folder(tmp_path: Path, capsys) -> None:
    pytest.importorskip("transformers")
    for marker in ("run.yaml", "manifest.json"):
        target = tmp_path / marker.split(".")[0]
        target.mkdir()
        (target / marker).write_text("{}\n")
        code = main(["export", str(tmp_path / "any-run"), str(target), "--format", "hf"])
        lines = error_lines(capsys.readouterr().err)
        assert code == 2 and len(lines) == 1 and "export into another folder" in lines[0]
        assert os.listdir(target) == [marker]
