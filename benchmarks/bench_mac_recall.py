"""Can a MAC model learn recall through its memory at all? A tiny MAC trained from scratch on synthetic
recall.

The distillation runs ask a teacher-initialised student to learn recall from a few hundred KD steps; when that
fails, is the memory path unable to carry a fact, or is the budget too small? This isolates the mechanism. Two
tasks; in both, random filler tokens fill ``--gap`` segments between the fact and the question, so the answer
is nowhere in the attention's segment: only the memory can bring it. Loss: cross-entropy on the answer tokens.

* passkey: one value token fills the whole first segment; the last segment asks ``?`` -> value (a single
  fact, written 16 times: the easiest thing a memory can be asked);
* kv: 8 key/value pairs fill the first segment; the last segment asks 4 of the keys (``? key value``):
  associative recall, where the memory must map each key to its own value.
* needle: ``--needle-len`` value tokens written once at a random place among filler in the first segment;
  the last segment asks ``?`` and the values in order (the distillation runs' passkey in miniature).

Measured on fresh sequences (same generator, unseen draws): answer accuracy of

* the trained model with its memory learning (surprise), the rule it was trained with,
* the same model with memory off (``none``: read-outs of the initial memory only, the windowed baseline),
* a control trained with memory off throughout (what attention + persistent tokens alone can reach),
* a reference whose one segment holds the whole sequence (full attention sees the pairs: the ceiling, and
  how many steps this task needs when the fact is in view),

and accuracy at longer gaps than trained. Chance is 1 / ``--values``.

Usage (the second line: the same with the version-2 memory)::

    python benchmarks/bench_mac_recall.py --task passkey --steps 200 --eval-every 50 --memory-layers 1 \
        --threads 1
    python benchmarks/bench_mac_recall.py --task passkey --steps 200 --eval-every 50 --memory-layers 1 \
        --memory-version 2 --threads 1
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from models.configuration_mac_llama import MEMORY_VERSION, MACLlamaConfig  # noqa: E402
from models.modeling_mac_llama import MACLlamaForCausalLM  # noqa: E402

PAIRS, QUERIES = 8, 4
PAD, ASK = 0, 1  # token ids; keys, values and filler take disjoint ranges after these


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument(
        "--task",
        choices=["kv", "passkey", "needle"],
        default="kv",
        help="kv: 8 key/value pairs, 4 asked; passkey: one value fills the first segment, asked once; "
        "needle: --needle-len values written once at a random place in filler, asked in order",
    )
    p.add_argument("--needle-len", type=int, default=3, help="tokens of the needle task's value")
    p.add_argument("--gap", type=int, default=1, help="filler segments between the pairs and the queries")
    p.add_argument("--eval-gaps", default="1,2,4", help="gaps measured after training")
    p.add_argument("--keys", type=int, default=64)
    p.add_argument("--values", type=int, default=64)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--memory-layers", default="0,1")
    p.add_argument(
        "--memory-version", type=int, default=None, help="MAC memory version [default: the config's]"
    )
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--eval-sequences", type=int, default=512)
    p.add_argument(
        "--models",
        default="memory,control,full",
        help="which to train: memory (rule surprise), control (rule none), full (one segment holds the "
        "whole sequence), distil (full's weights with segment-local attention and a fresh memory; only the "
        "memory trains, by KD from full: the distillation recipe in miniature; trains full first)",
    )
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


SEGMENT = 2 * PAIRS  # the pairs fill exactly one segment
MAX_POSITIONS = 16 * SEGMENT


def vocab(args) -> tuple[int, int, int]:
    """(first key id, first value id, first filler id); filler takes 64 ids after the values."""
    key0 = 2
    value0 = key0 + args.keys
    return key0, value0, value0 + args.values


def batch(args, n: int, gap: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (n, T), answer mask (n, T - 1): positions whose next token is an answer value)."""
    key0, value0, filler0 = vocab(args)
    if args.task == "passkey":
        values = torch.randint(0, args.values, (n, 1), generator=generator) + value0
        filler = torch.randint(0, 64, (n, gap * SEGMENT), generator=generator) + filler0
        query = torch.cat([torch.full((n, 1), ASK), values, torch.full((n, SEGMENT - 2), PAD)], dim=1)
        ids = torch.cat([values.expand(n, SEGMENT), filler, query], dim=1)
        answer = torch.zeros(n, ids.shape[1] - 1, dtype=torch.bool)
        answer[:, SEGMENT * (1 + gap)] = True  # ASK predicts the value
        return ids, answer
    if args.task == "needle":
        length = args.needle_len
        values = torch.randint(0, args.values, (n, length), generator=generator) + value0
        ids = torch.randint(0, 64, (n, (2 + gap) * SEGMENT), generator=generator) + filler0
        at = torch.randint(0, SEGMENT - length + 1, (n,), generator=generator)
        rows = torch.arange(n)[:, None]
        ids[rows, at[:, None] + torch.arange(length)] = values  # written once, somewhere in segment 0
        start = SEGMENT * (1 + gap)
        ids[:, start] = ASK
        ids[:, start + 1 : start + 1 + length] = values
        answer = torch.zeros(n, ids.shape[1] - 1, dtype=torch.bool)
        answer[:, start : start + length] = True  # ASK predicts the first value, each value the next
        return ids, answer
    keys = torch.stack([torch.randperm(args.keys, generator=generator)[:PAIRS] for _ in range(n)]) + key0
    values = torch.randint(0, args.values, (n, PAIRS), generator=generator) + value0
    pairs = torch.stack([keys, values], dim=2).reshape(n, SEGMENT)
    filler = torch.randint(0, 64, (n, gap * SEGMENT), generator=generator) + filler0
    asked = torch.stack([torch.randperm(PAIRS, generator=generator)[:QUERIES] for _ in range(n)])
    rows = torch.arange(n)[:, None]
    ask = torch.full((n, QUERIES), ASK)
    queries = torch.stack([ask, keys[rows, asked], values[rows, asked]], dim=2).reshape(n, 3 * QUERIES)
    pad = torch.full((n, SEGMENT - 3 * QUERIES), PAD)
    ids = torch.cat([pairs, filler, queries, pad], dim=1)
    answer = torch.zeros(n, ids.shape[1] - 1, dtype=torch.bool)
    start = SEGMENT * (1 + gap)
    answer[:, start + 1 : start + 3 * QUERIES : 3] = True  # the key's position predicts its value
    return ids, answer


