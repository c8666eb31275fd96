"""Synthetic long-range items: exact spans and distances, determinism, disjoint train/eval key spaces."""

import pytest
import torch
from transformers import AutoTokenizer

from titans_distil.data import load_blocks
from titans_distil.errors import UserError
from titans_distil.long_range import KINDS, key_domain, make_items


@pytest.fixture(scope="module")
def tokenizer(embedded_dir):
    return AutoTokenizer.from_pretrained(embedded_dir)


@pytest.fixture(scope="module")
def filler(tokenizer, small_corpus):
    return load_blocks(
        str(small_corpus), tokenizer, 512, "validation", validation_fraction=0.2, use_cache=False
    ).reshape(-1)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("distance", [0, 37, 300])
def test_spans_and_distance_are_exact(tokenizer, filler, kind, distance):
    for item in make_items(kind, tokenizer, filler, distance, 3, seed=1):
        assert item.distance == distance
        assert item.fact[0] == 0 and item.answer[1] == len(item.ids)
        assert item.question[1] == item.answer[0]
        answer = tokenizer.decode(item.ids[item.answer[0] : item.answer[1]])
        fact = tokenizer.decode(item.ids[item.fact[0] : item.fact[1]])
        if kind == "kv":  # the key is asked, the value answered
            assert f"{item.key} ->{answer}\n" in fact
        else:
            assert answer.strip() == item.key and item.key in fact


def test_deterministic_and_domains_disjoint(tokenizer, filler):
    for kind in KINDS:
        a = make_items(kind, tokenizer, filler, 64, 20, seed=3, domain="eval")
        assert a == make_items(kind, tokenizer, filler, 64, 20, seed=3, domain="eval")
        train = make_items(kind, tokenizer, filler, 64, 20, seed=3, domain="train")
        assert {key_domain(i.key) for i in a} == {"eval"}
        assert {key_domain(i.key) for i in train} == {"train"}
        assert not {i.key for i in a} & {i.key for i in train}


def test_filler_too_short_is_our_error(tokenizer):
    with pytest.raises(UserError, match="fewer than the 100 an item at distance 100 needs"):
        make_items("passkey", tokenizer, torch.arange(50), 100, 1, seed=0)
