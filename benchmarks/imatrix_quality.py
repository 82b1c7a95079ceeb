"""What an importance matrix buys: mean KL divergence of quants against the float GGUF, with and without one.

    .venv/bin/python benchmarks/imatrix_quality.py [--types q4_k_m,iq4_xs,q3_k_m,q2_k] [--train-minutes 25]
                                                   [--tokenizer trained|llama2] [--workdir DIR] [--json]

The first run takes about 35 minutes (25 of them training); the trained model is cached, and a rerun with the same
model settings takes a few minutes.

Random weights would make this meaningless (their activations have no structure for an importance matrix to
find), so the model is trained here first, briefly, on real English text that every machine has offline: the
running Python's own documentation, i.e. the language reference (`pydoc_data.topics`, one document per topic)
and the docstrings of its standard library (one document per module, read with `ast`, nothing imported).
The documents are ordered by a hash of their names and dealt into three disjoint parts, whole documents each:

    eval         held-out text the quality numbers are measured on (first --eval-chars characters' worth)
    calibration  the importance matrix's text (the next --calib-chars characters' worth)
    train        everything else: what the model is trained on

The model is a Llama (transformers LlamaForCausalLM; by default hidden 512, 8 layers, intermediate 1536, 8 heads,
4 KV heads, untied token_embd and output as in Llama: every weight row a multiple of 256, as k-quants and IQ types
need). Its tokenizer (--tokenizer) is by default a Llama-style SentencePiece BPE of --vocab-size (4096) pieces
trained on the training split only (byte fallback, split digits, whitespace kept, <unk> <s> </s> = 0 1 2; written
as tokenizer.model, which llama.cpp's converter reads as a Llama SentencePiece vocabulary). A small vocabulary keeps
token_embd and output at ~14% of the 29M weights, nearer a real LLM's few percent than Llama 2's 32000 pieces,
which made them two thirds of the weights here; what token_embd's quantization costs, an importance matrix cannot
help (it is a lookup, not a matmul, and has no entry in the matrix). `--tokenizer llama2` is that earlier setup:
Llama 2's 32000 pieces from llama.cpp's models/ggml-vocab-llama-spm.gguf, written by the project's tiny-model builder
(so8t_deploy.tiny_models). The script checks that the model's tokenizer and llama.cpp's agree on the held-out text.

It trains with AdamW under bf16 autocast on random windows of the training text for --train-minutes of wall time
(the learning rate's cosine follows the clock), and is cached in the work directory by its settings and the
corpus' digest: a rerun skips the training and reports the cached run's numbers. How far it gets depends on the
machine and its load (the loss curve, steps, tokens and final loss are printed).

Then, through the project's own functions: the float GGUF (`convert_to_gguf`, f16), an importance matrix from the
calibration text (`compute_imatrix`, timed), each quant type without and with it (`quantize_gguf`; llama.cpp
refuses some types without one: iq2_xs always, and iq3_xxs on a model whose grouped-query attn_k it makes
iq2_s; such cells read n/a, with the reason below the table; the default types, q3_k_m and q2_k among them for
the low bits where an importance matrix matters most, can all be built without one), and against the f16 GGUF on
--eval-windows windows of --ctx tokens of the held-out text, llama.cpp's own logits (`gguf_window_logits`, the KV
cache in f32) compared as the project's `eval` compares them (`quality.metrics.compare`): mean KL(P_f16 || P_quant)
in nats per position, top-1 agreement with the f16 model, and the quant's perplexity on the text. The windows go
through in batches (--eval-batch) to bound the memory of the logits; the batch means are combined exactly.

The ratio column is KL with the importance matrix / KL without: below 1.0 the importance matrix helped. Two
diagnostics say why it does or does not: the weighted weight error ratio (with / without) of the importance-weighted
squared error of the weights the matrix covers, which is what llama.cpp minimizes with it (token_embd has no entry,
nor does output.weight: llama.cpp's imatrix leaves the output layer out), and the share of the importance held
by the top 1% of each tensor's input columns (0.01: uniform, nothing for the matrix to say). Everything is also
written to run/result.json beside the model.
Nothing is asserted; the exit status is 0 unless a step fails.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import math
import os
import re
import shutil
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
# Same locations the Makefile and the tests use, so the pinned sdist and the extracted converter are reused.
os.environ.setdefault("SO8T_CACHE_DIR", str(REPO / ".cache" / "so8t"))
_SDIST = REPO / ".cache" / "sdist" / "llama_cpp_python-0.3.36.tar.gz"
if _SDIST.is_file():
    os.environ.setdefault("SO8T_LLAMA_CPP_SDIST", str(_SDIST))

# Bump when the corpus, the model or its training changes in a way the settings do not show.
MODEL_VERSION = 3
VOCAB_GGUF = "ggml-vocab-llama-spm.gguf"
# A Llama 2 era [INST] template (Mistral-7B-Instruct-v0.2's, the same 32000-piece vocabulary): the tokenizer
# files want one; nothing here chats.
TEMPLATE_CASE = "mistralai/Mistral-7B-Instruct-v0.2 (NOTE: Old pre-v1 without a system prompt)"
# Tests and tools are not prose; encodings/ is ~100 modules of one generated boilerplate docstring, which would put
# near-copies of one text on both sides of the split.
STDLIB_SKIP = {"test", "tests", "idlelib", "lib2to3", "site-packages", "turtledemo", "__pycache__", "encodings"}
MIN_DOCSTRING = 80  # characters: one-line docstrings ("Return self.") are not prose
FINAL_LOSS_STEPS = 10  # the final training loss is the mean over this many last steps


def log(message: str) -> None:
    # Progress goes to stderr so that --json leaves stdout machine-readable.
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------------------
# The text


@dataclass(frozen=True)
class Document:
    source: str
    name: str
    text: str


def python_documents() -> list[Document]:
    """The running Python's reference topics and its standard library's docstrings, one document each."""
    from pydoc_data.topics import topics

    docs = [Document("pydoc-topics", name, text.strip()) for name, text in sorted(topics.items())]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted([*stdlib.glob("*.py"), *stdlib.glob("*/*.py")]):
        if STDLIB_SKIP & set(path.relative_to(stdlib).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        strings = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= MIN_DOCSTRING:
                    strings.append(doc.strip())
        if strings:
            docs.append(Document("stdlib-docstrings", path.relative_to(stdlib).as_posix(), "\n\n".join(strings)))
    return docs


@dataclass(frozen=True)
class Split:
    train: list[Document]
    calibration: list[Document]
    eval: list[Document]

    @staticmethod
    def text(docs: list[Document]) -> str:
        return "\n\n".join(d.text for d in docs) + "\n"


def split_documents(docs: list[Document], eval_chars: int, calib_chars: int) -> Split:
    """Whole documents, in the order of a hash of their names: eval first, then calibration, the rest train."""
    ordered = sorted(docs, key=lambda d: hashlib.sha256(f"{d.source}/{d.name}".encode()).hexdigest())
    parts: dict[str, list[Document]] = {"eval": [], "calibration": [], "train": []}
    filled = {"eval": 0, "calibration": 0}
    for doc in ordered:
        part = next((p for p, target in (("eval", eval_chars), ("calibration", calib_chars))
                     if filled[p] < target), "train")
        parts[part].append(doc)
        if part in filled:
            filled[part] += len(doc.text)
    return Split(**parts)


def describe(docs: list[Document]) -> str:
    by_source: dict[str, int] = {}
    for d in docs:
        by_source[d.source] = by_source.get(d.source, 0) + 1
    return ", ".join(f"{n} {source}" for source, n in sorted(by_source.items()))


# --------------------------------------------------------------------------------------------------------------
# The model


@dataclass(frozen=True)
class ModelSettings:
    tokenizer: str  # "trained": SentencePiece trained on the training split; "llama2": Llama 2's 32000 pieces
    vocab_size: int
    tie_embeddings: bool
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    seq: int
    batch: int
    lr: float
    train_minutes: float
    seed: int


def write_llama2_tokenizer(model_dir: Path) -> dict[str, int]:
    """Llama 2's SentencePiece tokenizer (llama.cpp's vocabulary GGUF), by the project's tiny-model builder."""
    from so8t_deploy.external.llamacpp import locate_llama_cpp_models
    from so8t_deploy.tiny_models import ChatFamily, _write_family_tokenizer, chat_template_case

    spec = ChatFamily(arch="llama", vocab=VOCAB_GGUF, template=None, tokenizer_class="PreTrainedTokenizerFast",
                      bos="<s>", eos="</s>", generation_eos=("</s>",), add_bos=True, sentencepiece=True,
                      model_max_length=4096)
    vocab = locate_llama_cpp_models([VOCAB_GGUF])[VOCAB_GGUF]
    return _write_family_tokenizer(model_dir, spec, vocab, chat_template_case(TEMPLATE_CASE), "</s>", ["</s>"])


