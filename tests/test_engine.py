"""The serving engine without Ray or a server: a tiny randomly initialised model of the
recipe, exported as the platform exports served models, loaded, scored and generated
from. The assertions are about behaviour: scores equal a direct forward pass whatever the
chunking, padding or windows; max_tokens bounds a completion; stop strings cut it; batched,
seeded and streamed generation agree with the plain call; deadlines are kept."""

from __future__ import annotations

import dataclasses
import math
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from slmfactory.platform.config import ServingConfig, load_config
from slmfactory.serving import engine
from slmfactory.serving.api import DEFAULT_LIMITS, ApiError, Limits, validate
from slmfactory.serving.engine import (Deadline, load, one_token_forward, pick_domain, score_ids, token_logprobs,
                                       with_firsts)
from slmfactory.serving.generation import Sampling, TextStream, cut_at_stop, generate, streamer
from slmfactory.serving.schemas import ChatRequest, CompletionRequest

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
TEXT = ("Permission is hereby granted, free of charge, to any person obtaining a copy of this software "
        "and associated documentation files, to deal in the software without restriction.")


@pytest.fixture(scope="module")
def folder(tiny_root, tmp_path_factory) -> Path:
    """A served model folder: the recipe's `slm`, freshly initialised, through `export_hf`."""
    from slmfactory.models.train.phases import export_hf, load_lm

    work = tmp_path_factory.mktemp("engine") / "work"
    shutil.copytree(tiny_root, work)
    cfg = load_config(TINY, {"workdir": str(work)})
    torch.manual_seed(0)
    model = load_lm(cfg, "slm", None).eval()
    return export_hf(cfg, model, work / "models" / "legal", {"domain": "legal", "strategy": "slm", "params": 1,
                                                              "test_ppl": 1.0})


@pytest.fixture(scope="module")
def loaded(folder):
    torch.set_num_threads(1)
    return load(str(folder))


def ids_of(loaded, text: str) -> list[int]:
    return loaded.tokenizer(text, add_special_tokens=False)["input_ids"]


def direct_logprobs(loaded, ids: list[int]) -> torch.Tensor:
    """log p(ids[i] | ids[:i]) for i >= 1, from one plain forward pass."""
    with torch.no_grad():
        logits = loaded.model(input_ids=torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]


# -- loading ------------------------------------------------------------------------------

def test_a_served_folder_loads_as_an_eval_model_with_its_tokenizer_and_context(folder, loaded):
    assert not loaded.model.training and loaded.model.dtype == torch.float32
    assert loaded.context == loaded.model.config.max_position_embeddings == 64  # the recipe's seq_len
    assert loaded.load_seconds > 0
    ids = ids_of(loaded, TEXT)
    assert len(ids) > 10 and loaded.tokenizer.decode(ids) == TEXT


def test_weights_load_from_safetensors_only(folder, tmp_path):
    """The same weights as a pickle (``pytorch_model.bin``) are refused, never unpickled."""
    pickled = tmp_path / "pickled"
    shutil.copytree(folder, pickled)
    state = load(str(folder)).model.state_dict()
    (pickled / "model.safetensors").unlink()
    torch.save(state, pickled / "pytorch_model.bin")
    with pytest.raises(OSError, match="safetensors"):
        load(str(pickled))


# -- scoring ------------------------------------------------------------------------------

def test_scores_equal_a_direct_forward_pass_whatever_the_chunking(loaded, monkeypatch):
    ids = ids_of(loaded, TEXT)[:40]
    want = direct_logprobs(loaded, ids)
    got = score_ids(loaded, [ids])[0]
    assert len(got) == len(ids) - 1
    assert torch.allclose(torch.tensor(got), want, atol=1e-4)
    # A few positions' logits at a time: the same values.
    monkeypatch.setattr(engine, "LOGIT_CHUNK_ELEMENTS", 3 * loaded.model.config.vocab_size)
    assert torch.allclose(torch.tensor(score_ids(loaded, [ids])[0]), want, atol=1e-4)