def build(args, seed: int, segment_len: int = SEGMENT) -> MACLlamaForCausalLM:
    torch.manual_seed(seed)
    config = MACLlamaConfig(
        vocab_size=vocab(args)[2] + 64,
        hidden_size=args.hidden,
        intermediate_size=2 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=True,
        bos_token_id=PAD,
        eos_token_id=PAD,
        pad_token_id=PAD,
        segment_len=segment_len,
        memory_chunk_size=4,
        num_persistent_tokens=4,
        memory_layers=[int(i) for i in args.memory_layers.split(",") if i.strip()],
        **({} if args.memory_version is None else {"memory_version": args.memory_version}),
    )
    return MACLlamaForCausalLM(config)


def answer_loss(model, ids, answer, rule) -> tuple[torch.Tensor, torch.Tensor]:
    logits = model(input_ids=ids, update_rule=rule).logits[:, :-1]
    targets = ids[:, 1:]
    loss = F.cross_entropy(logits[answer].float(), targets[answer])
    correct = (logits[answer].argmax(-1) == targets[answer]).float()
    return loss, correct


@torch.no_grad()
def accuracy(model, args, gap: int, rule: str) -> float:
    generator = torch.Generator().manual_seed(
        10_000 + gap
    )  # the same fresh sequences for every model and rule
    model.eval()
    hits = []
    for _ in range(0, args.eval_sequences, 128):
        ids, answer = batch(args, 128, gap, generator)
        hits.append(answer_loss(model, ids, answer, rule)[1])
    model.train()
    return torch.cat(hits).mean().item()


def train(args, rule: str, label: str, segment_len: int = SEGMENT) -> MACLlamaForCausalLM:
    model = build(args, args.seed, segment_len)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 50))
    generator = torch.Generator().manual_seed(args.seed)
    started = time.perf_counter()
    for step in range(1, args.steps + 1):
        ids, answer = batch(args, args.batch_size, args.gap, generator)
        loss, correct = answer_loss(model, ids, answer, rule)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % args.eval_every == 0 or step == args.steps:
            on = accuracy(model, args, args.gap, rule)
            off = accuracy(model, args, args.gap, "none") if rule != "none" else on
            print(
                f"  {label} step {step:5d}  loss {loss.item():.3f}  train acc {correct.mean().item():.3f}  "
                f"eval acc {rule} {on:.3f} / none {off:.3f}  ({time.perf_counter() - started:.0f} s)",
                flush=True,
            )
    return model