def write_trained_tokenizer(model_dir: Path, train_text: list[str], vocab_size: int) -> dict[str, int]:
    """A Llama-style SentencePiece tokenizer trained on the training documents only: BPE with byte fallback,
    digits split, whitespace kept as is (identity normalization, a dummy prefix space), <unk> <s> </s> as ids
    0 1 2, the settings of Llama 2's own tokenizer.model, which llama.cpp's converter reads as a Llama
    SentencePiece vocabulary. Written as tokenizer.model plus the transformers config files (no tokenizer.json)."""
    import sentencepiece as spm

    started = time.perf_counter()
    lines = [line for text in train_text for line in text.splitlines() if line.strip()]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(model_dir / "tokenizer"), vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, split_digits=True, allow_whitespace_only_pieces=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
        character_coverage=0.99995, max_sentence_length=1 << 16, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        num_threads=os.cpu_count() or 1, minloglevel=2)
    (model_dir / "tokenizer.vocab").unlink()
    specials = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    decoder = {str(i): {"content": tok, "special": True, "lstrip": False, "rstrip": False, "normalized": False,
                        "single_word": False} for i, tok in enumerate(["<unk>", "<s>", "</s>"])}
    config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False, **specials,
              "legacy": False, "model_max_length": 4096, "clean_up_tokenization_spaces": False,
              "added_tokens_decoder": decoder}
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (model_dir / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
    log(f"tokenizer: {vocab_size}-piece SentencePiece BPE trained on {len(lines)} lines of the training text "
        f"in {time.perf_counter() - started:.1f} s")
    return {"<unk>": 0, "<s>": 1, "</s>": 2}


def text_encoder(model_dir: Path):
    """The model's own tokenizer, without special tokens: text -> ids (tokenizer.json through `tokenizers`
    where there is one, as transformers runs it, else tokenizer.model through sentencepiece)."""
    if (model_dir / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        fast = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        return lambda text: fast.encode(text, add_special_tokens=False).ids
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))
    return lambda text: sp.encode(text)


