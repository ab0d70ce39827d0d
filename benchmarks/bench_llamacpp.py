"""CPU decode speed of llama.cpp (the peer a CPU user would pick) on the same SmolLM2 GGUF, beside HF dense.

    python benchmarks/bench_llamacpp.py [--types q4_1,f32,bf16] [--threads 1,2] [--prompt-tokens 128]
        [--new-tokens 64] [--reps 5] [--hf float32] [--json results/bench/llamacpp-smollm2-135m.json]

What is measured, per (weight type, thread count), at batch 1:
- the prompt: ``--prompt-tokens`` consecutive tokens of the Lee corpus, held-out documents first (the split of the
  default recipe), cut by ``clada.calibrate.bench.text_prompts`` with the HF tokenizer of the converted checkpoint:
  the prompt ``clada bench`` uses. llama.cpp is fed these exact token ids (no BOS added, no chat template).
- prefill: one ``Llama.eval`` of the whole prompt (seconds); it yields the first new token.
- decode: a greedy loop of exactly ``new_tokens - 1`` further single-token ``Llama.eval`` calls, argmax of the last
  logits in numpy, no EOS stop. decode tok/s = (new_tokens - 1) / decode seconds, as ``clada bench`` defines it.
- one untimed warm-up, then ``--reps`` timed repetitions; reported: the median (tok/s of the median decode time),
  min, max and spread = (max - min) / median of decode tok/s (a warning above 10%), and the median prefill seconds.
- weight types: the GGUF as shipped (``q4_1`` for SmolLM2) and the same weights de-quantized to ``f32``, ``bf16``
  or ``f16`` GGUFs (1-D norm tensors stay f32), the weights clada runs in transformers; converted once into
  ``$CLADA_CACHE/peer/`` (default ``~/.cache/clada/peer/``).
- ``--hf float32[,bfloat16]``: the same prompt timed with transformers' dense ``generate`` in this process
  (``clada bench``'s timing of the dense mode), for a same-conditions reference; ``--hf ''`` skips it. Its greedy
  tokens are compared with each llama.cpp type's (agreement reported, never an error).

Install (not a clada dependency): ``pip install llama-cpp-python`` compiles llama.cpp from source (~6+ min on
2 cores). A native build segfaulted in decode on an Intel AVX-512/AMX Xeon; there, build with
``CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON" pip install --no-cache-dir
llama-cpp-python``. The JSON records llama.cpp's own system info (the instruction sets it was built with).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

OUT_TYPES = ("f32", "bf16", "f16")
SPREAD_WARN = 0.10


def _llama_cpp():
    """The llama_cpp module, or a one-line error and exit 2 (checked before anything is loaded)."""
    try:
        import llama_cpp
    except ImportError:
        print("bench_llamacpp: llama_cpp is not installed: pip install llama-cpp-python (builds llama.cpp, ~6 min)",
              file=sys.stderr)
        raise SystemExit(2) from None
    return llama_cpp


def source_type(path: Path) -> str:
    """The label of a GGUF file's weight type from ``general.file_type``, e.g. ``q4_1``."""
    import gguf

    field = gguf.GGUFReader(path).fields["general.file_type"]
    return gguf.LlamaFileType(int(field.contents())).name.removeprefix("MOSTLY_").removeprefix("ALL_").lower()


def _field_value(field):
    """A reader field's value as GGUFWriter.add_key_value takes it; strings as raw bytes (copied byte-exact)."""
    from gguf import GGUFValueType

    if field.types[-1] != GGUFValueType.STRING:
        return field.contents()
    strings = [bytes(field.parts[i]) for i in field.data]
    return strings if field.types[0] == GGUFValueType.ARRAY else strings[0]