def test_a_batch_scores_each_input_as_alone(loaded):
    """Right padding: a short input next to a long one scores as it does alone."""
    a, b = ids_of(loaded, TEXT)[:30], ids_of(loaded, "The licensee shall not")
    together = score_ids(loaded, [a, b])
    assert np.allclose(together[0], score_ids(loaded, [a])[0], atol=1e-4)
    assert np.allclose(together[1], score_ids(loaded, [b])[0], atol=1e-4)


def test_an_input_longer_than_the_context_is_scored_window_by_window(loaded):
    ctx = loaded.context
    ids = (ids_of(loaded, TEXT) * 8)[:2 * ctx + 5]
    got = score_ids(loaded, [ids])[0]
    assert len(got) == len(ids) - 3  # each of the 3 windows' first token has no prediction
    assert np.allclose(got[ctx - 1:2 * ctx - 2], direct_logprobs(loaded, ids[ctx:2 * ctx]).tolist(), atol=1e-4)
    aligned = with_firsts(ids, got, ctx)
    assert len(aligned) == len(ids)
    assert [p for p, v in enumerate(aligned) if v is None] == [0, ctx, 2 * ctx]


def test_openai_logprobs_echo_the_scores_and_rank_the_top_tokens(loaded):
    ids = ids_of(loaded, TEXT)[:20]
    full = token_logprobs(loaded, ids, 0, 3)
    assert len(full["tokens"]) == len(full["token_logprobs"]) == len(full["top_logprobs"]) == len(ids)
    assert full["token_logprobs"][0] is None and full["top_logprobs"][0] is None
    assert np.allclose(full["token_logprobs"][1:], score_ids(loaded, [ids])[0], atol=1e-4)
    assert full["tokens"] == [loaded.tokenizer.decode([i]) for i in ids]
    assert full["text_offset"] == [sum(len(t) for t in full["tokens"][:k]) for k in range(len(ids))]
    for lp, top in zip(full["token_logprobs"][1:], full["top_logprobs"][1:]):
        assert 1 <= len(top) <= 3 and max(top.values()) >= lp - 1e-5 and all(v <= 0 for v in top.values())
    tail = token_logprobs(loaded, ids, 12, 0)  # no echo: the completion's tokens only
    assert tail["tokens"] == full["tokens"][12:] and tail["top_logprobs"] is None
    assert np.allclose(tail["token_logprobs"], full["token_logprobs"][12:], atol=1e-6)


# -- generation ---------------------------------------------------------------------------

GREEDY = Sampling(max_tokens=12, temperature=0.0)


def test_max_tokens_bounds_a_completion(loaded):
    prompt = ids_of(loaded, "The licensee shall")
    for k in (1, 5, 12):
        (out,), = generate(loaded, [prompt], Sampling(max_tokens=k, temperature=0.0))
        assert len(out["ids"]) <= k
        assert out["text"] == loaded.tokenizer.decode(out["ids"])
        if out["finish"] == "length":
            assert len(out["ids"]) == k
    again = generate(loaded, [prompt], GREEDY)
    assert again == generate(loaded, [prompt], GREEDY)  # greedy: the same completion every time


SEEDED = Sampling(max_tokens=16, temperature=1.0, seed=1)
"""Seeded sampling: varied text from a random model, the same text every time."""


def late_stop(text: str) -> str:
    """The two characters of ``text`` (whole ones) that first occur the latest in it."""
    return max((text[i:i + 2] for i in range(len(text) - 1) if "\ufffd" not in text[i:i + 2]), key=text.index)


def token_stop(tokenizer, ids: list[int]) -> str:
    """The text of one of ``ids`` (whole characters) that first occurs in their text where
    that token starts, the latest such one: a stop string that arrives in one piece."""
    text = tokenizer.decode(ids)
    best = ""
    for i in range(1, len(ids)):
        head, piece = tokenizer.decode(ids[:i]), tokenizer.decode([ids[i]])
        if piece.strip() and "\ufffd" not in head + piece and text.find(piece) == len(head):
            best = piece
    return best