def train_model(model_dir: Path, settings: ModelSettings, train_text: list[str]) -> dict:
    """Write the tokenizer, train a Llama on the documents for the time budget, save it; return the run's facts."""
    import torch
    import transformers

    if settings.tokenizer == "trained":
        ids = write_trained_tokenizer(model_dir, train_text, settings.vocab_size)
    else:
        ids = write_llama2_tokenizer(model_dir)
        if len(ids) != settings.vocab_size:
            raise ValueError(f"Llama 2's vocabulary has {len(ids)} pieces, not {settings.vocab_size}")
    encode = text_encoder(model_dir)
    eos = ids["</s>"]
    stream: list[int] = []
    for text in train_text:
        stream.extend(encode(text))
        stream.append(eos)  # a document boundary, as pre-training corpora mark them
    data = torch.tensor(stream, dtype=torch.long)
    log(f"training text: {len(train_text)} documents, {len(stream)} tokens")

    s = settings
    config = transformers.LlamaConfig(
        vocab_size=s.vocab_size, hidden_size=s.hidden, intermediate_size=s.intermediate,
        num_hidden_layers=s.layers, num_attention_heads=s.heads, num_key_value_heads=s.kv_heads,
        max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=s.tie_embeddings,
        bos_token_id=ids["<s>"], eos_token_id=eos, initializer_range=0.02)
    torch.manual_seed(s.seed)
    torch.set_num_threads(os.cpu_count() or 1)
    model = transformers.LlamaForCausalLM(config)
    params = sum(p.numel() for p in model.parameters())  # a tied output matrix counts once
    embedding_params = sum(p.numel() for p in {id(p): p for p in (model.get_input_embeddings().weight,
                                                                   model.get_output_embeddings().weight)}.values())
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=s.lr, betas=(0.9, 0.95))
    generator = torch.Generator().manual_seed(s.seed)
    budget = s.train_minutes * 60
    warmup, floor = 20, 0.1
    log(f"model: {params / 1e6:.1f}M parameters ({embedding_params / params:.1%} in token_embd and output); "
        f"training for {s.train_minutes:g} min, batches of {s.batch} x {s.seq} tokens, peak lr {s.lr:g}")

    model.train()
    curve, losses, printed = [], [], 0
    step, started, last_print = 0, time.perf_counter(), 0.0
    while (elapsed := time.perf_counter() - started) < budget:
        fraction = elapsed / budget
        lr = s.lr * min(1.0, (step + 1) / warmup) * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * fraction)))
        for group in optimizer.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, len(data) - s.seq - 1, (s.batch,), generator=generator)
        batch = torch.stack([data[i:i + s.seq] for i in starts.tolist()])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        losses.append(loss.item())
        now = time.perf_counter() - started
        if now - last_print >= budget / 12 or now >= budget:
            mean = sum(losses[printed:]) / (step - printed)  # the mean since the last line
            curve.append({"step": step, "seconds": round(now, 1), "tokens": step * s.batch * s.seq,
                          "loss": round(mean, 4), "lr": lr})
            log(f"  step {step:5d}  {now:6.0f} s  {step * s.batch * s.seq:8d} tokens  loss {mean:.3f}  lr {lr:.2e}")
            printed, last_print = step, now
    seconds = time.perf_counter() - started
    model.eval()
    model.save_pretrained(model_dir)
    return {"parameters": params, "embedding_parameters": embedding_params, "train_tokens": len(stream),
            "steps": step, "tokens_seen": step * s.batch * s.seq,
            "train_seconds": round(seconds, 1), "curve": curve, "losses": [round(x, 4) for x in losses],
            "final_loss": round(sum(losses[-FINAL_LOSS_STEPS:]) / len(losses[-FINAL_LOSS_STEPS:]), 4),
            "epochs": round(step * s.batch * s.seq / len(stream), 2)}


