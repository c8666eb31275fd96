"""Our KD training step vs a naive reference loop, same teacher, student and batch, in one process.

Naive: both models in fp32, full-vocabulary logits of both for the whole batch, `F.kl_div`, backward.
Ours: the step `distil.py` runs: teacher under inference_mode in bf16 (where the CPU has bf16), student under
bf16 autocast, KD loss in chunks of positions (never the full logits at once).
Peak memory is the growth of the process's resident set over the step, sampled every 2 ms.

    python benchmarks/bench_kd.py --student-layers 6 --batch-size 4 --max-length 512
"""

from __future__ import annotations

import os
import statistics
import threading
import time

import click
import torch
import torch.nn.functional as F


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Samples the resident set in a thread; `peak - start` is the step's extra memory."""

    def __enter__(self):
        self.start = self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())
        self.extra = self.peak - self.start


def naive_step(teacher, student, ids, optimizer, temperature):
    with torch.no_grad():
        teacher_logits = teacher(input_ids=ids).logits[:, :-1].float()
    student_logits = student(input_ids=ids).logits[:, :-1].float()
    kd = (
        F.kl_div(
            F.log_softmax(student_logits / temperature, -1),
            F.log_softmax(teacher_logits / temperature, -1),
            log_target=True,
            reduction="batchmean",
        )
        * temperature**2
        / ids.shape[1]
    )
    kd.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return kd.item()


def our_step(teacher, distiller, ids, optimizer, temperature, autocast):
    from titans_distil.train import teacher_targets

    targets = teacher_targets(teacher, ids)
    with autocast:
        loss, kd, _, _ = distiller(
            ids, targets, kind="kl", temperature=temperature, alpha=1.0, chunk_size=256
        )
        loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return kd.item()


@click.command()
@click.option("--teacher", default="embedded", show_default=True)
@click.option("--student-layers", default="6", show_default=True)
@click.option("--batch-size", type=int, default=4, show_default=True)
@click.option("--max-length", type=int, default=512, show_default=True)
@click.option(
    "--repeats", type=int, default=3, show_default=True, help="Timed steps per side (after one warm-up)."
)
@click.option(
    "--precision",
    type=click.Choice(["auto", "bf16", "fp32"]),
    default="auto",
    show_default=True,
    help="Ours only; naive is fp32.",
)
def main(teacher, student_layers, batch_size, max_length, repeats, precision):
    """Print tokens/s and peak extra memory of our KD step and of the naive loop, and their ratios."""
    from titans_distil.student import build_student, pick_layers
    from titans_distil.teacher import load_teacher
    from titans_distil.train import Distiller, resolve_precision

    torch.manual_seed(0)
    teacher_fp32, tokenizer = load_teacher(teacher)
    layers = pick_layers(teacher_fp32.config.num_hidden_layers, student_layers)
    ids = torch.randint(0, teacher_fp32.config.vocab_size, (batch_size, max_length))
    tokens = batch_size * max_length
    results = {}

    student = build_student(teacher_fp32, layers)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-5)
    times, peaks = [], []
    for i in range(repeats + 1):
        with PeakRSS() as mem:
            start = time.perf_counter()
            naive_step(teacher_fp32, student, ids, optimizer, 1.0)
            elapsed = time.perf_counter() - start
        if i:
            times.append(elapsed)
            peaks.append(mem.extra)
    results["naive (fp32, full logits, F.kl_div)"] = (statistics.median(times), max(peaks))
    del student, optimizer

    resolved = resolve_precision(precision)
    teacher_ours = teacher_fp32.to(torch.bfloat16) if resolved == "bf16" else teacher_fp32
    student = build_student(load_teacher(teacher)[0], layers)
    distiller = Distiller(student).train()
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-5)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=resolved == "bf16")
    times, peaks = [], []
    for i in range(repeats + 1):
        with PeakRSS() as mem:
            start = time.perf_counter()
            our_step(teacher_ours, distiller, ids, optimizer, 1.0, autocast)
            elapsed = time.perf_counter() - start
        if i:
            times.append(elapsed)
            peaks.append(mem.extra)
    results[f"ours ({resolved}, chunked KD)"] = (statistics.median(times), max(peaks))

    print(
        f"\nKD step: teacher {teacher} -> student layers {layers}, batch {batch_size} x {max_length} tokens, "
        f"{torch.get_num_threads()} threads, median of {repeats}"
    )
    print(f"{'':40s} {'s/step':>8s} {'tokens/s':>9s} {'peak extra MB':>14s}")
    for name, (seconds, peak) in results.items():
        print(f"{name:40s} {seconds:8.2f} {tokens / seconds:9.0f} {peak / 2**20:14.0f}")
    (naive_s, naive_mem), (ours_s, ours_mem) = results.values()
    print(
        f"\nthroughput ratio ours/naive: {naive_s / ours_s:.2f}x   peak-memory ratio ours/naive: "
        f"{ours_mem / naive_mem:.2f}x"
    )


if __name__ == "__main__":
    main()
