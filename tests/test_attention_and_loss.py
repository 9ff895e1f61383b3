"""Document attention and the chunked loss, single process, CPU fp32.

Document attention: for windows holding at least three documents, one of them cut by the window
start, every position's loss equals that of its document fragment run alone through the same model
(full, LoRA, gradient checkpointing; ZeRO-3 in test_attention_and_loss_launch.py).
Chunked loss: equal to the full-logits computation (loss to 1e-6 relative, gradients to 1e-5) with
ignored labels, tied embeddings and LoRA with lm_head in modules_to_save; its memory stays under a
ceiling that full logits of a 128,256-token vocabulary cannot meet.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from cpt_ds.attention import (
    DOCUMENT_SDPA,
    document_causal_mask,
    flash_varlen_kwargs,
    model_inputs,
    register_document_sdpa,
)
from cpt_ds.config import ModelConfig
from cpt_ds.data.loader import IGNORE_INDEX, collate, eval_batches
from cpt_ds.data.windows import PackedSamples, TokenStream, document_positions
from cpt_ds.loss import (
    LossSettings,
    attach_loss_forward,
    chunked_linear_cross_entropy,
    full_linear_cross_entropy,
    liger_problems,
)
from cpt_ds.pack.writer import IndexedTokenWriter
from cpt_ds.token_file import IndexedTokenFile

from conftest import REPO, TINY_MODEL

EOS = 0
CPU = torch.device("cpu")


def token_file(path: Path, documents: list[list[int]]) -> IndexedTokenFile:
    with IndexedTokenWriter(path, dtype=np.int32) as writer:
        for document in documents:
            writer.add_document(np.array(document, dtype=np.int32))
        writer.finalize({"vocab_size": TINY_MODEL["vocab_size"]})
    return IndexedTokenFile(path)


def random_documents(lengths: list[int], seed: int = 0) -> list[list[int]]:
    """Documents of the given lengths, each ending with EOS (as tools/pack_corpus.py writes them)."""
    rng = np.random.default_rng(seed)
    return [rng.integers(1, TINY_MODEL["vocab_size"], size=n - 1).tolist() + [EOS] for n in lengths]


def tiny_model(*, tie: bool = False, seed: int = 0, implementation: str = "sdpa"):
    from transformers import AutoModelForCausalLM, LlamaConfig

    register_document_sdpa()
    torch.manual_seed(seed)
    shape = {k: v for k, v in TINY_MODEL.items() if k != "architectures"}
    shape["tie_word_embeddings"] = tie
    return AutoModelForCausalLM.from_config(LlamaConfig(**shape), attn_implementation=implementation).float()


def lora_model(model):
    from peft import LoraConfig, get_peft_model

    # init_lora_weights=False: B is random too, so the adapters change the outputs being compared.
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                        "gate_proj", "up_proj", "down_proj"], modules_to_save=["lm_head"], init_lora_weights=False)
    return get_peft_model(model, config)


def run(model, batch: dict[str, torch.Tensor], *, document_attention: bool, return_correct: bool = False):
    inputs = model_inputs(batch, document_attention=document_attention,
                          implementation=model.config._attn_implementation, device=CPU)
    return model(**inputs, labels=batch["labels"], return_correct=return_correct)


# --------------------------------------------------------------------------------------------------
# Position ids and masks
# --------------------------------------------------------------------------------------------------


def test_position_ids_restart_at_the_window_and_at_every_document_start(tmp_path):
    # Documents of 5, 3, 7, 4, 6 tokens: stream starts at 0, 5, 8, 15, 19.
    stream = TokenStream.whole([token_file(tmp_path / "a", random_documents([5, 3, 7, 4, 6]))])
    samples = PackedSamples(stream, block_size=8)
    first, second = samples[0], samples[1]
    assert first["position_ids"].tolist() == [0, 1, 2, 3, 4, 0, 1, 2]
    # Window 8..16: document 3 starts at 8 (position 0), document 4 at 15; EOS at 14 ends document 3.
    assert second["position_ids"].tolist() == [0, 1, 2, 3, 4, 5, 6, 0]
    assert second["input_ids"][6] == EOS and second["labels"][6] == stream.read(15, 16)[0]  # labels unchanged
    window = samples[2]  # 16..24: cut document 4 (16..18), document 5 (19..24)
    assert window["position_ids"].tolist() == [0, 1, 2, 0, 1, 2, 3, 4]
    assert document_positions(np.array([3]), 5).tolist() == [0, 1, 2, 0, 1]
    # Eval fillers keep every key of a sample, labels ignored.
    filler = list(eval_batches(samples, micro_batch_size=2, dp_rank=1, dp_world_size=2))[-1]
    assert set(filler) == {"input_ids", "labels", "position_ids"}
    assert torch.equal(filler["position_ids"][-1], torch.from_numpy(samples[0]["position_ids"]))


def test_the_mask_is_block_diagonal_causal_and_the_varlen_lengths_match():
    positions = torch.tensor([[0, 1, 2, 0, 1], [0, 0, 1, 2, 3]])
    mask = document_causal_mask(positions)[:, 0]
    expected = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 1, 1]])
    assert torch.equal(mask[0].int(), expected)
    assert mask[1, 0].tolist() == [True, False, False, False, False] and mask[1, 4].tolist() == [False, True] + [True] * 3
    varlen = flash_varlen_kwargs(positions)
    assert varlen["cu_seq_lens_q"].tolist() == [0, 3, 5, 6, 10] and varlen["max_length_q"] == 4
    # Without document attention only the input ids reach the model; extra batch keys never do.
    batch = {"input_ids": positions, "position_ids": positions, "labels": positions, "corpus": positions[:, 0]}
    assert set(model_inputs(batch, document_attention=False, implementation="sdpa", device=CPU)) == {"input_ids"}
    assert set(model_inputs(batch, document_attention=True, implementation="sdpa", device=CPU)) == {
        "input_ids", "position_ids", "attention_mask"}
    assert set(model_inputs(batch, document_attention=True, implementation=DOCUMENT_SDPA, device=CPU)) == {
        "input_ids", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"}


# --------------------------------------------------------------------------------------------------
# The equality proof
# --------------------------------------------------------------------------------------------------


def fragments(sample: dict[str, np.ndarray]) -> list[tuple[int, int]]:
    starts = np.flatnonzero(sample["position_ids"] == 0).tolist() + [len(sample["position_ids"])]
    return list(zip(starts[:-1], starts[1:]))


@pytest.mark.parametrize("mode, implementation", [("full", DOCUMENT_SDPA), ("lora", DOCUMENT_SDPA),
                                                  ("gradient_checkpointing", DOCUMENT_SDPA), ("full", "sdpa")])
def test_every_position_scores_as_its_document_fragment_run_alone(tmp_path, mode, implementation):
    """Both CPU paths: SDPA once per document (the default off CUDA) and SDPA with the explicit mask."""
    # Document starts 0, 20, 26, 35, 43, 68, 72, 79, 89, 129: windows 32..64 and 64..96 both start
    # inside a document and hold 3 and 5 documents.
    stream = TokenStream.whole([token_file(tmp_path / "a", random_documents([20, 6, 9, 8, 25, 4, 7, 10, 40], seed=1))])
    samples = PackedSamples(stream, block_size=32)
    picked = [samples[1], samples[2]]
    for index, sample in ((1, picked[0]), (2, picked[1])):
        assert 0 not in stream.document_starts(32 * index, 32 * index + 32)  # the window cuts a document
        assert len(fragments(sample)) >= 3
    batch = collate(picked)
    model = tiny_model(implementation=implementation)
    if mode == "lora":
        model = lora_model(model)
    attach_loss_forward(model, LossSettings(chunk_size=7))
    if mode == "gradient_checkpointing":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()  # dropout is 0 in the tiny config; checkpointing only acts in training
        context = torch.enable_grad()
    else:
        model.eval()
        context = torch.no_grad()
    with context:
        together = run(model, batch, document_attention=True).token_losses
        across = run(model, batch, document_attention=False).token_losses
        for row, sample in enumerate(picked):
            for start, stop in fragments(sample):
                alone = collate([{key: value[start:stop] for key, value in sample.items()}])
                expected = run(model, alone, document_attention=False).token_losses[0]
                torch.testing.assert_close(together[row, start:stop], expected, atol=1e-5, rtol=0)
    # The check has teeth: attending across documents changes every later document's losses.
    later = slice(fragments(picked[0])[1][0], None)
    assert (across[0, later] - together[0, later]).abs().max() > 1e-2


# --------------------------------------------------------------------------------------------------
# The chunked loss against full logits
# --------------------------------------------------------------------------------------------------


def test_chunked_loss_equals_full_logits_with_ignored_labels():
    torch.manual_seed(0)
    hidden = torch.randn(3, 41, 32, requires_grad=True)
    weight = torch.randn(301, 32, requires_grad=True)
    labels = torch.randint(0, 301, (3, 41))
    labels[0, :9] = IGNORE_INDEX
    labels[2, -1] = IGNORE_INDEX
    scale = torch.tensor(0.37)
    results = []
    for compute in (lambda: full_linear_cross_entropy(hidden, weight, labels, return_correct=True),
                    lambda: chunked_linear_cross_entropy(hidden, weight, labels, chunk_size=10, return_correct=True)):
        hidden.grad = weight.grad = None
        output = compute()
        (output.loss * scale).backward()
        results.append((output, hidden.grad.clone(), weight.grad.clone()))
    (full, full_h, full_w), (chunked, chunked_h, chunked_w) = results
    torch.testing.assert_close(chunked.loss, full.loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(chunked.token_losses, full.token_losses, rtol=1e-6, atol=1e-6)
    assert chunked.token_losses.dtype == torch.float32 and chunked.token_losses.shape == labels.shape
    assert not chunked.token_losses.requires_grad and (chunked.token_losses[labels == IGNORE_INDEX] == 0).all()
    assert torch.equal(chunked.correct, full.correct)
    torch.testing.assert_close(chunked_h, full_h, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(chunked_w, full_w, atol=1e-5, rtol=1e-5)
    assert (chunked_h.reshape(-1, 32)[(labels == IGNORE_INDEX).reshape(-1)] == 0).all()


@pytest.mark.parametrize("mode", ["tied", "lora_lm_head_saved"])
def test_chunked_loss_gives_the_full_logits_gradients_of_every_trainable_weight(mode):
    torch.manual_seed(1)
    model = tiny_model(tie=mode == "tied")
    if mode == "lora_lm_head_saved":
        model = lora_model(model)
    else:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    batch = {"input_ids": torch.randint(1, 512, (2, 24)), "labels": torch.randint(1, 512, (2, 24)),
             "position_ids": torch.tensor([list(range(10)) + list(range(14))] * 2)}
    batch["labels"][1, :5] = IGNORE_INDEX
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    outcomes = []
    for chunk_size in (0, 5):
        attach_loss_forward(model, LossSettings(chunk_size=chunk_size))
        model.zero_grad(set_to_none=True)
        output = run(model, batch, document_attention=True)
        output.loss.backward()
        outcomes.append((output.loss.detach(), {name: p.grad.clone() for name, p in trainable.items()}))
    (full_loss, full_grads), (chunked_loss, chunked_grads) = outcomes
    torch.testing.assert_close(chunked_loss, full_loss, rtol=1e-6, atol=0)
    if mode == "lora_lm_head_saved":
        assert any("modules_to_save" in name and "lm_head" in name for name in trainable)
    for name, grad in full_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, atol=1e-5, rtol=1e-5, msg=name)


def test_eval_loss_and_accuracy_through_the_chunked_loss_equal_the_logits():
    from cpt_ds.metrics import batch_stats, loss_from_logits

    model = tiny_model().eval()
    batch = {"input_ids": torch.randint(1, 512, (2, 20)), "labels": torch.randint(1, 512, (2, 20))}
    batch["labels"][0, 3] = IGNORE_INDEX
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"]).logits
        attach_loss_forward(model, LossSettings(chunk_size=6))
        output = model(input_ids=batch["input_ids"], labels=batch["labels"], return_correct=True)
    reference = loss_from_logits(logits, batch["labels"])
    assert torch.equal(output.correct, reference.correct)
    whole, chunked = batch_stats(reference, batch["labels"]), batch_stats(output, batch["labels"])
    assert whole[1:].tolist() == chunked[1:].tolist()
    assert abs(int(whole[0]) - int(chunked[0])) <= 40 * 2  # fixed point, 2**-24 nats per position
    # Without labels the model is the Hugging Face model (export, generation).
    with torch.no_grad():
        assert torch.equal(model(input_ids=batch["input_ids"]).logits, logits)


MEMORY_PROBE = textwrap.dedent("""
    import json, sys, torch
    from pathlib import Path
    from cpt_ds.loss import chunked_linear_cross_entropy

    def status(field):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024

    torch.manual_seed(0)
    vocab, tokens, width = 128256, 2048, 64
    hidden = torch.randn(1, tokens, width, requires_grad=True)
    weight = (torch.randn(vocab, width) * 0.02).requires_grad_()
    labels = torch.randint(0, vocab, (1, tokens))
    Path("/proc/self/clear_refs").write_text("5")
    before = status("VmRSS")
    output = chunked_linear_cross_entropy(hidden, weight, labels, chunk_size=int(sys.argv[1]))
    output.loss.backward()
    print(json.dumps({"growth": status("VmHWM") - before, "loss": output.loss.item() / tokens}))