def trained_model(workdir: Path, settings: ModelSettings, split: Split, corpus_digest: str) -> tuple[Path, dict]:
    """The cached model directory for these settings and this corpus, trained first if there is none."""
    from so8t_deploy.fsutil import publish_dir

    spec = {"version": MODEL_VERSION, "settings": settings.__dict__, "corpus": corpus_digest,
            "train_documents": len(split.train)}
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    model_dir = workdir / f"model-{key}"
    marker = model_dir / "trained.json"
    if marker.is_file():
        facts = json.loads(marker.read_text())
        log(f"model: cached in {model_dir} (trained in {facts['train_seconds']:.0f} s)")
        return model_dir, facts
    staging = workdir / f".model-{key}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    facts = train_model(staging, settings, [d.text for d in split.train])
    facts["spec"] = spec
    (staging / "trained.json").write_text(json.dumps(facts, indent=2) + "\n")  # last: a half-trained one is redone
    publish_dir(staging, model_dir)
    return model_dir, facts


# --------------------------------------------------------------------------------------------------------------
# The measurement


def bits_per_weight(path: Path) -> float:
    from gguf import GGUFReader

    tensors = GGUFReader(path).tensors
    return 8 * sum(int(t.n_bytes) for t in tensors) / sum(int(t.n_elements) for t in tensors)