def dequantized_gguf(source: Path, out_type: str) -> Path:
    """``source`` with every quantized or f16 tensor de-quantized to ``out_type`` (f32, bf16 or f16), cached.

    All key/value metadata (tokenizer included), tensor names, shapes and order are copied; only tensor types
    and ``general.file_type`` change. f32 tensors (the norms) stay f32. Written atomically once into
    ``<clada cache>/peer/<stem>-<sha256[:16]>.<out_type>.gguf``.
    """
    import gguf
    from gguf import GGMLQuantizationType as Q

    from clada.artifacts.atomic import atomic_path
    from clada.calibrate.cache import cache_dir, file_sha256

    qtype = {"f32": Q.F32, "bf16": Q.BF16, "f16": Q.F16}[out_type]
    target = cache_dir() / "peer" / f"{source.stem}-{file_sha256(source)[:16]}.{out_type}.gguf"
    if target.is_file():
        return target
    print(f"bench_llamacpp: de-quantizing {source.name} to {out_type} (once) ...", file=sys.stderr, flush=True)
    reader = gguf.GGUFReader(source)
    with atomic_path(target) as tmp:
        writer = gguf.GGUFWriter(tmp, reader.fields["general.architecture"].contents())
        for name, field in reader.fields.items():
            if name.startswith("GGUF.") or name == "general.architecture":
                continue
            if name == "general.alignment":
                writer.add_custom_alignment(int(field.contents()))
            elif name == "general.file_type":
                writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
                                      "f16": gguf.LlamaFileType.MOSTLY_F16}[out_type])
            else:
                writer.add_key_value(name, _field_value(field), field.types[0],
                                     field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None)
        for tensor in reader.tensors:
            if tensor.tensor_type == Q.F32:
                writer.add_tensor(tensor.name, np.array(tensor.data))
                continue
            weights = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
            if qtype == Q.BF16:
                writer.add_tensor(tensor.name, gguf.quants.quantize(weights, Q.BF16), raw_dtype=Q.BF16)
            else:
                writer.add_tensor(tensor.name, weights.astype(np.float32 if qtype == Q.F32 else np.float16))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return target


def prompt_ids(tokenizer, data: str, prompt_tokens: int) -> list[int]:
    """``clada bench``'s batch-1 prompt: held-out documents first (default recipe split), then the rest."""
    from clada.calibrate.bench import bench_texts, text_prompts

    return text_prompts(tokenizer, bench_texts(data), 1, prompt_tokens)[0].tolist()


def llama_greedy(llama_cpp, llm, ids: list[int], new_tokens: int) -> tuple[float, float, list[int]]:
    """(prefill seconds, decode seconds, tokens) of one greedy generation of exactly ``new_tokens`` tokens.

    The argmax reads the last position's logits in place (``llama_get_logits_ith``): with ``logits_all=False``
    ``Llama.eval`` keeps no scores.
    """
    vocab = llm.n_vocab()

    def argmax() -> int:
        return int(np.argmax(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(vocab,))))

    llm.reset()
    t0 = time.perf_counter()
    llm.eval(ids)
    tokens = [argmax()]
    t1 = time.perf_counter()
    while len(tokens) < new_tokens:
        llm.eval(tokens[-1:])
        tokens.append(argmax())
    return t1 - t0, time.perf_counter() - t1, tokens


def summary(prefill: list[float], decode: list[float], new_tokens: int) -> dict:
    """Median decode tok/s (of the median time, as clada bench), min, max, spread, median prefill, raw times."""
    steps = new_tokens - 1
    median = steps / statistics.median(decode)
    low, high = steps / max(decode), steps / min(decode)
    return {"decode_tok_s": median, "decode_tok_s_min": low, "decode_tok_s_max": high,
            "spread": (high - low) / median, "prefill_s": statistics.median(prefill),
            "decode_s_all": decode, "prefill_s_all": prefill}


def repeat(run, reps: int, new_tokens: int) -> tuple[dict, list[int]]:
    """One warm-up call of ``run()`` -> (prefill s, decode s, tokens), then ``reps`` timed ones."""
    run()
    times = [run() for _ in range(reps)]
    return summary([t[0] for t in times], [t[1] for t in times], new_tokens), times[-1][2]


def agreement(tokens: list[int], reference: list[int]) -> dict:
    """Matching leading tokens and share of equal positions against the transformers float32 greedy tokens."""
    n = min(len(tokens), len(reference))
    prefix = next((i for i in range(n) if tokens[i] != reference[i]), n)
    return {"prefix": prefix, "equal_share": sum(a == b for a, b in zip(tokens, reference)) / max(n, 1),
            "compared": n}


def hf_greedy(model, ids: list[int], new_tokens: int) -> list[int]:
    """transformers' greedy continuation (EOS not suppressed, like the llama.cpp loop)."""
    import torch

    prompt = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                             do_sample=False, pad_token_id=0)
    return out[0, len(ids):].tolist()