def test_a_stop_string_cuts_the_completion_before_it(loaded):
    prompt = ids_of(loaded, "The licensee shall")
    (full,), = generate(loaded, [prompt], SEEDED)
    text = full["text"]
    stop = late_stop(text)
    assert text.index(stop) >= 4, text
    (cut,), = generate(loaded, [prompt], dataclasses.replace(SEEDED, stop=(stop, "never-seen")))
    assert cut["text"] == text[:text.index(stop)] and stop not in cut["text"]
    assert cut["finish"] == "stop" and len(cut["ids"]) <= len(full["ids"])
    assert cut_at_stop("hello world", ["o w", "ld"]) == ("hell", True)
    assert cut_at_stop("hello world", ["ld", "o w"]) == ("hell", True)  # the first occurrence, whichever stop
    assert cut_at_stop("hello", ["x"]) == ("hello", False)


def test_a_left_padded_batch_completes_each_prompt_as_alone(loaded):
    prompts = [ids_of(loaded, "The licensee shall"), ids_of(loaded, TEXT)[:25]]
    together = generate(loaded, prompts, GREEDY)
    assert together == [generate(loaded, [p], GREEDY)[0] for p in prompts]


def test_seeded_sampling_is_reproducible_and_n_gives_n_completions(loaded):
    prompt = ids_of(loaded, "The licensee shall")
    s = Sampling(max_tokens=8, temperature=1.0, top_p=0.9, n=3, seed=7)
    first = generate(loaded, [prompt], s)
    assert len(first) == 1 and len(first[0]) == 3
    assert generate(loaded, [prompt], s) == first
    assert all(len(o["ids"]) <= 8 for o in first[0])


def test_sampling_takes_a_completion_requests_settings():
    c = validate(CompletionRequest, b'{"model": "legal", "prompt": "x", "max_tokens": 9, "temperature": 0.5, '
                                    b'"top_p": 0.8, "stop": "\\n", "n": 2, "seed": 3}', DEFAULT_LIMITS)
    assert Sampling.of(c) == Sampling(max_tokens=9, temperature=0.5, top_p=0.8, stop=("\n",), n=2, seed=3)


def streamed(loaded, prompt: list[int], s: Sampling) -> tuple[dict, list[str]]:
    """A completion and the pieces of text its stream handed out (TextStream over the
    token ids the streamer saw), the rest of the final text last."""
    got, ended = [], []
    (out,), = generate(loaded, [prompt], s, streamer=streamer(lambda ids, _: got.extend(ids),
                                                              lambda: ended.append(True)))
    assert ended == [True] and got[:len(out["ids"])] == out["ids"]  # the new tokens only, then the end
    text = TextStream(loaded.tokenizer, s.stop)
    pieces = [text.push([t]) for t in got]
    return out, [p for p in pieces if p] + [text.rest(out["text"])]


def test_a_stream_hands_out_the_completion_piece_by_piece_up_to_its_stop(loaded):
    prompt = ids_of(loaded, "The licensee shall")
    full, pieces = streamed(loaded, prompt, SEEDED)
    assert len(pieces) > 2 and "".join(pieces) == full["text"]
    assert not any(p.endswith("\ufffd") for p in pieces[:-1])  # no partial character while streaming
    # A stop string that spans two tokens may be streamed in part before it is complete
    # (the stream holds back partial characters only): this one comes as one token.
    stop = token_stop(loaded.tokenizer, full["ids"])
    assert full["text"].index(stop) >= 1, (full["text"], stop)
    out, pieces = streamed(loaded, prompt, dataclasses.replace(SEEDED, stop=(stop,)))
    assert "".join(pieces) == out["text"] == full["text"][:full["text"].index(stop)]


