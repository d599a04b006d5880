"""How fast does vox train on this machine, and how far is that from what the machine can do?

Usage::

    python -m voxlib.bench --quick                  # make bench: 2-9 minutes on a 2-core CPU
    python -m voxlib.bench                          # more repeats, batch sizes, compile for both widths
    python -m voxlib.bench --parity                 # bf16 vs fp32 accuracy on the demo corpus, seeds 0, 1, 2
    python -m voxlib.bench --device cuda --epoch-utterances 20000

One run measures, side by side on the same machine: the GEMM ceiling per dtype (the best FLOP/s of
any kernel library torch uses, on squares and on the GEMM shapes of the models' layers) and the
theoretical peak where the CPU reports what it needs; training throughput of the seed width and the
CPU default width in fp32, bf16 autocast, channels_last and torch.compile at batch 10 and at the
best batch found, each against the ceiling of its dtype, and what precision=auto picks; the
data-loader wait from the feature cache; the feature-cache build against a plain librosa loop;
peak memory of short training runs on a corpus and on the same corpus repeated 4x; and the seed
protocol's wall time on a GPU (estimated from FLOPs on a CPU, measured on CUDA). It prints a table
and writes ``outputs/bench/<timestamp>.json``.

Modules: ``steps`` (training's step per variant), ``ceiling`` (GEMM ceiling, theoretical peak),
``corpus`` (the generated corpus), ``pipeline`` (loader wait, cache costs, predict, memory),
``parity`` (bf16 accuracy), ``table`` (the printed table) and ``runner`` (the plan, one bench run, the CLI).

Why ratios: on a shared machine absolute samples/s move with the neighbours' load, and so does the
ceiling measured in the same run, so achieved/ceiling stays meaningful. Every time is the best of
several repeats, because noise only ever adds time. See docs/benchmark.md for the method.
"""