def weighted_weight_error(reference: Path, quant: Path, importance: dict[str, np.ndarray]) -> float:
    """What quantizing with an importance matrix minimizes, measured on the weights themselves: over the tensors
    the matrix covers, the mean of sum_ij imp_j (W - Q(W))_ij^2 / sum_ij imp_j W_ij^2 (W the f16 weights, imp_j
    the mean squared activation of input column j on the calibration text)."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    floats = {t.name: t for t in GGUFReader(reference).tensors if t.name in importance}
    errors = []
    for tensor in GGUFReader(quant).tensors:
        if tensor.name not in importance:
            continue
        w = dequantize(floats[tensor.name].data, floats[tensor.name].tensor_type).astype(np.float64)
        q = dequantize(tensor.data, tensor.tensor_type).astype(np.float64)
        imp = importance[tensor.name]
        errors.append(float(((w - q) ** 2 * imp).sum() / (w**2 * imp).sum()))
    return sum(errors) / len(errors)


def importance_concentration(importance: dict[str, np.ndarray], share: float = 0.01) -> dict[str, float]:
    """The fraction of the importance held by the top `share` of input columns, by tensor kind (blk.N.KIND),
    averaged over layers: 0.01 is uniform importance, where an importance matrix has nothing to say."""
    by_kind: dict[str, list[float]] = {}
    for name, imp in importance.items():
        top = np.sort(imp)[-max(1, int(len(imp) * share)):]
        by_kind.setdefault(name.split(".")[2], []).append(float(top.sum() / imp.sum()))
    return {kind: sum(v) / len(v) for kind, v in sorted(by_kind.items())}


def evaluate(reference: Path, candidates: dict[str, Path], windows: list[list[int]], batch: int) -> dict[str, dict]:
    """compare() of every candidate against the reference on the same windows, a batch of windows at a time.

    compare's numbers are means over positions (perplexity: exp of one); every window has the same length, so
    the means of the batches weighted by their windows give exactly the numbers of one call over all windows.
    """
    from so8t_deploy.build.quality_metrics import compare
    from so8t_deploy.external.llamacpp import gguf_window_logits

    sums: dict[str, dict[str, float]] = {name: {"mean_kl": 0.0, "top1": 0.0, "log_ppl": 0.0} for name in candidates}
    ref_log_ppl = 0.0
    for first in range(0, len(windows), batch):
        chunk = windows[first:first + batch]
        ref_logits = gguf_window_logits(reference, chunk)
        ref_log_ppl += math.log(compare(ref_logits, ref_logits, chunk)["perplexity"]) * len(chunk)
        for name, path in candidates.items():
            numbers = compare(ref_logits, gguf_window_logits(path, chunk), chunk)
            sums[name]["mean_kl"] += numbers["mean_kl"] * len(chunk)
            sums[name]["top1"] += numbers["top1"] * len(chunk)
            sums[name]["log_ppl"] += math.log(numbers["perplexity"]) * len(chunk)
        log(f"  evaluated {min(first + batch, len(windows))}/{len(windows)} windows")
    n = len(windows)
    out = {name: {"mean_kl": s["mean_kl"] / n, "top1": s["top1"] / n, "perplexity": math.exp(s["log_ppl"] / n)}
           for name, s in sums.items()}
    out["f16"] = {"mean_kl": 0.0, "top1": 1.0, "perplexity": math.exp(ref_log_ppl / n)}
    return out


def fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--types", default="q4_k_m,iq4_xs,q3_k_m,q2_k", help="quant types, comma-separated")
    parser.add_argument("--workdir", type=Path, default=REPO / ".cache" / "bench-imatrix")
    parser.add_argument("--tokenizer", choices=("trained", "llama2"), default="trained",
                        help="trained: a SentencePiece vocabulary of --vocab-size pieces trained on the training "
                             "split; llama2: Llama 2's 32000 pieces")
    parser.add_argument("--vocab-size", type=int, default=4096, help="pieces of the trained tokenizer")
    parser.add_argument("--tie-embeddings", action="store_true",
                        help="share token_embd with the output layer (Llama does not)")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--intermediate", type=int, default=1536)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256, help="training sequence length")
    parser.add_argument("--batch", type=int, default=4, help="training sequences per step")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    parser.add_argument("--train-minutes", type=float, default=25.0, help="training wall time")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-chars", type=int, default=45_000, help="held-out text, at least this many characters")
    parser.add_argument("--calib-chars", type=int, default=120_000, help="calibration text, at least this many")
    parser.add_argument("--ctx", type=int, default=256, help="tokens per window: evaluation and imatrix chunks")
    parser.add_argument("--eval-windows", type=int, default=32)
    parser.add_argument("--eval-batch", type=int, default=8, help="windows whose logits are held at once")
    parser.add_argument("--json", action="store_true", help="print the numbers as JSON on stdout")
    args = parser.parse_args()

    from so8t_deploy.build.quality_metrics import token_windows
    from so8t_deploy.errors import BuildError
    from so8t_deploy.external.llamacpp import convert_to_gguf, gguf_tokenize, locate_converter, quantize_gguf
    from so8t_deploy.manifest.quant_types import lookup_quant_type

    types = [lookup_quant_type(name) for name in args.types.split(",") if name.strip()]
    vocab_size = args.vocab_size if args.tokenizer == "trained" else 32000
    settings = ModelSettings(args.tokenizer, vocab_size, args.tie_embeddings, args.hidden, args.layers,
                             args.intermediate, args.heads, args.kv_heads, args.seq, args.batch, args.lr,
                             args.train_minutes, args.seed)
    for name, size in (("hidden", args.hidden), ("intermediate", args.intermediate)):
        if size % 256:
            parser.error(f"--{name} {size}: k-quants and IQ types need rows of a multiple of 256")

    docs = python_documents()
    corpus_digest = hashlib.sha256("\0".join(f"{d.source}/{d.name}\0{d.text}" for d in docs).encode()).hexdigest()
    split = split_documents(docs, args.eval_chars, args.calib_chars)
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    model_dir, facts = trained_model(workdir, settings, split, corpus_digest)

    run = model_dir / "run"
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir()
    texts = {}
    for part, part_docs in (("train", split.train), ("calibration", split.calibration), ("eval", split.eval)):
        texts[part] = run / f"{part}.txt"
        texts[part].write_text(Split.text(part_docs), encoding="utf-8")

    f16 = model_dir / "model-f16.gguf"
    if not f16.is_file():
        started = time.perf_counter()
        convert_to_gguf(locate_converter(), model_dir, f16, "f16")
        log(f"f16 GGUF: {time.perf_counter() - started:.1f} s")
    tokens = {part: len(gguf_tokenize(f16, path.read_text(encoding="utf-8"))) for part, path in texts.items()}
    eval_tokens = gguf_tokenize(f16, texts["eval"].read_text(encoding="utf-8"))
    if len(eval_tokens) < args.eval_windows * args.ctx:
        parser.error(f"the held-out text has {len(eval_tokens)} tokens, fewer than --eval-windows x --ctx: "
                     "raise --eval-chars")
    windows = token_windows(eval_tokens, args.eval_windows, args.ctx)
    hf_tokens = text_encoder(model_dir)(texts["eval"].read_text(encoding="utf-8"))
    tokenizers_agree = hf_tokens == eval_tokens  # what the model trained on is what llama.cpp feeds it
    log("text (Python's own docs, whole documents dealt by a hash of their names): "
        + "; ".join(f"{part} {len(d)} docs ({describe(d)}), {tokens[part]} tokens"
                    for part, d in (("train", split.train), ("calibration", split.calibration),
                                    ("eval", split.eval))))

    quants: dict[str, Path] = {}
    quant_seconds: dict[str, float] = {}
    refused: dict[str, str] = {}

    def quantize(quant, imatrix: Path | None) -> None:
        label = f"{quant.name}{'+imatrix' if imatrix else ''}"
        started = time.perf_counter()
        try:
            quantize_gguf(f16, run / f"{label}.gguf", quant, imatrix=imatrix)
        except BuildError as e:
            # llama.cpp refuses, at the tensor where it happens, types that its own mix makes need an imatrix.
            if imatrix is not None or "requires an imatrix" not in str(e):
                raise
            tensor, target = re.search(r"offending tensor: (\S+)", str(e)), re.search(r"target type: (\S+)", str(e))
            refused[quant.name] = (f"llama.cpp makes {tensor[1]} {target[1]}, which needs an importance matrix"
                                   if tensor and target else "llama.cpp requires an importance matrix")
            log(f"{label}: refused ({refused[quant.name]})")
            return
        quant_seconds[label] = round(time.perf_counter() - started, 1)
        quants[label] = run / f"{label}.gguf"
        log(f"{label}: {quant_seconds[label]:.1f} s")

    for quant in types:
        if quant.needs_imatrix:
            refused[quant.name] = "the project requires an importance matrix for it, as llama.cpp does"
        else:
            quantize(quant, None)

    from so8t_deploy.external.imatrix_compute import compute_imatrix

    imatrix = run / "imatrix.gguf"
    started = time.perf_counter()
    info = compute_imatrix(f16, texts["calibration"], imatrix, dataset=texts["calibration"].name, ctx=args.ctx)
    imatrix_seconds = time.perf_counter() - started
    log(f"imatrix: {imatrix_seconds:.1f} s, {info.chunks} chunks of {args.ctx} calibration tokens, "
        f"{info.entries} tensors")
    for quant in types:
        quantize(quant, imatrix)

    started = time.perf_counter()
    log(f"evaluating {len(quants)} quants on {args.eval_windows} windows of {args.ctx} held-out tokens")
    metrics = evaluate(f16, quants, windows, args.eval_batch)
    eval_seconds = time.perf_counter() - started

    from so8t_deploy.external.imatrix import load_imatrix

    importance = {name: np.asarray(values, dtype=np.float64) for name, values in load_imatrix(imatrix).items()}
    concentration = importance_concentration(importance)
    werr = {label: weighted_weight_error(f16, path, importance) for label, path in quants.items()}
    rows = []
    for quant in types:
        without, with_ = metrics.get(quant.name), metrics[f"{quant.name}+imatrix"]
        werr_without, werr_with = werr.get(quant.name), werr[f"{quant.name}+imatrix"]
        rows.append({
            "weighted_error_without": werr_without, "weighted_error_with": werr_with,
            "weighted_error_ratio": werr_without and werr_with / werr_without,
            "quant": quant.name, "bpw": bits_per_weight(quants[f"{quant.name}+imatrix"]),
            "kl_without": without and without["mean_kl"], "kl_with": with_["mean_kl"],
            "kl_ratio": without and with_["mean_kl"] / without["mean_kl"],
            "top1_without": without and without["top1"], "top1_with": with_["top1"],
            "ppl_without": without and without["perplexity"], "ppl_with": with_["perplexity"],
        })
    vocab_label = (f"{vocab_size}-piece SentencePiece BPE trained on the training split"
                   if args.tokenizer == "trained" else f"Llama 2's 32000-piece SentencePiece ({VOCAB_GGUF})")
    result = {
        "model": {"architecture": "LlamaForCausalLM", **settings.__dict__, "vocab": vocab_label,
                  "parameters": facts["parameters"], "embedding_parameters": facts.get("embedding_parameters"),
                  "train_seconds": facts["train_seconds"],
                  "steps": facts["steps"], "tokens_seen": facts["tokens_seen"], "epochs": facts["epochs"],
                  "final_train_loss": facts["final_loss"], "loss_curve": facts["curve"], "directory": str(model_dir)},
        "text": {part: {"documents": len(d), "sources": describe(d), "tokens": tokens[part], "file": str(texts[part])}
                 for part, d in (("train", split.train), ("calibration", split.calibration), ("eval", split.eval))},
        "f16": {"bpw": bits_per_weight(f16), "perplexity": metrics["f16"]["perplexity"]},
        "imatrix": {"seconds": round(imatrix_seconds, 1), "ctx": args.ctx, "chunks": info.chunks,
                    "tensors": info.entries, "top1pct_columns_share": concentration},
        "eval": {"windows": args.eval_windows, "ctx": args.ctx, "positions": args.eval_windows * args.ctx,
                 "seconds": round(eval_seconds, 1)},
        "tokenizers_agree": tokenizers_agree, "quantize_seconds": quant_seconds, "rows": rows,
        "refused_without_imatrix": refused,
    }
    (run / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    if args.json:
        print(json.dumps(result, indent=2))
        return 0

    m = result["model"]
    share = (f", {m['embedding_parameters'] / m['parameters']:.1%} of them in token_embd and output"
             if m["embedding_parameters"] else "")
    print(f"model: Llama, {m['parameters'] / 1e6:.2f}M parameters{share} (hidden {args.hidden}, {args.layers} "
          f"layers, intermediate {args.intermediate}, {args.heads} heads / {args.kv_heads} KV, "
          f"{'tied' if args.tie_embeddings else 'untied'} embeddings; vocabulary: {vocab_label})")
    print(f"training: {m['train_seconds']:.0f} s, {m['steps']} steps of {args.batch} x {args.seq} tokens "
          f"({m['tokens_seen']} tokens, {m['epochs']} epochs), final train loss {m['final_train_loss']:.3f}")
    curve = ", ".join(f"{p['step']}:{p['loss']:.2f}" for p in m["loss_curve"])
    print(f"loss curve (step:mean loss since the previous point): {curve}; "
          f"the final loss is the mean of the last {FINAL_LOSS_STEPS} steps")
    for part, t in result["text"].items():
        print(f"text {part}: {t['tokens']} tokens, {t['documents']} documents ({t['sources']})")
    agree = "yes" if tokenizers_agree else "NO"
    print(f"tokenizers: the training tokenizer's and llama.cpp's agree on the held-out text: {agree}")
    print(f"f16 reference: {result['f16']['bpw']:.2f} bpw, perplexity {result['f16']['perplexity']:.2f} "
          f"on {args.eval_windows} x {args.ctx} held-out tokens (eval took {eval_seconds:.0f} s)")
    print(f"all numbers: {run / 'result.json'}")
    print(f"imatrix: {imatrix_seconds:.1f} s, {info.chunks} chunks of {args.ctx} tokens of the calibration text "
          f"({info.entries} tensors)")
    print()
    print("| quant | bpw | mean KL without imatrix | mean KL with | ratio | top-1 without | top-1 with "
          "| ppl without | ppl with | weighted weight error ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['quant']} | {r['bpw']:.2f} | {fmt(r['kl_without'], '.3g')} | {r['kl_with']:.3g} "
              f"| {fmt(r['kl_ratio'], '.2f')} | {fmt(r['top1_without'], '.3f')} | {r['top1_with']:.3f} "
              f"| {fmt(r['ppl_without'], '.2f')} | {r['ppl_with']:.2f} | {fmt(r['weighted_error_ratio'], '.2f')} |")
    print()
    print("ratio: mean KL with the importance matrix / without (below 1.0: it helped); weighted weight error ratio: "
          "the same for the importance-weighted squared error of the weights the matrix covers (what llama.cpp "
          "minimizes with it)")
    print("importance held by the top 1% of input columns (0.01 = uniform), by tensor: "
          + ", ".join(f"{kind} {v:.3f}" for kind, v in concentration.items()))
    for name, why in refused.items():
        print(f"n/a for {name} without an importance matrix: {why}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