def test_a_passed_deadline_stops_generation_and_scoring(loaded):
    prompt = ids_of(loaded, "The licensee shall")
    with pytest.raises(Deadline):
        generate(loaded, [prompt], GREEDY, deadline=time.monotonic() - 1)
    with pytest.raises(Deadline):
        score_ids(loaded, [prompt], deadline=time.monotonic() - 1)
    held = threading.Lock()
    held.acquire()
    t0 = time.monotonic()
    with pytest.raises(Deadline):  # the generation lock is waited for until the deadline only
        generate(loaded, [prompt], GREEDY, deadline=time.monotonic() + 0.2, lock=held)
    assert time.monotonic() - t0 < 5
    free = threading.Lock()
    assert generate(loaded, [prompt], GREEDY, deadline=math.inf, lock=free) == generate(loaded, [prompt], GREEDY)
    assert not free.locked()


def test_the_health_probe_runs_a_forward_pass_under_the_lock(loaded):
    lock = threading.Lock()
    one_token_forward(loaded.model, lock, 1.0)
    one_token_forward(None, lock, 1.0)  # no model loaded yet: nothing to run
    assert not lock.locked()
    lock.acquire()
    with pytest.raises(RuntimeError, match="lock"):
        one_token_forward(loaded.model, lock, 0.05)


# -- routing and limits -------------------------------------------------------------------

def test_auto_picks_the_served_domain_with_the_highest_share_of_the_nearest_cluster():
    router = {"centroids": [[1.0, 0.0], [0.0, 1.0]],
              "histograms": {"legal": [0.7, 0.1], "code": [0.2, 0.6], "religion": [0.1, 0.3]}}
    near_1 = np.asarray([[0.1, 0.99]], dtype=np.float32)
    assert pick_domain(router, {"legal", "code", "religion"}, near_1) == (
        "code", {"routed_to": "code", "by": "cluster", "cluster": 1, "share": 0.6})
    assert pick_domain(router, {"legal", "religion"}, near_1)[0] == "religion"  # among the served only
    tied = {"centroids": [[1.0, 0.0]], "histograms": {"b": [0.5], "a": [0.5]}}
    assert pick_domain(tied, {"a", "b"}, np.asarray([[1.0, 0.0]], dtype=np.float32))[0] == "a"