""")


def test_loss_memory_of_a_128k_vocabulary_at_2048_tokens_stays_under_a_ceiling_full_logits_cannot_meet():
    """Peak resident-set growth of forward + backward, measured by the kernel in a fresh process (glibc's
    mmap threshold fixed so that freed tensors leave the resident set)."""
    full_logits = 2048 * 128256 * 4  # one fp32 copy of the logits: 1.05 GB; the full path holds several
    ceiling = full_logits // 2
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(64 * 1024), OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", MEMORY_PROBE, "256"], env=env, capture_output=True, text=True,
                          timeout=300, check=True)
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    assert abs(measured["loss"] - np.log(128256)) < 0.5  # it really computed the loss of a near-uniform model
    assert measured["growth"] < ceiling, (measured, ceiling)


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------


def test_config_fields_are_validated():
    from cpt_ds.config import RunConfig

    assert ModelConfig(full_finetuning=True, model_type="llama", tokenizer_name_or_path="t").document_attention
    flags = RunConfig.load(["--document_attention", "false", "--loss_chunk_size", "256", "--use_liger_kernel", "true"])
    assert (flags.model.document_attention, flags.model.loss_chunk_size, flags.model.use_liger_kernel) == (False, 256, True)
    problems = ModelConfig(full_finetuning=True, tokenizer_name_or_path="t", loss_chunk_size=-1).problems()
    assert any("loss_chunk_size must be >= 0" in p for p in problems)
    lora_head = ModelConfig(model_name_or_path="m", trainable=["q_proj", "lm_head"]).problems()
    assert any("LoRA on lm_head" in p for p in lora_head)
    assert ModelConfig(model_name_or_path="m", trainable=["q_proj", "lm_head"], loss_chunk_size=0).problems() == []
    if not torch.cuda.is_available():
        assert liger_problems(True) and liger_problems(False) == []


def test_the_flex_block_mask_selects_what_the_explicit_mask_selects():
    """The CUDA flex path's BlockMask, run through flex_attention's eager reference on CPU."""
    from torch.nn.attention.flex_attention import flex_attention

    from cpt_ds.attention import document_block_mask

    torch.manual_seed(0)
    positions = torch.tensor([list(range(40)) + list(range(100)) + list(range(70)) + list(range(46)), list(range(256))])
    query, key, value = (torch.randn(2, 2, 256, 16) for _ in range(3))
    flex = flex_attention(query, key, value, block_mask=document_block_mask(positions))
    masked = torch.nn.functional.scaled_dot_product_attention(query, key, value,
                                                              attn_mask=document_causal_mask(positions))
    torch.testing.assert_close(flex, masked, atol=1e-5, rtol=0)