def _print_row(row: dict) -> None:
    match = row.get("agreement")
    agree = f"  hf-f32 agreement: {match['prefix']}/{match['compared']} leading" if match else ""
    print(f"{row['engine']:12s} {row['type']:8s} threads {row['threads']}: decode {row['decode_tok_s']:7.2f} tok/s "
          f"(min {row['decode_tok_s_min']:.2f}, max {row['decode_tok_s_max']:.2f}, spread {row['spread']:.1%}), "
          f"prefill {row['prefill_s']:.3f} s{agree}", flush=True)
    if row["spread"] > SPREAD_WARN:
        print(f"warning: {row['engine']} {row['type']} threads {row['threads']}: decode tok/s spread "
              f"{row['spread']:.1%} > {SPREAD_WARN:.0%}; the machine was not quiet", flush=True)


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="a built-in model name (a GGUF shipped on PyPI)")
    parser.add_argument("--types", default="q4_1,f32,bf16",
                        help="the GGUF's own type (q4_1 for SmolLM2) and/or f32, bf16, f16 (de-quantized)")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions after one warm-up")
    parser.add_argument("--data", default="lee", help="text the prompt is cut from (clada's data specs)")
    parser.add_argument("--hf", default="float32", help="transformers dense dtypes timed as reference; '' skips")
    parser.add_argument("--json", default=None, help="write the figures here (atomically)")
    args = parser.parse_args()
    llama_cpp = _llama_cpp()
    if args.new_tokens < 2 or args.prompt_tokens < 1 or args.reps < 1:
        parser.error("need --new-tokens >= 2, --prompt-tokens >= 1, --reps >= 1")
    threads = [int(t) for t in _csv(args.threads)]

    import torch

    from clada.artifacts import write_atomic
    from clada.calibrate.bench import timed_generate
    from clada.calibrate.cache import file_sha256
    from clada.calibrate.models import BUILTIN_MODELS, load_model
    from clada.runtime.machine import cpu_info

    if args.model not in BUILTIN_MODELS:
        parser.error(f"--model: one of {', '.join(BUILTIN_MODELS)}")
    source = BUILTIN_MODELS[args.model].fetch()
    own = source_type(source)
    types = _csv(args.types)
    unknown = [t for t in types if t not in (own, *OUT_TYPES)]
    if unknown:
        parser.error(f"--types: {', '.join(unknown)}: expected {own} (the GGUF as shipped) or {', '.join(OUT_TYPES)}")
    ggufs = {t: source if t == own else dequantized_gguf(source, t) for t in types}
    model, tokenizer, checkpoint = load_model(args.model, "float32", "cpu")
    ids = prompt_ids(tokenizer, args.data, args.prompt_tokens)
    reference = hf_greedy(model, ids, args.new_tokens)

    rows = []
    for dtype in _csv(args.hf):
        hf_model = model if dtype == "float32" else load_model(args.model, dtype, "cpu")[0]
        prompt = torch.tensor([ids])
        for n in threads:
            torch.set_num_threads(n)
            stats, _ = repeat(lambda: (*timed_generate(hf_model, prompt, args.new_tokens), []), args.reps,
                              args.new_tokens)
            rows.append({"engine": "transformers", "type": dtype, "threads": n, **stats})
            _print_row(rows[-1])
    del model
    for kind, path in ggufs.items():
        for n in threads:
            llm = llama_cpp.Llama(str(path), n_ctx=args.prompt_tokens + args.new_tokens, n_batch=args.prompt_tokens,
                                  n_ubatch=args.prompt_tokens, n_threads=n, n_threads_batch=n, logits_all=False,
                                  verbose=False)
            stats, tokens = repeat(lambda: llama_greedy(llama_cpp, llm, ids, args.new_tokens), args.reps,
                                   args.new_tokens)
            del llm
            rows.append({"engine": "llama.cpp", "type": kind, "threads": n, "gguf": path.name, **stats,
                         "agreement": agreement(tokens, reference), "tokens": tokens})
            _print_row(rows[-1])
    if args.json:
        result = {
            "model": args.model, "batch": 1, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
            "reps": args.reps, "warmup": 1, "data": args.data,
            "prompt_sha256": hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:16],
            "definition": "decode_tok_s = (new_tokens - 1) / median decode seconds; spread = (max - min) / median",
            "llama_cpp": {"version": llama_cpp.__version__,
                          "system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip()},
            "torch": torch.__version__, "python": platform.python_version(), "cpu": cpu_info(),
            "checkpoint": Path(checkpoint).name,
            "ggufs": {t: {"file": p.name, "sha256": file_sha256(p)[:16], "bytes": p.stat().st_size}
                      for t, p in ggufs.items()},
            "hf_float32_tokens": reference, "runs": rows,
        }
        write_atomic(args.json, (json.dumps(result, indent=2) + "\n").encode())


if __name__ == "__main__":
    main()