def test_auto_scores_at_most_route_tokens_of_a_prompt_after_a_document_boundary():
    eos = 0
    assert engine.route_pieces([5, 6, 7], 4, eos) == [[0, 5, 6, 7]]
    assert engine.route_pieces([5, 6, 7, 8], 4, eos) == [[0, 5, 6, 7, 8]]  # k tokens: all of it
    ids = list(range(10, 30))
    for k in (2, 3, 4, 7, 8, 19):
        head, tail = engine.route_pieces(ids, k, eos)
        assert head == [eos, *ids[:k - k // 2]] and tail == ids[-(k // 2 + 1):]
        assert (len(head) - 1) + (len(tail) - 1) == k  # each piece's first token is context only
        assert len(set(head[1:]) & set(tail)) == 0


def test_an_auto_score_is_the_mean_nll_of_a_direct_forward_after_eos(loaded):
    eos = loaded.tokenizer.eos_token_id
    ids = ids_of(loaded, TEXT)
    short = ids[:12]
    got = engine.route_nlls({"a": loaded}, loaded.tokenizer.decode(short), 32)["a"]
    want = direct_logprobs(loaded, [eos, *short])
    assert got["tokens"] == len(short) and got["nll"] == pytest.approx(-float(want.mean()), rel=1e-5)
    assert got["bytes"] == sum(len(loaded.token_bytes[t]) for t in short)
    k = 16  # a long prompt: its first 8 tokens after eos and its last 8 after their one token of context
    pieces = engine.route_pieces(ids, k, eos)
    entry = engine.route_entry(loaded, pieces, score_ids(loaded, pieces))
    direct = torch.cat([direct_logprobs(loaded, p) for p in pieces])
    assert entry["tokens"] == k == len(direct) and entry["nll"] == pytest.approx(-float(direct.mean()), rel=1e-5)


def test_a_long_text_is_tokenised_at_its_two_ends_only(loaded, monkeypatch):
    text = " ".join([TEXT] * 60)
    k = 16
    assert len(text) > 2 * (k + 2) * loaded.max_token_bytes  # long enough to be cut
    seen: list[int] = []
    encode = engine.Loaded.encode
    monkeypatch.setattr(engine.Loaded, "encode",
                        lambda self, texts: seen.extend(map(len, texts)) or encode(self, texts))
    got = engine.route_ids(loaded, text, k)
    assert max(seen) <= (k + 2) * loaded.max_token_bytes
    assert got == engine.route_pieces(ids_of(loaded, text), k, loaded.tokenizer.eos_token_id)


def _entry(nll: float, ids=((0, 1),), tokens: int = 10, nbytes: int = 40) -> dict:
    return {"nll": nll, "sum": nll * tokens, "tokens": tokens, "bytes": nbytes, "ids": (ids, 64)}


def test_auto_picks_the_lowest_mean_nll_and_never_a_broken_model():
    domain, info = engine.pick_by_nll({"legal": _entry(3.0), "code": _entry(2.5), "bio": _entry(4.0)})
    assert domain == "code" and info["routed_to"] == "code" and info["by"] == "nll" and info["unit"] == "token"
    assert info["nll"] == {"bio": 4.0, "code": 2.5, "legal": 3.0} and info["scored_tokens"] == 10
    assert engine.pick_by_nll({"b": _entry(2.0), "a": _entry(2.0)})[0] == "a"  # ties: the first name
    nan = engine.pick_by_nll({"poisoned": _entry(float("nan")), "legal": _entry(9.0)})
    assert nan[0] == "legal" and nan[1]["nll"]["poisoned"] is None
    # Tokenizers that cut the prompt differently: per byte of the text scored, not per token.
    coarse, fine = _entry(4.0, ids=((0, 1),), tokens=10, nbytes=40), _entry(1.5, ids=((0, 2),), tokens=40, nbytes=40)
    assert engine.pick_by_nll({"coarse": coarse, "fine": fine}) == (  # 40 / 40 bytes < 60 / 40
        "coarse", {"routed_to": "coarse", "by": "nll", "unit": "byte", "scored_tokens": 10,
                   "nll": {"coarse": 4.0, "fine": 1.5}})


def test_the_auto_route_settings_are_validated():
    from slmfactory.platform.errors import ConfigError

    assert (ServingConfig().auto_route, ServingConfig().route_tokens) == ("nll", 128)
    assert load_config(TINY, {"serving.auto_route": "cluster", "serving.route_tokens": 32}).serving.route_tokens == 32
    with pytest.raises(ConfigError, match="serving.auto_route"):
        ServingConfig(auto_route="embedding")
    with pytest.raises(ConfigError, match="serving.route_tokens"):
        ServingConfig(route_tokens=1)


def test_the_request_limits_are_the_serving_configs():
    s = ServingConfig()
    assert DEFAULT_LIMITS == Limits.from_config(s)
    assert (DEFAULT_LIMITS.max_tokens, DEFAULT_LIMITS.max_request_bytes) == (s.max_tokens, s.max_request_bytes)
    assert DEFAULT_LIMITS.max_domain_request_bytes == 4 * s.max_request_bytes
    small = Limits.from_config(ServingConfig(max_tokens=4))
    body = b'{"model": "legal", "prompt": "x", "max_tokens": 5}'
    with pytest.raises(ApiError) as e:
        validate(CompletionRequest, body, small)
    assert e.value.param == "max_tokens"
    assert validate(CompletionRequest, body, DEFAULT_LIMITS).max_tokens == 5


# -- sampling parameters, log-probs, chat ---------------------------------------------------

@pytest.fixture(scope="module")
def flat(folder, tmp_path_factory):
    """The same model with a zero final norm: every logit is exactly 0 whatever the input,
    so a request's ``logit_bias`` alone sets the logits, and what each penalty does to them
    is known exactly (greedy decoding among equal logits takes the lowest id, eos)."""
    from safetensors.torch import load_file, save_file

    out = tmp_path_factory.mktemp("flat") / "flat"
    shutil.copytree(folder, out)
    weights = load_file(out / "model.safetensors")
    weights["model.norm.weight"].zero_()
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    return load(str(out))


def distinct_tokens(loaded, k: int, avoid: list[int]) -> list[int]:
    """``k`` ids of whole-word tokens that are not eos, pad, or in ``avoid``."""
    tok = loaded.tokenizer
    ids = [i for i in range(2, loaded.vocab) if i not in avoid and tok.decode([i]).strip().isalpha()]
    return ids[:k]


def test_generated_tokens_logprobs_are_the_generations_own_scores(loaded):
    """Greedy, nothing else: the log-probs ``generate`` reports (its scores, through
    ``compute_transition_scores``) are the model's, as a plain forward pass scores the
    same tokens; each token is the top alternative; a stream reports the same ones."""
    prompt = ids_of(loaded, "The licensee shall")
    s = Sampling(max_tokens=6, temperature=0.0, logprobs=3)
    (out,), = generate(loaded, [prompt], s)
    assert len(out["logprobs"]) == len(out["ids"]) > 0
    want = score_ids(loaded, [prompt + out["ids"]])[0][-len(out["ids"]):]
    assert np.allclose([lp for lp, _ in out["logprobs"]], want, atol=1e-4)
    for t, (lp, top) in zip(out["ids"], out["logprobs"]):
        assert len(top) == 3 and top[0][0] == t and top[0][1] == pytest.approx(lp, abs=1e-5)
        assert [v for _, v in top] == sorted((v for _, v in top), reverse=True)
    got = []
    (again,), = generate(loaded, [prompt], s, streamer=streamer(lambda ids, steps: got.append((ids, steps)),
                                                                 lambda: None))
    assert again == out
    assert [ids[0] for ids, _ in got][:len(out["ids"])] == out["ids"]
    assert [steps[0] for _, steps in got][:len(out["ids"])] == out["logprobs"]
    assert generate(loaded, [prompt], Sampling(max_tokens=6, temperature=0.0))[0][0]["logprobs"] is None


def test_presence_and_frequency_penalties_are_vectorised_over_the_batch_and_skip_the_prompt():
    """OpenAI's definitions: logit - frequency x count - presence x (count > 0), counts
    of each row's generated tokens only (the prompt, up to ``start``, does not count)."""
    from slmfactory.serving.generation import FrequencyPenalty, PresencePenalty

    input_ids = torch.tensor([[5, 5, 1, 1, 2],    # prompt 5 5; generated 1, 1, 2
                              [3, 5, 4, 4, 4]])   # prompt 3 5; generated 4, 4, 4
    scores = torch.zeros(2, 6)
    freq = FrequencyPenalty(0.5, start=2)(input_ids, scores)
    pres = PresencePenalty(0.25, start=2)(input_ids, scores)
    assert freq.tolist() == [[0, -1.0, -0.5, 0, 0, 0], [0, 0, 0, 0, -1.5, 0]]
    assert pres.tolist() == [[0, -0.25, -0.25, 0, 0, 0], [0, 0, 0, 0, -0.25, 0]]
    assert FrequencyPenalty(0.5, start=5)(input_ids, scores).tolist() == scores.tolist()  # nothing generated yet


def _logprob_of(logit: float, vocab: int) -> float:
    """log-softmax of ``logit`` among ``vocab`` - 1 logits of 0."""
    return logit - math.log(vocab - 1 + math.exp(logit))


def test_each_penalty_lowers_the_logit_it_should_by_its_amount(flat):
    """On the flat model the logits are the request's: a token biased to 3 is taken, and
    the penalties change its logit at the next steps exactly as defined (read back from
    the generation's own log-probs): repetition_penalty 2 halves it, frequency_penalty 1
    takes 1 per occurrence, presence_penalty 1 takes 1 once; logit_bias +100 forces a token."""
    prompt = ids_of(flat, "The licensee shall")
    a, = distinct_tokens(flat, 1, prompt)
    vocab = flat.model.config.vocab_size
    base = Sampling(max_tokens=3, temperature=0.0, logit_bias=((a, 3.0),), logprobs=0)
    for change, logits in (({}, [3, 3, 3]), ({"repetition_penalty": 2.0}, [3, 1.5, 1.5]),
                           ({"frequency_penalty": 1.0}, [3, 2, 1]), ({"presence_penalty": 1.0}, [3, 2, 2])):
        (out,), = generate(flat, [prompt], dataclasses.replace(base, **change))
        assert out["ids"] == [a] * 3, change
        assert [lp for lp, _ in out["logprobs"]] == pytest.approx([_logprob_of(x, vocab) for x in logits],
                                                                  rel=1e-5), change
    (unbiased,), = generate(flat, [prompt], Sampling(max_tokens=3, temperature=0.0))
    assert unbiased["ids"] == [] and unbiased["finish"] == "stop"  # all logits 0: eos (id 0) is taken
    # A prompt token counts for repetition_penalty (transformers', vLLM's) and not for the
    # OpenAI penalties: a biased token already in the prompt.
    (rep,), = generate(flat, [prompt + [a]], dataclasses.replace(base, max_tokens=1, repetition_penalty=2.0))
    (pres,), = generate(flat, [prompt + [a]], dataclasses.replace(base, max_tokens=1, presence_penalty=1.0))
    assert rep["logprobs"][0][0] == pytest.approx(_logprob_of(1.5, vocab), rel=1e-5)
    assert pres["logprobs"][0][0] == pytest.approx(_logprob_of(3.0, vocab), rel=1e-5)


def test_top_k_1_is_greedy_and_logit_bias_forces_a_token(loaded):
    prompt = ids_of(loaded, "The licensee shall")
    (greedy,), = generate(loaded, [prompt], Sampling(max_tokens=8, temperature=0.0))
    for seed in (1, 2):
        top1 = generate(loaded, [prompt], Sampling(max_tokens=8, temperature=1.0, top_k=1, n=2, seed=seed))[0]
        assert [o["ids"] for o in top1] == [greedy["ids"]] * 2
    forced, = distinct_tokens(loaded, 1, greedy["ids"])
    for s in (Sampling(max_tokens=5, temperature=0.0), Sampling(max_tokens=5, temperature=1.0, seed=3)):
        (out,), = generate(loaded, [prompt], dataclasses.replace(s, logit_bias=((forced, 100.0),)))
        assert out["ids"] == [forced] * 5


def test_a_stop_string_cuts_the_logprobs_with_the_text(loaded):
    prompt = ids_of(loaded, "The licensee shall")
    (full,), = generate(loaded, [prompt], dataclasses.replace(SEEDED, logprobs=0))
    stop = token_stop(loaded.tokenizer, full["ids"])
    (cut,), = generate(loaded, [prompt], dataclasses.replace(SEEDED, logprobs=0, stop=(stop,)))
    kept = len(cut["logprobs"])
    assert loaded.tokenizer.decode(cut["ids"][:kept]) == cut["text"] and kept < len(cut["ids"])


def test_sampling_takes_every_setting_of_completion_and_chat_requests():
    c = validate(CompletionRequest, b'{"model": "legal", "prompt": "x", "top_k": 4, "repetition_penalty": 1.5, '
                                    b'"presence_penalty": -0.5, "frequency_penalty": 0.25, '
                                    b'"logit_bias": {"7": 5, "3": -100}, "logprobs": 2}', DEFAULT_LIMITS)
    assert Sampling.of(c) == Sampling(top_k=4, repetition_penalty=1.5, presence_penalty=-0.5, frequency_penalty=0.25,
                                      logit_bias=((3, -100.0), (7, 5.0)), logprobs=2)
    chat = validate(ChatRequest, b'{"model": "legal", "messages": [{"role": "user", "content": "hi"}], '
                                 b'"max_completion_tokens": 5, "logprobs": true, "top_k": -1}', DEFAULT_LIMITS)
    assert Sampling.of(chat, max_tokens=chat.completion_cap) == Sampling(max_tokens=5, logprobs=0)
    plain = validate(ChatRequest, b'{"model": "legal", "messages": [{"role": "user", "content": "hi"}]}',
                     DEFAULT_LIMITS)
    assert plain.completion_cap is None and Sampling.of(plain, max_tokens=9).logprobs is None


def test_the_chat_prompt_is_the_recipes_template(loaded):
    from slmfactory.platform.config import DEFAULT_CHAT_TEMPLATE
    from slmfactory.serving.generation import chat_prompt

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who grants it?"},
                {"role": "assistant", "content": "The licensor."}, {"role": "user", "content": "And then?"}]
    assert chat_prompt(loaded, messages, DEFAULT_CHAT_TEMPLATE) == (
        "system: Be brief.\nuser: Who grants it?\nassistant: The licensor.\nuser: And then?\nassistant:")
    own = "{% for m in messages %}[{{ m.role | upper }}] {{ m.content }}\n{% endfor %}[ASSISTANT]"
    assert chat_prompt(loaded, messages[1:2], own) == "[USER] Who grants it?\n[ASSISTANT]"
    strict = "{% if messages[0].role == 'system' %}{{ raise_exception('no system role') }}{% endif %}x"
    with pytest.raises(ValueError, match="no system role"):
        chat_prompt(loaded, messages, strict)


def test_chat_logprobs_carry_each_tokens_bytes(loaded):
    """A character split over two byte-level tokens has no text per token; the bytes of
    the tokens, joined, are the text's."""
    from slmfactory.serving.replies import chat_logprobs

    ids = ids_of(loaded, "déjà vu — naïve")
    lp = chat_logprobs(loaded, ids, [(-1.0, [(ids[0], -0.5)])] * len(ids))
    assert b"".join(bytes(e["bytes"]) for e in lp["content"]).decode() == "déjà vu — naïve"
    assert lp["content"][0]["top_logprobs"][0]["bytes"] == lp["content"][0]["bytes"]


def test_unknown_fields_are_named_and_unsupported_parameters_refused():
    from slmfactory.serving.schemas import ignored_fields

    body = b'{"model": "legal", "prompt": "x", "min_tokens": 2, "odd,name\\n": 1, "user": "u"}'
    assert ignored_fields(validate(CompletionRequest, body, DEFAULT_LIMITS)) == "min_tokens,odd%2Cname%0A"
    assert ignored_fields(validate(CompletionRequest, b'{"model": "legal", "prompt": "x"}', DEFAULT_LIMITS)) is None
    chat = b'{"model": "legal", "messages": [{"role": "user", "content": "hi"}], '
    for body, param in ((b'{"model": "legal", "prompt": "x", "best_of": 2}', "best_of"),
                        (b'{"model": "legal", "prompt": "x", "suffix": "y"}', "suffix"),
                        (chat + b'"tools": [{"type": "function", "function": {"name": "f"}}]}', "tools"),
                        (chat + b'"response_format": {"type": "json_object"}}', "response_format"),
                        (chat + b'"stream": true, "stream_options": {"include_obfuscation": true}}', "stream_options")):
        with pytest.raises(ApiError) as e:
            validate(CompletionRequest if b'"prompt"' in body else ChatRequest, body, DEFAULT_LIMITS)
        assert e.value.param == param and e.value.status == 400 and f"'{param}'" in e.value.message, body