def distil(args, teacher: MACLlamaForCausalLM, rule: str) -> MACLlamaForCausalLM:
    """The distillation setting in miniature: the full-attention reference's weights with segment-local
    attention and a fresh memory; only the memory, its gate and the persistent tokens train, on the KL to the
    reference's answer distribution (which sees the fact) plus the answer's cross-entropy."""
    student = build(args, args.seed + 1)
    fresh = ("memory", "persistent_tokens")
    kept = {k: v for k, v in teacher.state_dict().items() if not any(part in k for part in fresh)}
    student.load_state_dict(kept, strict=False)
    trainable = [p for name, p in student.named_parameters() if any(part in name for part in fresh)]
    for name, param in student.named_parameters():
        param.requires_grad_(any(part in name for part in fresh))
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 50))
    generator = torch.Generator().manual_seed(args.seed)
    teacher.eval()
    started = time.perf_counter()
    for step in range(1, args.steps + 1):
        ids, answer = batch(args, args.batch_size, args.gap, generator)
        with torch.no_grad():
            target = F.log_softmax(
                teacher(input_ids=ids, update_rule="none").logits[:, :-1][answer].float(), -1
            )
        logits = student(input_ids=ids, update_rule=rule).logits[:, :-1][answer].float()
        logp = F.log_softmax(logits, -1)
        kl = F.kl_div(logp, target, log_target=True, reduction="batchmean")
        loss = kl + F.cross_entropy(logits, ids[:, 1:][answer])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        schedule.step()
        if step % args.eval_every == 0 or step == args.steps:
            on, off = accuracy(student, args, args.gap, rule), accuracy(student, args, args.gap, "none")
            print(
                f"  distilled step {step:5d}  KL {kl.item():.3f}  eval acc {rule} {on:.3f} / none {off:.3f}  "
                f"({time.perf_counter() - started:.0f} s)",
                flush=True,
            )
    return student


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    facts = {
        "passkey": "one value fills segment 0",
        "needle": f"{args.needle_len} values written once in segment 0, asked in order",
        "kv": f"{PAIRS} pairs in segment 0, {QUERIES} asked",
    }[args.task]
    print(
        f"task {args.task}, chance {1 / args.values:.3f}; {facts}, gap {args.gap} segments of {SEGMENT}; "
        f"hidden {args.hidden}, {args.layers} layers, memory in {args.memory_layers}, "
        f"memory version {args.memory_version or MEMORY_VERSION}"
    )
    started = time.perf_counter()
    which = {m.strip() for m in args.models.split(",") if m.strip()}
    trained = {}
    if "memory" in which:
        trained["surprise"] = train(args, "surprise", "memory on ")
    if "control" in which:
        trained["none"] = train(args, "none", "control   ")
    if "full" in which or "distil" in which:  # the ceiling: attention sees the pairs
        trained["full"] = train(args, "none", "full attn ", segment_len=MAX_POSITIONS)
    if "distil" in which:
        trained["distil"] = distil(args, trained["full"], "surprise")
    gaps = [int(g) for g in args.eval_gaps.split(",") if g.strip()]
    print(
        f"\n| model (trained gap {args.gap}) | rule at eval | " + " | ".join(f"gap {g}" for g in gaps) + " |"
    )
    print("|---|---|" + "---|" * len(gaps))
    rows = []
    if "surprise" in trained:
        rows += [
            ("memory on (surprise)", trained["surprise"], "surprise"),
            ("same model, memory off", trained["surprise"], "none"),
        ]
    if "none" in trained:
        rows.append(("control trained memory off", trained["none"], "none"))
    if "full" in trained:
        rows.append(("full attention (one segment)", trained["full"], "none"))
    if "distil" in trained:
        rows += [
            ("distilled from it, memory only (surprise)", trained["distil"], "surprise"),
            ("same model, memory off", trained["distil"], "none"),
        ]
    for name, model, rule in rows:
        print(
            f"| {name} | {rule} | " + " | ".join(f"{accuracy(model, args, g, rule):.3f}" for g in gaps) + " |"
        )
    print(f"\n{time.perf_counter() - started:.0f} s; threads {torch.get_num_threads()}")


if __name__ == "__main__":
    main()
